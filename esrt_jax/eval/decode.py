"""Decode a test set into a results file (public ESRT schema), resumably.

    items, issues = read_items("test.jsonl", src={"eng"}, tgt=None, limit=None, task="srt")
    stats = decode_to_file(translator, items, "out/results.jsonl", batch=64)

Input: ESRT (`{id, audio, src, tgt, asr, s2tt}`) or LLM-SRT (`{audio, source, prompt, gt}`) JSONL,
one (utterance, target language) record a line, read with `esrt_jax.data.records.read_jsonl` (the
reader training uses).
Bad records (malformed JSON, missing keys, unknown language codes, missing audio files,
duplicate ids) are returned as `results.Issue`s with their line numbers and skipped; audio that
exists but cannot be decoded (or is empty or silent) is found at encode time and reported the
same way. Nothing in the data makes decoding crash.

Long recordings (longer than the encoder's window) are cut into segments at pauses
(`esrt_jax.infer.longform.clip_windows`); each record decodes all its audio's segments, and the joined
texts (`esrt_jax.infer.longform`) are what is written and scored. `segment=False` cuts each audio
to one window instead (with a warning). With an encoder cache (one window per audio) and with a
`mel_fn` there is no segmentation.

Audio is encoded ONCE per utterance and reused for all its target languages: records are grouped
by audio path (first appearance order); up to `batch` utterances are loaded, turned into log-mel
(`esrt_jax.infer.longform.clip_windows`, the same front end the edge client uses: the 30 s Whisper
log-mel of each segment, cut to the encoder's `num_frames` for test-sized encoders, so features
are identical to what a deployed edge would send) and encoded by `Translator.encode`; their records are then
decoded `batch` at a time by `Translator.decode` (bucketed, jitted; SRT output split at
`<|src|><|tgt|>`). Results are written grouped by utterance in that order.

Resume: the output is appended to one decode batch at a time (one write + flush). A rerun reads
the ids already present (a truncated last line from a kill is cut off and redone), checks that
the file was made by the same model, task and generation settings (`<name>.decode.json` next to
it), and decodes only what is missing. Batches are planned from the whole selection, not from
what is left, so a resumed record is decoded in exactly the batch (same companions, same padded
shapes) it would have had in an uninterrupted run: the final file is byte-identical.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from esrt_jax import languages
from esrt_jax.audio import AudioError
from esrt_jax.data.encode_cache import CacheError
from esrt_jax.data.records import JSON_KEYS, SourceError, read_jsonl
from esrt_jax.data.tasks import DEFAULT_TASK, TASKS, Task, TaskError, get_task
from esrt_jax.eval.results import RESULT_FIELDS, RESULT_KEYS, Issue
from esrt_jax.infer import longform
from esrt_jax.infer.cloud import model_fingerprint

__all__ = [
    "EvalItem",
    "DecodeError",
    "DecodeStats",
    "TASKS",
    "read_items",
    "plan_chunks",
    "read_done",
    "decode_to_file",
    "translator_fingerprint",
    "meta_path",
]



class DecodeError(ValueError):
    """A decode that cannot start: unreadable data file, results made by another model, ..."""


def _task(name: str) -> Task:
    try:
        return get_task(name)
    except TaskError as e:
        raise DecodeError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One (utterance, target) to decode; `src`/`tgt` as spelled in the data (prompt tags)."""

    line: int
    id: str
    audio: str  # as written in the data (goes into the results file)
    path: str  # resolved path of the audio file
    src: str
    tgt: str
    transcription: str  # reference transcription ("" when the task uses none)
    translation: str  # reference translation ("" for ASR)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.id, languages.normalize(self.src), languages.normalize(self.tgt))

    def prompt(self, task: str) -> str:
        """The task prompt as text (the tokens the LLM sees after the speech)."""
        return get_task(task).format_prompt(self.src, self.tgt, self.transcription)


