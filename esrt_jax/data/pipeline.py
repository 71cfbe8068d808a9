"""The training input pipeline on Grain.

    records (JSONL / HF datasets / TFDS)  ->  MixturePlan (task x direction mixture, schedule)
      -> this process's slice of every global batch
      -> decode + resample + 30 s pad/trim + log-mel on the host (`features="mel"`) or the raw
         30 s waveform shipped for on-device mel (`features="audio"`, then
         `audio.log_mel_spectrogram_jax` in the train step)
      -> task format + tokenise (`tasks.TaskTokenizer`)
      -> static-shape batches, text padded to the smallest of a few bucket lengths
      -> thread prefetch, or `mp_prefetch` with `workers` processes

Batches (numpy, b = global batch / process count rows):

    mel (b, n_mels, 3000) float32  |  audio (b, 480000) float32
    tokens, loss_mask, attention_mask (b, T) int32, prompt_len, length (b,) int32
      (see `esrt_jax.data.tasks` for the exact next-token convention)
    task (b,) int32 (`tasks.task_id`; -1 on an empty row), valid (b,) int32,
    example_key (b,) int64 (global example index), record (b,) int64 (index in the source)

Per-process sharding: global batch g is examples [g*B, (g+1)*B) of the plan; process p gets
rows [p*b, (p+1)*b) of it. Together the processes see exactly the single-process stream.

State: `it = make_train_iterator(...)`; `it.get_state()` / `it.set_state(state)` are exact
(the plan is random access, so the state is just the next batch index, per worker). The
trainer stores it with Orbax through `grain.checkpoint.CheckpointSave/CheckpointRestore`.
Restoring with `workers > 0` needs the same `workers` as when it was saved.

Bad records (missing or corrupt audio, unknown language, empty text, text longer than the
largest bucket, malformed source lines) are counted, logged once with their id and reason,
and skipped: their batch row becomes an empty row (`valid=0`, all masks 0) so shapes stay
static and resume stays exact. When more than `max(bad_record_min, bad_record_budget * seen)`
records are bad (counted per process / per worker), `BadRecordBudgetError` stops the run with a
summary of the reasons.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import sys
import threading
from typing import Any, Literal, Mapping, Sequence

import grain
import jax
import numpy as np

from esrt_jax import audio as audio_lib
from esrt_jax import languages
from esrt_jax.config import ConfigError, check, setting
from esrt_jax.data import augment as aug_lib
from esrt_jax.data import records as rec_lib
from esrt_jax.data.encode_cache import FeatureCache
from esrt_jax.data.mixture import MixturePlan, PlanItem, build_components
from esrt_jax.data.tasks import DEFAULT_TASK, TASKS, TaskError, TaskTokenizer, collate, get_task, task_id, task_name
from esrt_jax.metrics import normalize_transcript

log = logging.getLogger(__name__)

__all__ = [
    "WeightChange",
    "DataConfig",
    "BadRecordBudgetError",
    "BadRecordTracker",
    "ExampleBuilder",
    "open_sources",
    "make_plan",
    "make_train_dataset",
    "make_train_iterator",
    "make_eval_batches",
    "open_feature_cache",
]

CTC_LABEL_BUCKET = 16  # CTC label lengths are padded to a multiple of this
BAD_REASONS = ("missing audio", "corrupt audio", "unknown language", "empty text",
               "too long", "malformed record")


@dataclasses.dataclass(frozen=True)
class WeightChange:
    """From training step `step` on, the task weights are `weights`."""

    step: int = setting(help="training step from which the weights apply")
    weights: dict[str, float] = setting(help="task weights from then on")

    def validate(self) -> None:
        check(self.step > 0, "step", f"must be > 0 (step 0 uses data.tasks), got {self.step}")
        _check_weights(self.weights, "weights")


def _check_weights(weights: Mapping[str, float], key: str) -> None:
    unknown = sorted(set(weights) - set(TASKS))
    check(not unknown, key, f"unknown task(s) {unknown}; tasks are {list(TASKS)}")
    check(all(w >= 0 for w in weights.values()), key, f"weights must be >= 0, got {dict(weights)}")
    check(sum(weights.values()) > 0, key, f"weights must not all be 0, got {dict(weights)}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training data. `train`: sources (`x.jsonl`, TFDS folder[:split], datasets folder[:split],
    parquet). `tasks`: task weights at step 0; `schedule`: later changes. `temperature`:
    direction balancing p ∝ n^(1/T). `direction_cap`: max records per direction (0 = all).
    `languages`: keep only these (empty = all). `batch_size`: GLOBAL batch (divided among
    processes). `features`: `mel` (host) or `audio` (mel on device). `encoder_cache`: a folder
    built by `esrt_jax.data.encode_cache`; batches then carry the cached encoder output `enc`
    (b, P, d_model) instead of `mel`/`audio`, and no audio is read. Every batch carries
    `enc_frames` (b,): the encoder frames covering each audio's real length (what an adapter
    with attend_padding false attends over). `enc_frame_bucket` (cache only; 0 = off): cut `enc`
    to the batch's longest `enc_frames` rounded up to a multiple of this (static shapes per
    bucket); only for such an adapter (the model builder checks). `augment`: training-only
    audio augmentation (`esrt_jax.data.augment`; off by default). `ctc_units` (the align stage):
    the CTC label units, one character each (unit i + 1 = ctc_units[i]; 0 is the blank); batches
    then also carry `ctc_labels` (b, L) int32 and `ctc_paddings` (b, L) float32 (1 = padding): the
    record's transcript after Whisper's text normaliser, characters outside the units dropped."""

    train: tuple[str, ...] = setting((),
                                   help="training sources (x.jsonl, TFDS folder[:split], datasets folder[:split], "
                                        "parquet)")
    tasks: dict[str, float] = setting(factory=lambda: {DEFAULT_TASK: 1.0}, help="task weights at step 0")
    schedule: tuple[WeightChange, ...] = setting((), help="later changes of the task weights")
    temperature: float = setting(1.0, help="direction balancing: p proportional to n^(1/T)")
    direction_cap: int = setting(0, help="max records per direction (0 = all)")
    languages: tuple[str, ...] = setting((), help="keep only these languages (empty = all)")
    batch_size: int = setting(8, help="global batch (set from train.batch_size)")
    text_buckets: tuple[int, ...] = setting((64, 128, 256), help="padded text lengths (the longest caps the text)")
    features: Literal["mel", "audio"] = setting("mel", help="mel (on the host) or audio (mel on device)")
    encoder_cache: str | None = setting(None,
                                      help="folder of cached encoder outputs (esrt_jax.data.encode_cache); batches "
                                           "carry enc instead of mel")
    enc_frame_bucket: int = setting(0,
                                  help="cache only: cut enc to the batch's longest real frames, rounded up to this "
                                       "(0 = off)")
    n_mels: int = setting(128, help="mel bins (set from the encoder)")
    sample_rate: int = setting(16000, help="audio sample rate (Whisper: 16000)")
    workers: int = setting(0, help="Grain worker processes (0 = in-process)")
    worker_buffer: int = setting(2, help="batches buffered per worker")
    read_threads: int = setting(1, help="threads reading records")
    prefetch: int = setting(2, help="batches prefetched")
    seed: int = setting(0, help="seed of the shuffle and the mixture")
    add_bos: bool | None = setting(None, help="prepend BOS to prompts (null: the tokenizer's habit)")
    bad_record_budget: float = setting(0.01, help="share of bad records tolerated before the run stops")
    bad_record_min: int = setting(20, help="bad records always tolerated")
    shard_index: int | None = setting(None, help="this process's shard (null: jax.process_index)")
    shard_count: int | None = setting(None, help="number of shards (null: jax.process_count)")
    augment: aug_lib.AugmentConfig = setting(aug_lib.AugmentConfig(), help="training-only audio augmentation")
    ctc_units: tuple[str, ...] = setting((), help="align stage: the CTC label units, one character each "
                                                  "(unit i + 1 = ctc_units[i]; 0 is the blank)")

    def validate(self) -> None:
        _check_weights(self.tasks, "tasks")
        check(not (self.augment.enabled and self.encoder_cache), "augment",
              "cannot augment cached encoder outputs (data.encoder_cache): no audio is read")
        check(not (self.augment.mel and self.features != "mel"), "augment",
              "mel masks and freq_warp need features: mel (with features: audio only speed and noise apply)")
        steps = [c.step for c in self.schedule]
        check(steps == sorted(set(steps)), "schedule", f"steps must increase, got {steps}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(self.direction_cap >= 0, "direction_cap", "must be >= 0 (0 = no cap)")
        check(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        check(len(self.text_buckets) > 0 and all(b > 0 for b in self.text_buckets),
              "text_buckets", f"need positive lengths, got {list(self.text_buckets)}")
        check(list(self.text_buckets) == sorted(set(self.text_buckets)), "text_buckets",
              f"must increase, got {list(self.text_buckets)}")
        check(self.enc_frame_bucket >= 0, "enc_frame_bucket", "must be >= 0 (0 = keep every frame)")
        check(not self.enc_frame_bucket or self.encoder_cache, "enc_frame_bucket",
              "trims the cached encoder output: set data.encoder_cache too")
        check(self.n_mels in (80, 128), "n_mels", f"Whisper uses 80 or 128, got {self.n_mels}")
        check(self.sample_rate == 16000, "sample_rate", "Whisper needs 16000")
        check(self.workers >= 0, "workers", "must be >= 0 (0 = in-process)")
        check(self.worker_buffer >= 1, "worker_buffer", "must be >= 1")
        check(self.read_threads >= 1, "read_threads", "must be >= 1")
        check(self.prefetch >= 1, "prefetch", "must be >= 1")
        check(all(isinstance(u, str) and len(u) == 1 for u in self.ctc_units)
              and len(set(self.ctc_units)) == len(self.ctc_units), "ctc_units",
              "must be distinct single characters")
        check(0 <= self.seed < 2**32, "seed", "must be in [0, 2**32)")
        check(0 <= self.bad_record_budget < 1, "bad_record_budget", "must be in [0, 1)")
        check(self.bad_record_min >= 0, "bad_record_min", "must be >= 0")
        check((self.shard_index is None) == (self.shard_count is None), "shard_index",
              "set shard_index and shard_count together (or neither: jax.process_index/count)")
        if self.shard_count is not None:
            check(self.shard_count > 0, "shard_count", "must be > 0")
            check(0 <= self.shard_index < self.shard_count, "shard_index",
                  f"must be in [0, {self.shard_count})")

    def segments(self) -> list[tuple[int, dict[str, float]]]:
        """The schedule in global examples: [(first example, weights)]."""
        return [(0, dict(self.tasks))] + [(c.step * self.batch_size, dict(c.weights))
                                         for c in self.schedule]

    def shard(self) -> tuple[int, int]:
        if self.shard_count is not None:
            return int(self.shard_index), int(self.shard_count)
        return jax.process_index(), jax.process_count()


# ----------------------------------------------------------------------------- bad records


def max_answer_tokens(data: Mapping[str, Any]) -> int:
    """Default generation cap from a run config's `data` block: the longest tokenised text the
    pipeline keeps (the largest `text_buckets`), so no answer the model was trained to give is cut;
    greedy decoding stops earlier when every row has emitted EOS."""
    return int(max(data.get("text_buckets") or DataConfig.text_buckets))


class BadRecordBudgetError(RuntimeError):
    """Too many bad records: the data (or its paths) are broken."""


class BadRecordTracker:
    """Counts good and bad records; logs each bad id once; enforces the budget."""

    def __init__(self, budget: float = 0.01, minimum: int = 20):
        self.budget, self.minimum = float(budget), int(minimum)
        self.seen = 0
        self.reasons: collections.Counter = collections.Counter()
        self._logged: set = set()
        self._examples: dict[str, str] = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        d = dict(self.__dict__)
        d.pop("_lock")
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()

    @property
    def bad(self) -> int:
        return sum(self.reasons.values())

    def ok(self) -> None:
        with self._lock:
            self.seen += 1

    def add(self, record_id: str, reason: str, detail: str = "") -> None:
        with self._lock:
            self.seen += 1
            self.reasons[reason] += 1
            self._examples.setdefault(reason, f"{record_id}: {detail}" if detail else record_id)
            if record_id not in self._logged:
                self._logged.add(record_id)
                log.warning("skipping record %s: %s%s", record_id, reason,
                            f" ({detail})" if detail else "")
            limit = max(self.minimum, self.budget * self.seen)
            if self.bad > limit:
                raise BadRecordBudgetError(self.summary(limit))

    def summary(self, limit: float | None = None) -> str:
        head = (f"{self.bad} of {self.seen} records were bad (budget {self.budget:.2%}, at least "
                f"{self.minimum} allowed"
                + (f", limit now {limit:.0f}" if limit is not None else "") + "); reasons:")
        lines = [f"  {r}: {n} (e.g. {self._examples[r]})" for r, n in self.reasons.most_common()]
        return "\n".join([head, *lines,
                          "fix the data or raise data.bad_record_budget / data.bad_record_min"])


# ----------------------------------------------------------------------------- examples


class ExampleBuilder:
    """PlanItem -> features + token ids for one example, or None for a bad record. `augment`:
    apply `cfg.augment` (training only), seeded by the example's global key."""

    def __init__(self, source: rec_lib.RecordSource, task_tok: TaskTokenizer, cfg: DataConfig,
                 tracker: BadRecordTracker, *, augment: bool = False):
        self.source, self.task_tok, self.cfg, self.tracker = source, task_tok, cfg, tracker
        self.max_len = max(cfg.text_buckets)
        self.cache = open_feature_cache(cfg)
        self.augment = augment and cfg.augment.enabled
        self.ctc_table = {u: i + 1 for i, u in enumerate(cfg.ctc_units)}

    def ctc_labels(self, record: rec_lib.Record) -> list[int] | None:
        """The transcript as CTC units (see `DataConfig.ctc_units`), or None without units."""
        if not self.ctc_table:
            return None
        return [self.ctc_table[ch] for ch in ctc_text(record.transcription) if ch in self.ctc_table]

    def build(self, task: str, record: rec_lib.Record, key: int = 0):
        for code in (record.src,) + ((record.tgt,) if get_task(task).translates else ()):
            if not languages.is_known(code):
                self.tracker.add(record.id, "unknown language", repr(code))
                return None
        try:
            text = self.task_tok.encode(task, record.src, record.tgt, record.transcription,
                                        record.translation)
        except TaskError as e:
            self.tracker.add(record.id, "empty text", str(e))
            return None
        if len(text) > self.max_len:
            self.tracker.add(record.id, "too long",
                             f"{task} has {len(text)} tokens > largest bucket {self.max_len}")
            return None
        if self.cache is not None:  # a key missing from the cache raises (names the audio)
            feat = self.cache[record.audio]
            self.tracker.ok()
            frames = self.cache.frames(record.audio)
            return feat, text, feat.shape[0] if frames is None else frames
        if record.audio_bytes is None and not os.path.isfile(record.audio):
            self.tracker.add(record.id, "missing audio", record.audio)
            return None
        try:
            wav = rec_lib.load_audio_of(record, self.cfg.sample_rate)
        except audio_lib.AudioError as e:
            self.tracker.add(record.id, "corrupt audio", str(e))
            return None
        rng = aug_lib.example_rng(self.cfg.seed, key) if self.augment else None
        if rng is not None and self.cfg.augment.waveform:
            wav = aug_lib.perturb_waveform(wav, self.cfg.augment, rng)
        frames = -(-len(wav) // audio_lib.HOP_LENGTH)
        enc_frames = audio_lib.encoder_frames(wav.size)
        wav = audio_lib.pad_or_trim(wav, audio_lib.N_SAMPLES)
        if self.cfg.features == "mel":
            feat = audio_lib.log_mel_spectrogram(wav, self.cfg.n_mels)
            if rng is not None and self.cfg.augment.freq_warp > 0:
                feat = aug_lib.warp_mel(feat, frames, self.cfg.augment, rng, self.cfg.sample_rate)
            if rng is not None and self.cfg.augment.masks:
                feat = aug_lib.mask_mel(feat, frames, self.cfg.augment, rng)
        else:
            feat = np.asarray(wav, np.float32)
        self.tracker.ok()
        return feat, text, enc_frames

    def __call__(self, item) -> dict | None:
        task = task_name(item.task)
        try:
            record = self.source[item.record]
        except Exception as e:  # a source that cannot produce this row (corrupt shard, ...)
            self.tracker.add(f"#{item.record}", "malformed record", f"{type(e).__name__}: {e}")
            return None
        out = self.build(task, record, item.key)
        if out is None:
            return {"key": item.key, "record": item.record, "task": -1, "feat": None, "text": None}
        feat, text, frames = out
        return {"key": item.key, "record": item.record, "task": item.task, "feat": feat,
                "text": text, "frames": frames, "ctc": self.ctc_labels(record)}


def open_feature_cache(cfg: DataConfig):
    """The `encoder_cache` of `cfg` as a `FeatureCache`, or None (fingerprints are checked by
    the model builder, which has the encoder)."""
    if not cfg.encoder_cache:
        return None
    return FeatureCache(cfg.encoder_cache)


class _Collate:
    def __init__(self, cfg: DataConfig, pad_id: int):
        self.cfg, self.pad_id = cfg, pad_id
        self.cache = open_feature_cache(cfg)

    def __call__(self, examples: Sequence[dict]) -> dict[str, np.ndarray]:
        out = collate([e["text"] for e in examples], self.cfg.text_buckets, self.pad_id)
        if self.cfg.encoder_cache:
            shape, dtype, key = self.cache.shape, self.cache.dtype, "enc"
        elif self.cfg.features == "mel":
            shape, dtype, key = (self.cfg.n_mels, audio_lib.N_FRAMES), np.float32, "mel"
        else:
            shape, dtype, key = (audio_lib.N_SAMPLES,), np.float32, "audio"
        # empty rows (bad records, eval padding): one frame, so a masked row is never empty
        frames = np.array([e.get("frames") or 1 for e in examples], np.int32)
        if self.cfg.enc_frame_bucket and key == "enc":
            b = self.cfg.enc_frame_bucket
            shape = (min(shape[0], -(-int(frames.max()) // b) * b),) + tuple(shape[1:])
        feats = np.zeros((len(examples),) + tuple(shape), dtype)
        for i, e in enumerate(examples):
            if e["feat"] is not None:
                feats[i] = e["feat"][:shape[0]]
        out[key] = feats
        out["enc_frames"] = frames
        if self.cfg.ctc_units:
            out["ctc_labels"], out["ctc_paddings"] = pad_labels([e.get("ctc") or [] for e in examples])
        out["task"] = np.array([e["task"] for e in examples], np.int32)
        out["valid"] = (out["task"] >= 0).astype(np.int32)
        out["example_key"] = np.array([e["key"] for e in examples], np.int64)
        out["record"] = np.array([e["record"] for e in examples], np.int64)
        return out


def ctc_text(text: str) -> str:
    """What the align stage's CTC learns to spell: Whisper's text normaliser (what CER scores),
    single spaces, none at the ends."""
    return " ".join(normalize_transcript(text).split())


def pad_labels(labels: Sequence[Sequence[int]], bucket: int = CTC_LABEL_BUCKET
               ) -> tuple[np.ndarray, np.ndarray]:
    """Label lists -> (b, L) int32 labels and (b, L) float32 paddings (1 = padding), L the longest
    rounded up to `bucket` (few distinct shapes to compile)."""
    L = max(1, -(-max((len(x) for x in labels), default=1) // bucket) * bucket)
    out = np.zeros((len(labels), L), np.int32)
    pad = np.ones((len(labels), L), np.float32)
    for i, x in enumerate(labels):
        out[i, :len(x)] = x
        pad[i, :len(x)] = 0.0
    return out, pad


class _ProcessSlice(grain.MapDataset):
    """Row j of this process's stream -> example of the global stream (see module docstring)."""

    def __init__(self, plan: MixturePlan, global_batch: int, index: int, count: int):
        super().__init__([plan])
        self._plan, self._B, self._b, self._p = plan, global_batch, global_batch // count, index

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return f"_ProcessSlice(B={self._B}, b={self._b}, p={self._p})"

    def __getitem__(self, j):
        if isinstance(j, slice):
            return self.slice(j)
        g, r = divmod(int(j), self._b)
        return self._plan[g * self._B + self._p * self._b + r]


# ----------------------------------------------------------------------------- builders


def open_sources(specs: Sequence[str]) -> rec_lib.RecordSource:
    if not specs:
        raise ConfigError("data.train: no training sources given")
    srcs = [rec_lib.open_source(s) for s in specs]
    return srcs[0] if len(srcs) == 1 else rec_lib.ConcatSource(srcs)


def make_plan(cfg: DataConfig, source: rec_lib.RecordSource) -> MixturePlan:
    """The mixture plan of `source` under `cfg` (tasks ever used by the schedule included)."""
    used = [t for t in TASKS if any(w.get(t, 0) > 0 for _, w in cfg.segments())]
    comps = build_components(source.index(), used, cap=cfg.direction_cap, seed=cfg.seed,
                             languages=cfg.languages)
    empty = [t for t in used if not comps.get(t)]
    if empty:
        raise ConfigError(
            f"data: task(s) {empty} have weight > 0 but {source.name} has no usable records for "
            f"them ({'/'.join(t.upper() for t in TASKS if TASKS[t].translates)} need a target language"
            f" different from the source"
            f"{'; data.languages=' + str(list(cfg.languages)) if cfg.languages else ''})")
    return MixturePlan(comps, cfg.segments(), temperature=cfg.temperature, seed=cfg.seed)


def make_train_dataset(cfg: DataConfig, tokenizer, source: rec_lib.RecordSource | None = None
                       ) -> grain.IterDataset:
    """The batched, prefetched training `IterDataset` (infinite)."""
    source = open_sources(cfg.train) if source is None else source
    index, count = cfg.shard()
    if cfg.batch_size % count:
        raise ConfigError(f"data.batch_size: {cfg.batch_size} is not divisible by the "
                          f"{count} processes")
    if source.load_errors:  # malformed lines, found when the source was read
        load = BadRecordTracker(cfg.bad_record_budget, cfg.bad_record_min)
        load.seen = len(source)
        for where, reason in source.load_errors:
            load.add(where, "malformed record", reason)
    tracker = BadRecordTracker(cfg.bad_record_budget, cfg.bad_record_min)
    task_tok = TaskTokenizer(tokenizer, add_bos=cfg.add_bos)
    plan = make_plan(cfg, source)
    ds = _ProcessSlice(plan, cfg.batch_size, index, count)
    ds = ds.map(ExampleBuilder(source, task_tok, cfg, tracker, augment=True))
    ds = ds.batch(cfg.batch_size // count, batch_fn=_Collate(cfg, task_tok.pad_id))
    ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                               prefetch_buffer_size=cfg.prefetch))
    if cfg.workers > 0:
        # Grain's worker processes read absl flags; outside an absl app they are unparsed.
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ids = ids.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=cfg.workers, per_worker_buffer_size=cfg.worker_buffer))
    return ids


def make_train_iterator(cfg: DataConfig, tokenizer, source: rec_lib.RecordSource | None = None,
                        state: Mapping[str, Any] | None = None):
    """`iter(make_train_dataset(...))`, restored to `state` if given."""
    it = iter(make_train_dataset(cfg, tokenizer, source))
    if state is not None:
        it.set_state(state)
    return it


def make_eval_batches(cfg: DataConfig, tokenizer, source: rec_lib.RecordSource, task: str,
                      batch_size: int | None = None):
    """Every record of `source` once, in order, as `task` batches (the last one padded with
    empty rows; bad records are empty rows too). A finite generator of batch dicts."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; tasks are {list(TASKS)}")
    b = batch_size or cfg.batch_size
    task_tok = TaskTokenizer(tokenizer, add_bos=cfg.add_bos)
    # Eval data is small and fixed: never stop on bad records, just count them.
    builder = ExampleBuilder(source, task_tok, cfg, BadRecordTracker(budget=0.999999, minimum=10**9))
    coll = _Collate(cfg, task_tok.pad_id)
    n = len(source)
    for start in range(0, n, b):
        rows = [builder(PlanItem(k, task_id(task), k)) for k in range(start, min(n, start + b))]
        while len(rows) < b:
            rows.append({"key": -1, "record": -1, "task": -1, "feat": None, "text": None})
        yield coll(rows)
