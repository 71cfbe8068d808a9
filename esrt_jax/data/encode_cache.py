"""Frozen-encoder feature cache: the Whisper encoder run once per unique audio, read back by key.

    python -m esrt_jax.data.encode_cache --config C --out DIR [--dtype bfloat16] [--set k=v ...]

Every stage freezes the encoder, and many-to-many data repeat each utterance once per
(task, target language); with `data.encoder_cache: DIR` the pipeline ships the cached encoder
output `enc (b, P, d_model)` instead of the mel and the train step / dev loss / dev decodes
never run the encoder.

Layout of DIR (written by `build`, read by `FeatureCache`):

    meta.json          format, fingerprint (encoder weights + front end), front end settings,
                       shape (P, d_model), dtype, shard_size, number of keys and shards
    keys.json          the unique audio keys (`Record.audio`) in sorted order; key i lives in
                       shard i // shard_size, row i % shard_size
    shard-00000.npy    (<= shard_size, P, d_model) float32, or bfloat16 stored as uint16 bits;
                       memory-mapped on read (random access from Grain workers)
    shard-00000.sum.json  {"bytes", "sha256"} of shard-00000.npy (the index of checksums):
                       every open checks each shard's size against meta.json, a rerun of the
                       build also its checksum, and rebuilds a shard that fails (named)
    frames-00000.npy   (<= shard_size,) int32: encoder frames covering each audio's real length
                       (`audio.encoder_frames`; what an adapter with attend_padding false
                       attends over, and what `data.enc_frame_bucket` trims to); written
                       before its shard. Caches built before it existed have none (they serve
                       only adapters that attend over the padding) until a rerun adds them.

A shard is written to a temporary name and renamed, so a killed build leaves only complete
shards; a rerun skips them. Multi-host: process p builds shards p, p + count, ... (run the
command on every host with the same --config). Disk per utterance: P x d_model x 2 or 4 bytes,
1500 x 512 (whisper-base) 3.1 MB fp32 / 1.5 MB bf16, 1500 x 1280 (whisper-large-v3) 7.7 MB
fp32 / 3.8 MB bf16.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from esrt_jax import audio as audio_lib
from esrt_jax.config import ConfigError
from esrt_jax.data import records as rec_lib
from esrt_jax.files import os_error_line, write_atomic
from esrt_jax.sharding import make_mesh

FORMAT = 1
DTYPES = ("float32", "bfloat16")


class CacheError(ConfigError):
    """A feature cache that does not fit this model or this data (message names what and where)."""


def frontend_settings(encoder_cfg, sample_rate: int = 16000) -> dict:
    """The settings that change the encoder's input: mel bins, sample rate, 30 s padding, frames."""
    return {"n_mels": int(encoder_cfg.num_mel_bins), "sample_rate": int(sample_rate),
            "padded_samples": int(audio_lib.N_SAMPLES), "frames": int(encoder_cfg.num_frames)}


def encoder_fingerprint(encoder, sample_rate: int = 16000) -> str:
    """sha256 (16 hex) of the encoder's weights (every leaf, in path order) and front end."""
    h = hashlib.sha256(json.dumps(frontend_settings(encoder.config, sample_rate), sort_keys=True).encode())
    for path, leaf in sorted(nnx.to_flat_state(nnx.state(encoder, nnx.Param)), key=lambda kv: str(kv[0])):
        h.update(str(path).encode())
        h.update(np.ascontiguousarray(np.asarray(jax.device_get(leaf.get_value()), np.float32)).tobytes())
    return h.hexdigest()[:16]


def _shard_path(out: Path, i: int) -> Path:
    return out / f"shard-{i:05d}.npy"


def _frames_path(out: Path, i: int) -> Path:
    return out / f"frames-{i:05d}.npy"


def _sum_path(out: Path, i: int) -> Path:
    return out / f"shard-{i:05d}.sum.json"