@dataclasses.dataclass
class DecodeStats:
    selected: int = 0  # records in the selection
    already_done: int = 0  # found in the results file at start
    decoded: int = 0  # written by this run
    failed: int = 0  # records skipped because their audio could not be loaded
    audio_encoded: int = 0  # utterances encoded by this run
    encode_s: float = 0.0  # mel + encode wall time (compiles included)
    decode_s: float = 0.0  # decode wall time (compiles included)
    issues: list[Issue] = dataclasses.field(default_factory=list)  # audio failures at encode time

    @property
    def complete(self) -> bool:
        return self.already_done + self.decoded + self.failed >= self.selected


def _codes(spec) -> Optional[set[str]]:
    """None / "all" -> None (every language); "eng,deu" or an iterable -> canonical codes."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec.strip().lower() in ("", "all"):
            return None
        spec = spec.split(",")
    return {languages.normalize(c) for c in spec if str(c).strip()}


def read_items(path: str | os.PathLike, *, src=None, tgt=None, langs=None, limit: int | None = None,
               task: str = DEFAULT_TASK) -> tuple[list[EvalItem], list[Issue]]:
    """Read a test JSONL -> (items to decode, issues of the skipped lines).

    `src`/`tgt`/`langs`: language codes ("eng,deu", a list, or None/"all"); `langs` keeps records
    whose source AND target are in it. `limit`: at most that many records per direction (per
    source language for `task="asr"`), the first ones in file order. `task="asr"` keeps one item
    per (audio, source language) with `tgt = src`; `task="srt"` skips records with src == tgt
    (nothing to translate) and `task="smt"` those without a reference transcription (its prompt).
    """
    tk = _task(task)
    src_set, tgt_set, lang_set = _codes(src), _codes(tgt), _codes(langs)
    try:
        lines = read_jsonl(path)
    except SourceError:
        raise DecodeError(f"{path}: data file does not exist") from None
    items: list[EvalItem] = []
    issues: list[Issue] = []
    seen: dict[tuple, int] = {}
    per_dir: collections.Counter = collections.Counter()
    for ln in lines:
        lineno, obj, rec = ln.line, ln.obj, ln.record
        if rec is None:
            issues.append(Issue(lineno, "malformed_json", ln.error) if ln.kind == "json" else
                          Issue(lineno, "missing_field", f"not a test record: {ln.error}"))
            continue
        try:
            s, t = languages.normalize(rec.src), languages.normalize(rec.tgt)
        except languages.LanguageError as e:
            issues.append(Issue(lineno, "unknown_language", str(e)))
            continue
        if not tk.translates:
            t = s
        elif s == t:
            issues.append(Issue(lineno, "same_language",
                                f"{s}->{t} has nothing to translate; skipped for task {task} (use --task "
                                f"{next(n for n, x in TASKS.items() if not x.translates)})"))
            continue
        if (src_set is not None and s not in src_set) or (tgt_set is not None and t not in tgt_set) or \
                (lang_set is not None and (s not in lang_set or t not in lang_set)):
            continue
        empty = [f for f in tk.given if not getattr(rec, f).strip()]
        if empty:
            issues.append(Issue(lineno, "missing_field", f"no reference {empty[0]} ('{JSON_KEYS[empty[0]]}'): "
                                                         f"task {task} needs it"))
            continue
        key = (rec.id, s, t) if tk.translates else (rec.audio, s)
        if key in seen:
            if tk.translates:  # for ASR the other targets of an utterance are expected
                issues.append(Issue(lineno, "duplicate", f"record id={rec.id!r} {s}->{t} already on line "
                                                        f"{seen[key]}; skipped"))
            continue
        seen[key] = lineno
        if not rec.audio_bytes and not os.path.isfile(rec.audio):
            issues.append(Issue(lineno, "missing_audio", f"audio file {rec.audio} does not exist"))
            continue
        if limit is not None and per_dir[(s, t)] >= limit:
            continue
        per_dir[(s, t)] += 1
        written = obj.get("audio") if isinstance(obj.get("audio"), str) else rec.audio
        tgt_code = rec.tgt if tk.translates else rec.src
        items.append(EvalItem(lineno, rec.id, written, rec.audio, rec.src.lower(), tgt_code.lower(),
                              rec.transcription if "transcription" in tk.needs else "",
                              rec.translation if "translation" in tk.needs else ""))
    return items, issues


def plan_chunks(items: Sequence[EvalItem], batch: int) -> list[tuple[list[str], list[int]]]:
    """Group items by audio (first appearance order) into chunks of at most `batch` utterances.

    Returns [(audio paths, item indices ordered by utterance then file order)]; each chunk's
    records are decoded `batch` at a time in that order.
    """
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it.path, []).append(i)
    paths = list(groups)
    return [(paths[c:c + batch], [i for p in paths[c:c + batch] for i in groups[p]])
            for c in range(0, len(paths), batch)]


def _result_key(obj) -> tuple[str, str, str] | None:
    try:
        return (str(obj["id"]), languages.normalize(obj["src"]), languages.normalize(obj["tgt"]))
    except (KeyError, TypeError, languages.LanguageError):
        return None


def read_done(path: str | os.PathLike, *, repair: bool = True) -> tuple[set, list[str]]:
    """Keys `(id, src, tgt)` already in a results file, and warnings.

    A last line without its newline is what a kill during a write leaves: it is cut off (the file
    truncated to the last complete line, with `repair`) and its record decoded again. Unreadable
    complete lines are reported and left in place (scoring reports them too).
    """
    p = Path(path)
    if not p.exists():
        return set(), []
    data = p.read_bytes()
    warnings = []
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        line = data.count(b"\n") + 1
        warnings.append(f"{p}: dropped an incomplete last line (line {line}, {len(data) - cut} bytes) "
                        f"left by an interrupted write; its record is decoded again")
        data = data[:cut]
        if repair:
            with open(p, "r+b") as f:
                f.truncate(cut)
    done = set()
    for lineno, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            key = _result_key(json.loads(raw))
        except (json.JSONDecodeError, UnicodeDecodeError):
            key = None
        if key is None:
            warnings.append(f"{p}:{lineno}: not a result record; left in place, its record (if any) is decoded again")
            continue
        done.add(key)
    return done, warnings


def meta_path(results: str | os.PathLike) -> Path:
    p = Path(results)
    return p.with_name(p.stem + ".decode.json")


def translator_fingerprint(translator) -> str:
    """The served model's id (config + trained adapter weights), as the edge/cloud use it."""
    return model_fingerprint(nnx.merge(translator.graphdef, translator.state))


