"""Batch inference on files, both halves or one: the library behind `python -m esrt_jax.infer`.

`utterances` reads --audio files / a JSONL of records; `encode_segments` (edge half: audio ->
segments -> mel -> features), `decode_features` (cloud half: features -> text), `join_segments`
(a recording's segments -> one result) and `translate` (all three) work on any object with the
`Translator` interface; `write_embeds` / `read_embeds` are the edge-only files (JSONL of base64
payloads, one raw payload, or .npz of float32 features, one row per segment with its times),
every payload checked against the loaded model on reading.

Long recordings: a recording longer than the encoder's window is cut into segments
(`esrt_jax.audio.find_segments`); each segment is an `Utterance` with its `start`/`end` seconds and
its `part` number, decoded like any utterance, and `join_segments` joins a recording's parts into
one result {..., "transcription", "translation", "segments": [{"start", "end", "transcription",
"translation"}]} (`esrt_jax.infer.longform`). `segment=False` cuts each recording to one window
instead (with a warning when that drops audio).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from esrt_jax import languages
from esrt_jax.audio import SAMPLE_RATE, Segment
from esrt_jax.data.records import SourceError, read_jsonl
from esrt_jax.data.tasks import DEFAULT_TASK
from esrt_jax.infer import longform
from esrt_jax.infer import payload as pl


class InferError(ValueError):
    """Bad CLI input: names the file / record and the problem."""


@dataclasses.dataclass(frozen=True)
class Utterance:
    id: str
    audio: str
    src: str
    tgt: str
    transcription: str = ""   # references, when the JSONL has them
    translation: str = ""
    start: float | None = None  # a segment of the recording: its times in seconds, its number
    end: float | None = None
    part: int = 0

    @property
    def segment(self) -> Segment:
        return Segment(round(self.start * SAMPLE_RATE), round(self.end * SAMPLE_RATE))


# ----------------------------------------------------------------------------- inputs


def utterances(audio: Sequence[str] = (), jsonl: str | None = None, src: str | None = None,
               tgt: str | None = None) -> list[Utterance]:
    """--audio files (all with --src/--tgt) and/or a JSONL of records (each with its own src/tgt)."""
    out: list[Utterance] = []
    if audio:
        if not src or not tgt:
            raise InferError("--audio needs --src and --tgt")
        s, t = languages.get(src).code, languages.get(tgt).code
        out += [Utterance(Path(a).stem, str(a), s, t) for a in audio]
    if jsonl:
        try:  # the reader training and eval use; inference input needs no reference texts
            lines = read_jsonl(jsonl, references=False)
        except SourceError as e:
            raise InferError(str(e)) from None
        for ln in lines:
            r = ln.record
            if r is None:
                raise InferError(f"{ln.where}: {ln.error}")
            try:
                s, t = languages.get(r.src).code, languages.get(r.tgt).code
            except languages.LanguageError as e:
                raise InferError(f"{ln.where}: {e}") from None
            out.append(Utterance(r.id, r.audio, s, t, r.transcription, r.translation))
    if not out:
        raise InferError("nothing to do: give --audio FILE(s) or --jsonl FILE")
    return out


def encode_utterances(translator, utts: Sequence[Utterance], batch_size: int = 8) -> np.ndarray:
    """The edge half, one window per utterance (no segmentation: longer audio is cut, with a
    warning): audio files -> features (N, *feature_shape) float32."""
    enc = translator.config.encoder
    windows = (longform.clip_windows(u.audio, enc.num_mel_bins, enc.num_frames, segment=False) for u in utts)
    return longform.encode_windows(translator.encode, ((m, f) for m, _, f in windows), batch_size)


def encode_segments(translator, utts: Sequence[Utterance], batch_size: int = 8, *, segment: bool = True
                    ) -> tuple[np.ndarray, list[Utterance]]:
    """The edge half on recordings of any length: audio files -> (features (M, *feature_shape),
    the M segments as `Utterance`s with start/end/part), each file read once
    (`longform.clip_windows`, encoded as they come by `longform.encode_windows`). AudioError (a
    ValueError) names the file for empty, silent or unreadable audio."""
    enc = translator.config.encoder
    segs: list[Utterance] = []

    def windows():
        for u in utts:
            mels, spans, frames = longform.clip_windows(u.audio, enc.num_mel_bins, enc.num_frames, segment=segment)
            segs.extend(dataclasses.replace(u, start=round(s.start_s, 3), end=round(s.end_s, 3), part=k)
                        for k, s in enumerate(spans))
            yield mels, frames

    return longform.encode_windows(translator.encode, windows(), batch_size), segs


def decode_features(translator, feats: np.ndarray, utts: Sequence[Utterance], batch_size: int = 8,
                    task: str = DEFAULT_TASK) -> list[dict]:
    """The cloud half: features (N, ...) -> result dicts, in the order of `utts` (segments get
    their "start"/"end" too; `join_segments` joins them)."""
    results = []
    for i in range(0, len(utts), batch_size):
        chunk = utts[i:i + batch_size]
        outs = translator.decode(feats[i:i + batch_size], [u.src for u in chunk], [u.tgt for u in chunk],
                                 task=task)
        for u, o in zip(chunk, outs):
            r = {"id": u.id, "audio": u.audio, "src": u.src, "tgt": u.tgt,
                 "transcription": o["transcription"], "translation": o["translation"]}
            if u.start is not None:
                r.update(start=u.start, end=u.end)
            results.append(r)
    return results


def join_segments(results: Sequence[dict], utts: Sequence[Utterance]) -> list[dict]:
    """`decode_features` rows of segments -> one row per recording (a new one at each part 0):
    the texts joined in order, "segments" listing each part's times and texts. Rows without
    times (a raw payload) pass through unchanged."""
    out: list[dict] = []
    group: list[tuple[dict, Utterance]] = []

    def flush():
        if group:
            first = {k: v for k, v in group[0][0].items() if k not in ("start", "end")}
            segs = [u.segment for _, u in group]
            out.append({**first, **longform.join_outputs(segs, [r for r, _ in group], first["src"], first["tgt"])})
            group.clear()

    for r, u in zip(results, utts, strict=True):
        if u.start is None:
            flush()
            out.append(r)
            continue
        if u.part == 0:
            flush()
        check_segment_order(group[-1][1] if group else None, u)
        group.append((r, u))
    flush()
    return out


def check_segment_order(prev: Utterance | None, u: Utterance) -> None:
    """Segments of a recording come in order: part 0 starts it, part k + 1 follows part k of the
    same recording (same id and audio, not earlier); else an InferError naming both (lines out of
    order would be joined into wrong texts)."""
    if prev is None and u.part != 0:
        raise InferError(f"segment {u.part} of {u.id} ({u.audio}) comes before its part 0: the segments "
                         f"of a recording must be in order (parts 0, 1, ...)")
    if prev is not None and u.part != 0 and (
            u.part != prev.part + 1 or (u.id, u.audio) != (prev.id, prev.audio) or u.start < prev.start):
        raise InferError(f"segment {u.part} of {u.id} ({u.audio}, {u.start} s) follows segment {prev.part} of "
                         f"{prev.id} ({prev.audio}, {prev.start} s): the segments of a recording must be "
                         f"in order (parts 0, 1, ...), one recording after the other")


def translate(translator, utts: Sequence[Utterance], batch_size: int = 8, task: str = DEFAULT_TASK, *,
              segment: bool = True) -> list[dict]:
    """Both halves in one process, recordings of any length -> one joined result each."""
    feats, segs = encode_segments(translator, utts, batch_size, segment=segment)
    return join_segments(decode_features(translator, feats, segs, batch_size, task), segs)


# ----------------------------------------------------------------------------- edge-only files


def write_embeds(path: str | Path, feats: np.ndarray, utts: Sequence[Utterance], *, fingerprint: str,
                 split: str, scheme: str = "fp16", compress: bool = False) -> Path:
    """Write the edge's output (see the module docstring for the three formats)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        nan = float("nan")
        np.savez(path, features=np.asarray(feats, np.float32), ids=np.array([u.id for u in utts]),
                 audio=np.array([u.audio for u in utts]), src=np.array([u.src for u in utts]),
                 tgt=np.array([u.tgt for u in utts]), fingerprint=np.array(fingerprint), split=np.array(split),
                 start=np.array([nan if u.start is None else u.start for u in utts], np.float64),
                 end=np.array([nan if u.end is None else u.end for u in utts], np.float64),
                 part=np.array([u.part for u in utts], np.int64))
        return path
    blobs = [pl.encode(f, fingerprint=fingerprint, split=split, scheme=scheme, compress=compress) for f in feats]
    if path.suffix == ".jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for u, b in zip(utts, blobs):
                times = {} if u.start is None else {"start": u.start, "end": u.end, "part": u.part}
                f.write(json.dumps({"id": u.id, "audio": u.audio, "src": u.src, "tgt": u.tgt, **times,
                                    "payload": base64.b64encode(b).decode()}, ensure_ascii=False) + "\n")
        return path
    if len(blobs) != 1:
        raise InferError(f"{path}: a raw payload file holds one utterance of one segment, got {len(blobs)} "
                         f"segments; name the output *.jsonl (or *.npz) for many (or a long recording)")
    path.write_bytes(blobs[0])
    return path