def _read_json(f: Path, what: str):
    """A cache's JSON file, or a CacheError naming it (a cut or damaged file, not a traceback)."""
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{what}: {f} is damaged (cut or not JSON: {e}); delete the cache folder and "
                         f"rebuild it with python -m esrt_jax.data.encode_cache") from None


def _sha256(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def npy_problem(f: Path, shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    """Why the .npy file `f` is not a whole (shape, dtype) array (missing, cut, other header), or None."""
    if not f.is_file():
        return "missing"
    try:
        with open(f, "rb") as fh:
            fmt = np.lib.format
            read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(fmt.read_magic(fh))
            if read is None:
                return "unsupported .npy version"
            got_shape, _, got_dtype = read(fh)
            offset = fh.tell()
    except (ValueError, OSError, SyntaxError) as e:
        return f"unreadable header ({e})"
    if tuple(got_shape) != tuple(shape) or np.dtype(got_dtype) != np.dtype(dtype):
        return f"holds {got_dtype}{list(got_shape)}, expected {np.dtype(dtype)}{list(shape)}"
    want = offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
    size = f.stat().st_size
    return None if size == want else f"{size} bytes, expected {want} (truncated?)"


def shard_problem(out: Path, meta: dict, i: int, *, checksum: bool = False) -> str | None:
    """Why shard i of the cache in `out` is not whole (size and header against meta.json; with
    `checksum`, also its sha256 against shard-i.sum.json where that exists), or None."""
    rows = min(meta["shard_size"], meta["keys"] - i * meta["shard_size"])
    store = np.uint16 if meta["dtype"] == "bfloat16" else np.float32
    f = _shard_path(out, i)
    bad = npy_problem(f, (rows, *meta["shape"]), store)
    if bad is None and _frames_path(out, i).is_file():
        fbad = npy_problem(_frames_path(out, i), (rows,), np.int32)
        if fbad is not None:
            return f"{_frames_path(out, i).name}: {fbad}"
    if bad is None and checksum and _sum_path(out, i).is_file():
        want = _read_json(_sum_path(out, i), "data.encoder_cache")
        if not isinstance(want, dict) or want.get("sha256") != _sha256(f):
            bad = "checksum differs from its .sum.json (damaged)"
    return None if bad is None else f"{f.name}: {bad}"


class FeatureCache:
    """Read side: `cache[audio_key] -> (P, d_model)` float32 or bfloat16 (a memory-mapped row).

    Picklable (Grain worker processes reopen the shards lazily)."""

    def __init__(self, path: str | os.PathLike, fingerprint: str | None = None):
        self.path = Path(path).expanduser()
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise CacheError(f"data.encoder_cache: {self.path} is not a feature cache (no meta.json); "
                             f"build it with python -m esrt_jax.data.encode_cache --config C --out {self.path}")
        self.meta = _read_json(meta_file, "data.encoder_cache")
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT:
            fmt = self.meta.get("format") if isinstance(self.meta, dict) else None
            raise CacheError(f"data.encoder_cache: {self.path} has format {fmt}, "
                             f"this code reads format {FORMAT}; rebuild it")
        if fingerprint is not None:
            self.check(fingerprint)
        missing = [i for i in range(self.meta["shards"]) if not _shard_path(self.path, i).is_file()]
        if missing:
            raise CacheError(f"data.encoder_cache: {self.path} is incomplete ({len(missing)} of "
                             f"{self.meta['shards']} shards missing, e.g. {_shard_path(self.path, missing[0]).name}); "
                             f"rerun python -m esrt_jax.data.encode_cache to finish it")
        for i in range(self.meta["shards"]):  # cheap: headers and sizes, no data read
            bad = shard_problem(self.path, self.meta, i)
            if bad:
                raise CacheError(f"data.encoder_cache: {self.path}/{bad}; rerun python -m esrt_jax.data.encode_cache "
                                 f"with the same --out to rebuild that shard")
        keys = _read_json(self.path / "keys.json", "data.encoder_cache")
        self._index = {k: i for i, k in enumerate(keys)}
        self._shards: dict[int, np.ndarray] = {}
        self._frames: dict[int, np.ndarray] = {}

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.meta["shape"])

    @property
    def dtype(self):
        return np.dtype(ml_dtypes.bfloat16) if self.meta["dtype"] == "bfloat16" else np.dtype(np.float32)

    def check(self, fingerprint: str) -> None:
        """Refuse a cache made for another encoder or front end."""
        if self.meta["fingerprint"] != fingerprint:
            raise CacheError(
                f"data.encoder_cache: {self.path} was built for encoder/front end {self.meta['fingerprint']} "
                f"({self.meta['frontend']}), but this model's is {fingerprint}; rebuild the cache "
                f"for this encoder (python -m esrt_jax.data.encode_cache)")

    @property
    def window(self) -> str:
        """The encoder window the features were computed on: "padded" (30 s) or "real"."""
        return self.meta.get("window", "padded")

    @property
    def has_frames(self) -> bool:
        """Whether every shard records its audios' real lengths (caches built since they do)."""
        return all(_frames_path(self.path, i).is_file() for i in range(self.meta["shards"]))

    def frames(self, key: str) -> int | None:
        """Encoder frames covering `key`'s real audio, or None when this cache does not record them."""
        i = self._index.get(key)
        if i is None:
            self[key]  # the error naming the audio
        s, r = divmod(i, self.meta["shard_size"])
        arr = self._frames.get(s)
        if arr is None:
            f = _frames_path(self.path, s)
            arr = self._frames[s] = np.load(f) if f.is_file() else np.zeros(0, np.int32)
        return int(arr[r]) if arr.size else None

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, key: str) -> np.ndarray:
        i = self._index.get(key)
        if i is None:
            raise CacheError(f"data.encoder_cache: audio {key} is not in the feature cache {self.path} "
                             f"(built for other data?); rebuild it with the current data config")
        s, r = divmod(i, self.meta["shard_size"])
        arr = self._shards.get(s)
        if arr is None:
            arr = self._shards[s] = np.load(_shard_path(self.path, s), mmap_mode="r")
        row = arr[r]
        return row.view(self.dtype) if self.meta["dtype"] == "bfloat16" else row

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_shards"], d["_frames"] = {}, {}
        return d