# Settings a results file must share with the run that appends to it. The fingerprint covers the
# config and the adapter weights; stage/step (from `info`, when given) also catch a checkpoint that
# only changed LLM/LoRA weights.
_MATCH_KEYS = ("fingerprint", "stage", "step", "task", "split", "generate", "segment")
# Keys added after the first results files were written: not compared when a file lacks them.
_NEWER_KEYS = ("segment",)


def _check_meta(results: Path, meta: dict, overwrite: bool) -> None:
    mp = meta_path(results)
    if results.exists() and results.stat().st_size and not overwrite:
        if mp.exists():
            try:
                old = json.loads(mp.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise DecodeError(f"{mp}: unreadable ({e}); pass overwrite=True (--overwrite) to start over")
            diff = [k for k in _MATCH_KEYS if old.get(k) != meta.get(k) and (k in old or k not in _NEWER_KEYS)]
            if diff:
                detail = "; ".join(f"{k}: file {old.get(k)!r}, now {meta.get(k)!r}" for k in diff)
                raise DecodeError(f"{results} was decoded with other settings ({detail}); resuming would mix "
                                  f"them. Use another output folder (--out) or --overwrite to start over")
        else:
            raise DecodeError(f"{results} exists but has no {mp.name} saying how it was made; use another "
                              f"output folder (--out) or --overwrite to start over")
    if overwrite and results.exists():
        results.unlink()
    results.parent.mkdir(parents=True, exist_ok=True)
    mp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def decode_to_file(translator, items: Sequence[EvalItem], results: str | os.PathLike, *,
                   task: str = DEFAULT_TASK, batch: int = 64, progress: bool = True, overwrite: bool = False,
                   info: dict | None = None, fingerprint: str | None = None,
                   mel_fn: Callable[[str], np.ndarray] | None = None,
                   audio_of: Callable[[str], str] | None = None, encoder_cache=None,
                   on_batch: Callable[[int], None] | None = None, log=None, segment: bool = True) -> DecodeStats:
    """Decode `items` with `translator` into `results` (JSONL, public ESRT schema), resuming.

    `batch`: utterances per encode chunk and records per decode call (the translator pads both
    to its power-of-two buckets, capped at its `max_batch`). `info`: extra facts recorded in the
    `.decode.json` sidecar (config, checkpoint, data). `mel_fn(path) -> (n_mels, frames)`
    replaces the audio front end (tests). `audio_of(path) -> path` picks the audio actually used
    (the listening check's swapped decode). `encoder_cache`: a `FeatureCache` of this model's
    encoder; the cached encoder outputs then replace front end + encoder (an audio missing from
    it is a `DecodeError` naming it). `on_batch(n_written)` is called after each write.
    `log`: stream for warnings and the progress bar (default stderr). `segment`: cut audio longer
    than the encoder's window into segments (decoded each, texts joined) instead of cutting it to
    one window (always for task smt, whose prompt is the whole transcription).
    """
    tk = _task(task)
    if batch < 1:
        raise DecodeError(f"batch must be >= 1, got {batch}")
    log = log or sys.stderr
    # A prompt holding the whole reference transcription (SMT): each segment would translate all of it.
    segment = segment and not tk.given
    results = Path(results)
    gen = dataclasses.asdict(translator.gen_cfg)
    meta = {"fingerprint": fingerprint or translator_fingerprint(translator), "task": task,
            "split": translator.split, "generate": json.loads(json.dumps(gen)), "segment": segment,
            **(info or {})}
    _check_meta(results, meta, overwrite)
    done, warnings = read_done(results)
    for w in warnings:
        print(f"warning: {w}", file=log)
    audio_of = audio_of or (lambda p: p)
    # load(path) -> (inputs (S, ...) float32, its S segments or None for one unsegmented window,
    # real encoder frames (S,) of each input or None when unknown: an adapter with
    # attend_padding false needs them, the default one ignores them)
    # only such an adapter is given them (other edge runtimes' encode takes the mel alone)
    real_frames = not getattr(translator.config.adapter, "attend_padding", True)
    if encoder_cache is not None:
        def load(p):
            f = encoder_cache.frames(audio_of(p))
            return (np.asarray(encoder_cache[audio_of(p)], np.float32)[None], None,
                    None if f is None else np.array([f], np.int32))
        run = translator.adapt
    elif mel_fn is not None:
        load, run = (lambda p: (np.asarray(mel_fn(audio_of(p)), np.float32)[None], None, None)), translator.encode
    else:
        enc = translator.config.encoder

        def load(p):
            mels, segs, frames = longform.clip_windows(audio_of(p), enc.num_mel_bins, enc.num_frames,
                                                       segment=segment)
            return np.asarray(mels, np.float32), segs if len(segs) > 1 else None, frames
        run = translator.encode
    enc_step = max(1, min(batch, translator.max_batch))
    stats = DecodeStats(selected=len(items))
    stats.already_done = sum(it.key in done for it in items)
    bar = tqdm(total=len(items), initial=stats.already_done, unit="rec", desc="decode",
               disable=not progress, dynamic_ncols=True, file=log)
    try:
        with open(results, "a", encoding="utf-8") as out:
            for paths, idx in plan_chunks(items, batch):
                if all(items[i].key in done for i in idx):
                    continue
                t0 = time.perf_counter()
                inputs, ok, segs_of, frames = [], [], {}, []
                for p in paths:
                    try:
                        x, segs_of[p], f = load(p)
                        inputs.append(x)
                        frames.append(f)
                        ok.append(p)
                    except CacheError as e:
                        raise DecodeError(str(e)) from None
                    except (AudioError, OSError, ValueError) as e:
                        bad = [i for i in idx if items[i].path == p]
                        for i in bad:
                            stats.issues.append(Issue(items[i].line, "bad_audio", f"cannot load audio: {e}"))
                        stats.failed += sum(items[i].key not in done for i in bad)
                        bar.update(sum(items[i].key not in done for i in bad))
                if not ok:
                    continue
                # (rows, ...): every segment of every audio, frames for all of them or none
                with_frames = real_frames and all(f is not None for f in frames)
                feats = longform.encode_windows(
                    run, zip(inputs, frames if with_frames else [None] * len(inputs)), enc_step)
                first = np.cumsum([0] + [len(x) for x in inputs])
                rows_of = {p: range(first[k], first[k + 1]) for k, p in enumerate(ok)}
                stats.audio_encoded += len(ok)
                t1 = time.perf_counter()
                stats.encode_s += t1 - t0
                idx = [i for i in idx if items[i].path in rows_of]
                # (item, feature row) for every segment of every record, decoded `batch` rows at a
                # time; a record is written once all its segments are decoded.
                rows = [(i, r) for i in idx for r in rows_of[items[i].path]]
                pending: dict[int, list[dict]] = {}
                for b in range(0, len(rows), batch):
                    chunk = rows[b:b + batch]
                    if all(items[i].key in done for i, _ in chunk):
                        continue
                    t2 = time.perf_counter()
                    its = [items[i] for i, _ in chunk]
                    outs = translator.decode(
                        feats[[r for _, r in chunk]], [it.src for it in its], [it.tgt for it in its], task=task,
                        transcriptions=[it.transcription for it in its] if tk.given else None)
                    lines = []
                    for (i, _), o in zip(chunk, outs):
                        it = items[i]
                        pending.setdefault(i, []).append(o)
                        if it.key in done or len(pending[i]) < len(rows_of[it.path]):
                            continue
                        joined = _join(pending.pop(i), segs_of[it.path], it.src, it.tgt)
                        lines.append(json.dumps(_result(it, joined, task), ensure_ascii=False) + "\n")
                        done.add(it.key)
                    out.write("".join(lines))
                    out.flush()
                    stats.decoded += len(lines)
                    stats.decode_s += time.perf_counter() - t2
                    bar.update(len(lines))
                    if on_batch is not None:
                        on_batch(len(lines))
    finally:
        bar.close()
    return stats


def _join(outs: list[dict], segs, src: str, tgt: str) -> dict:
    """A record's per-segment decodes -> one {"transcription", "translation", "response"} (texts joined
    in order by `longform.join_outputs`; one segment's decode as it is)."""
    if len(outs) == 1:
        return outs[0]
    joined = longform.join_outputs(segs, outs, src, tgt)
    return {"transcription": joined["transcription"], "translation": joined["translation"],
            "response": " ".join(o["response"].strip() for o in outs)}


def _result(it: EvalItem, out: dict, task: str) -> dict:
    """One line of the public ESRT result schema (`RESULT_FIELDS`, in order)."""
    row = {
        "id": it.id, "audio": it.audio, "prompt": it.prompt(task), "src": it.src, "tgt": it.tgt,
        JSON_KEYS["transcription"]: it.transcription, JSON_KEYS["translation"]: it.translation,
        # A task given the transcription (SMT) produces none, so none is scored.
        RESULT_KEYS["transcription"]: out["transcription"] if "transcription" in get_task(task).outputs else None,
        RESULT_KEYS["translation"]: out["translation"],
        "response": out["response"],
    }
    assert tuple(row) == RESULT_FIELDS
    return row


def summarize_issues(issues: Iterable[Issue], data: str, max_lines: int = 5) -> str:
    """'N records skipped (kind n, ...)' plus the first few, each as `data:line: message`."""
    issues = list(issues)
    if not issues:
        return ""
    counts = collections.Counter(i.kind for i in issues)
    head = f"{len(issues)} record(s) skipped (" + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ")"
    lines = [f"  {data}:{i.line}: {i.message}" for i in issues[:max_lines]]
    if len(issues) > max_lines:
        lines.append(f"  ... ({len(issues) - max_lines} more)")
    return "\n".join([head] + lines)