def read_embeds(path: str | Path, *, fingerprint: str, split: str, shape: tuple[int, ...],
                src: str | None = None, tgt: str | None = None) -> tuple[np.ndarray, list[Utterance]]:
    """Read an --edge-only file, checking every payload against the model -> (features, utts)."""
    path = Path(path)
    if not path.is_file():
        raise InferError(f"{path}: file does not exist")
    data = path.read_bytes()
    if data.startswith(pl.MAGIC):
        if not src or not tgt:
            raise InferError(f"{path}: a raw payload carries no languages; pass --src and --tgt")
        p = _decode_payload(data, path, fingerprint, split, shape)
        return p[None], [Utterance(path.stem, "", languages.get(src).code, languages.get(tgt).code)]
    if data.startswith(b"PK"):  # .npz (zip)
        try:
            z = np.load(path, allow_pickle=False)
            fp, sp, feats = str(z["fingerprint"]), str(z["split"]), z["features"]
            meta = [z[k] for k in ("ids", "audio", "src", "tgt")]
            n = len(feats)  # segment times: absent from files written before long-form support
            times = [z[k] if k in z else np.full(n, d) for k, d in (("start", np.nan), ("end", np.nan), ("part", 0))]
        except (ValueError, KeyError, OSError, zipfile.BadZipFile) as e:
            raise InferError(f"{path}: not an --edge-only .npz ({type(e).__name__}: {e})") from None
        if fp != fingerprint or sp != split:
            raise InferError(f"{path}: features were made by model {fp} split {sp}, "
                             f"the loaded model is {fingerprint} split {split}")
        if feats.ndim < 1 or any(np.ndim(m) != 1 for m in meta + times):  # e.g. a 0-d `ids`
            bad = [k for k, m in zip(("ids", "audio", "src", "tgt", "start", "end", "part"), meta + times)
                   if np.ndim(m) != 1] or ["features"]
            raise InferError(f"{path}: not an --edge-only .npz ({bad[0]} must be a 1-d array, one entry per segment)")
        if feats.shape[1:] != tuple(shape) or not all(len(m) == len(feats) for m in meta + times):
            raise InferError(f"{path}: features of shape {feats.shape[1:]} do not match the model's {tuple(shape)}")
        if not np.issubdtype(feats.dtype, np.floating) or not np.all(np.isfinite(feats)):
            raise InferError(f"{path}: features contain NaN or Inf (or are not floats)")
        try:
            utts = [Utterance(str(i), str(a), languages.get(str(s)).code, languages.get(str(t)).code,
                              **_times(b, e, k))
                    for i, a, s, t, b, e, k in zip(*meta, *times)]
        except ValueError as e:  # LanguageError, bad segment times
            raise InferError(f"{path}: {e}") from None
        return feats.astype(np.float32), utts
    feats, utts = [], []
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            blob = base64.b64decode(r["payload"], validate=True)
            u = Utterance(str(r.get("id", n)), str(r.get("audio", "")), languages.get(r["src"]).code,
                          languages.get(r["tgt"]).code, **_times(r.get("start"), r.get("end"), r.get("part", 0)))
        except (ValueError, KeyError, TypeError) as e:
            raise InferError(f"{path}:{n}: not an edge-features record ({type(e).__name__}: {e})") from None
        feats.append(_decode_payload(blob, f"{path}:{n}", fingerprint, split, shape))
        utts.append(u)
    if not utts:
        raise InferError(f"{path}: no records")
    return np.stack(feats), utts


def _times(start, end, part) -> dict:
    """Segment times read from an edge-only file -> Utterance fields (none: not a segment)."""
    if start is None or end is None or not (np.isfinite(float(start)) and np.isfinite(float(end))):
        return {}
    start, end, part = float(start), float(end), int(part)
    if not 0 <= start < end or part < 0:
        raise ValueError(f"bad segment times start={start} end={end} part={part}")
    return {"start": start, "end": end, "part": part}


def _decode_payload(blob: bytes, where, fingerprint, split, shape) -> np.ndarray:
    try:
        return pl.decode(blob, fingerprint=fingerprint, split=split, shape=tuple(shape),
                         max_bytes=max(len(blob), pl.DEFAULT_MAX_BYTES)).features
    except pl.PayloadError as e:
        raise InferError(f"{where}: {e}") from None


def check_trained(utts: Sequence[Utterance], trained: Sequence[str] | None) -> None:
    """Every utterance's src/tgt must be a language the model was trained on."""
    for u in utts:
        try:
            languages.check_trained(trained, u.src, u.tgt)
        except languages.NotTrainedError as e:
            raise InferError(f"{u.id}: {e}") from None