def build(encoder, keys: Sequence[str], load_mel: Callable[[str], np.ndarray], out: str | os.PathLike, *,
          dtype: str = "float32", shard_size: int = 256, batch: int = 16, sample_rate: int = 16000,
          process_index: int = 0, process_count: int = 1, progress: bool = True, window: str = "padded") -> dict:
    """Encode every key's audio once (skipping finished shards) -> {'built', 'skipped',
    'frames_added'} shard counts.

    encoder: a `WhisperEncoder`; load_mel(key) -> (n_mels, frames) float32 mel; when load_mel
    also has `.samples(key)` (as `mel_loader`'s has), the audio's sample count, its real length
    is recorded (frames-*.npy), else the full window is; finished shards of an older cache that
    lack their lengths get them (audio read, nothing encoded): 'frames_added' counts them.
    Batches are split over the local devices (data parallel); this process builds the shards
    i with i % process_count == process_index. `window` "real" (`model.encoder_window: real`):
    each batch's mels are cut to `audio.real_window` of its longest clip before the encoder (the
    features past it are stored as zeros; needs load_mel.samples); the cache records it.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: {dtype!r} is not one of {list(DTYPES)}")
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted(set(keys))
    cfg = encoder.config
    shape = (cfg.max_source_positions, cfg.d_model)
    meta = {"format": FORMAT, "fingerprint": encoder_fingerprint(encoder, sample_rate),
            "frontend": frontend_settings(cfg, sample_rate), "shape": list(shape), "dtype": dtype,
            "shard_size": int(shard_size), "keys": len(keys), "shards": -(-len(keys) // shard_size)}
    if window not in ("padded", "real"):
        raise ConfigError(f"window: {window!r} is not 'padded' or 'real'")
    if window == "real":  # only then: caches of the padded window keep their meta
        if getattr(load_mel, "samples", None) is None:
            raise ConfigError("window 'real' needs each audio's length (load_mel.samples, as mel_loader has)")
        meta["window"] = "real"
    meta_file = out / "meta.json"
    if meta_file.is_file():
        old = _read_json(meta_file, "--out")
        if (not isinstance(old, dict) or {k: old.get(k) for k in meta} != meta
                or old.get("window", "padded") != window):
            raise CacheError(f"--out: {out} holds a cache with other settings or another encoder "
                             f"(fingerprint {old.get('fingerprint') if isinstance(old, dict) else None}, "
                             f"this one {meta['fingerprint']}); "
                             f"use a new folder")
    if process_index == 0:
        try:  # atomic: a full disk or a kill never leaves a cut meta.json / keys.json
            write_atomic(out / "keys.json", json.dumps(keys).encode())
            write_atomic(meta_file, json.dumps(meta, indent=1).encode())
        except OSError as e:
            raise CacheError(f"--out: cannot write {out}: {os_error_line(e)}") from None

    devices = jax.local_devices()
    mesh = make_mesh({"data": len(devices)}, devices)
    in_sh = NamedSharding(mesh, P("data"))
    graphdef, state = nnx.split(encoder)
    out_dt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32

    @jax.jit
    def encode(state, mel):
        return nnx.merge(graphdef, state)(mel).astype(out_dt)

    per = -(-batch // len(devices)) * len(devices)  # a multiple of the local device count
    samples = getattr(load_mel, "samples", None)

    def save_frames(i: int, shard_keys: list[str]) -> None:
        real = np.array([cfg.max_source_positions if samples is None else
                         audio_lib.encoder_frames(samples(k), cfg.max_source_positions) for k in shard_keys],
                        np.int32)
        tmp = out / f".tmp-{i:05d}-{os.getpid()}.npy"
        np.save(tmp, real)
        os.replace(tmp, _frames_path(out, i))

    mine = [i for i in range(meta["shards"]) if i % process_count == process_index]
    todo = [i for i in mine if not _shard_path(out, i).is_file()]
    rebuilt = []
    for i in [i for i in mine if i not in todo]:  # finished shards: whole and unchanged?
        bad = shard_problem(out, meta, i, checksum=True)
        if bad:
            print(f"warning: {out}/{bad}; rebuilding it", file=sys.stderr, flush=True)
            _shard_path(out, i).unlink()
            rebuilt.append(i)
    todo = sorted(todo + rebuilt)
    for i in todo:  # partial writes of a killed run
        for stale in out.glob(f".tmp-{i:05d}-*"):
            stale.unlink(missing_ok=True)
    # shards built before the cache recorded audio lengths
    older = [i for i in mine if i not in todo and not _frames_path(out, i).is_file()] if samples else []
    for i in tqdm(older, desc="encoder cache lengths (older shards)", unit="shard", disable=not progress):
        save_frames(i, keys[i * shard_size:(i + 1) * shard_size])
    bar = tqdm(total=len(todo), desc="encoder cache shards", unit="shard", disable=not progress)
    for i in todo:
        shard_keys = keys[i * shard_size:(i + 1) * shard_size]
        # a real window is each clip's own (its length, rounded up): batches group clips of one window
        wins = ([audio_lib.real_window([audio_lib.encoder_frames(samples(k), cfg.max_source_positions)],
                                       2 * cfg.max_source_positions) for k in shard_keys]
                if window == "real" else [2 * cfg.max_source_positions] * len(shard_keys))
        chunks = []
        for w in sorted(set(wins)):
            same = [r for r in range(len(shard_keys)) if wins[r] == w]
            chunks += [same[j:j + per] for j in range(0, len(same), per)]
        rows: list = [None] * len(shard_keys)
        for idx in chunks:
            mels = np.stack([load_mel(shard_keys[r]) for r in idx]).astype(np.float32)[..., :wins[idx[0]]]
            n = len(mels)
            if n < per:
                mels = np.concatenate([mels, np.zeros((per - n,) + mels.shape[1:], np.float32)])
            enc = np.asarray(encode(state, jax.device_put(mels, in_sh)))[:n]
            if enc.shape[1] < shape[0]:  # a real window: the frames past it are zeros, as the format has them
                enc = np.concatenate([enc, np.zeros((n, shape[0] - enc.shape[1], shape[1]), enc.dtype)], 1)
            for r, e in zip(idx, enc):
                rows[r] = e
        arr = np.stack(rows)
        if dtype == "bfloat16":
            arr = arr.view(np.uint16)  # .npy has no bfloat16: store the bits
        tmp = out / f".tmp-{i:05d}-{os.getpid()}.npy"
        try:
            save_frames(i, shard_keys)  # before the shard: a whole shard has its lengths
            np.save(tmp, arr)
            tmp_sum = out / f".tmp-{i:05d}-{os.getpid()}.sum.json"
            tmp_sum.write_text(json.dumps({"bytes": tmp.stat().st_size, "sha256": _sha256(tmp)}))
            os.replace(tmp_sum, _sum_path(out, i))  # the checksum before its shard
            os.replace(tmp, _shard_path(out, i))  # atomic: a kill leaves whole shards only
        except OSError as e:  # e.g. a full disk: nothing half-written stays under a shard's name
            for stale in out.glob(f".tmp-{i:05d}-*"):
                stale.unlink(missing_ok=True)
            raise CacheError(f"--out: cannot write shard {i} of {out}: {os_error_line(e)}") from None
        bar.update(1)
    bar.close()
    return {"built": len(todo), "skipped": len(mine) - len(todo), "frames_added": len(older),
            "rebuilt": len(rebuilt)}


class _MelLoader:
    def __init__(self, encoder_cfg, first: dict, sample_rate: int):
        self.cfg, self.first, self.sample_rate = encoder_cfg, first, sample_rate
        self.lengths: dict[str, int] = {}

    def __call__(self, key: str) -> np.ndarray:
        src, i = self.first[key]
        wav = rec_lib.load_audio_of(src[i], self.sample_rate)
        self.lengths[key] = int(wav.size)
        wav = audio_lib.pad_or_trim(wav, audio_lib.N_SAMPLES)
        return audio_lib.log_mel_spectrogram(wav, self.cfg.num_mel_bins)[:, :self.cfg.num_frames]

    def samples(self, key: str) -> int:
        """The sample count of `key`'s audio (noted when its mel was computed, else read)."""
        if key not in self.lengths:
            src, i = self.first[key]
            return int(rec_lib.load_audio_of(src[i], self.sample_rate).size)
        return self.lengths.pop(key)


def mel_loader(encoder_cfg, sources, sample_rate: int = 16000) -> Callable[[str], np.ndarray]:
    """key -> (n_mels, frames) mel of the first record with that audio (the pipeline's front end:
    30 s pad/trim, host log-mel, cut to the encoder's frames for test-sized encoders); its
    `.samples(key)` gives the audio's length before padding."""
    first: dict[str, tuple] = {}
    for src in sources:
        for i, k in enumerate(src.index().audio_key):
            first.setdefault(str(k), (src, i))
    return _MelLoader(encoder_cfg, first, sample_rate)


if __name__ == "__main__":  # the command is esrt_jax.cli.encode_cache (it builds the model: top layer)
    import runpy

    runpy.run_module("esrt_jax.cli.encode_cache", run_name="__main__", alter_sys=True)
