"""Long recordings: the one long-form orchestration, segment -> encode -> decode -> join.

Every path that takes audio (the inference CLI `infer.batch`, the edge client `edge`, eval
`eval.decode`) runs a recording through the same three steps here, and only its driver differs
(batching across files, resuming, HTTP): `clip_windows` cuts a recording longer than the encoder's
window into segments (`esrt_jax.audio.find_segments`) -> their log-mel windows and real encoder
frames; `encode_windows` encodes the windows of one or many recordings a fixed number of rows at a
time, as they come; each segment is then decoded as an utterance and `join_outputs` joins a
recording's texts, in order: with a space, or with nothing for languages written without spaces
(`languages.CHAR_LANGS`). Where two segments overlap (speech longer than a window, cut with a
small overlap) the words (characters) the second segment repeats from the end of the first are
dropped: the longest such run of up to `MAX_REPEAT` words (2 x that many characters).

`empty_decodes` is the one rule for outputs that decoded to nothing, on both command lines (infer,
edge): an empty text (a recording's, or one segment's of a longer recording) is a warning line; a
run in which every output is empty is an error with exit status `EMPTY_RC`, since a model that
decodes nothing at all (damaged or untrained weights) must not look like a success.
"""

from __future__ import annotations

import os
import string
from typing import Callable, Iterable, Sequence

import numpy as np

from esrt_jax import languages
from esrt_jax.audio import Segment, encoder_frames, mel_segments

MAX_REPEAT = 6
EMPTY_RC = 3  # exit status of `python -m esrt_jax.infer` / `esrt_jax.edge` when every output is empty


def clip_windows(path: str | os.PathLike, n_mels: int, num_frames: int, *, segment: bool = True
                 ) -> tuple[np.ndarray, list[Segment], np.ndarray]:
    """Audio file -> (log-mel (S, n_mels, num_frames), its S segments in time order, real encoder
    frames (S,) int32 of each (`audio.encoder_frames`: what an adapter with attend_padding false
    reads)). `segment=False`: one window, longer audio cut to it with a warning. AudioError (a
    ValueError) names the file for empty, silent or unreadable audio."""
    mels, segs = mel_segments(path, n_mels, num_frames, segment=segment)
    return mels, segs, window_frames(segs, num_frames)


def window_frames(segs: Sequence[Segment], num_frames: int) -> np.ndarray:
    """Segments -> the real encoder frames (S,) int32 of each, in an encoder of `num_frames` mel
    frames (num_frames // 2 encoder frames)."""
    return np.array([encoder_frames(s.end - s.start, num_frames // 2) for s in segs], np.int32)


def encode_windows(encode: Callable[..., np.ndarray],
                   windows: Iterable[tuple[np.ndarray, np.ndarray | None]], batch: int) -> np.ndarray:
    """Encode the windows of one or many recordings `batch` rows at a time, as they come (bounded
    memory; batches span recordings): `windows` yields (inputs (S, ...), real encoder frames (S,)
    or None) per recording -> `encode(x, frames)` (`encode(x)` where frames are None) results
    concatenated, (sum S, *feature_shape) in order."""
    xs: list[np.ndarray] = []
    fs: list[np.ndarray | None] = []
    out: list[np.ndarray] = []

    def run(n: int) -> None:
        x = np.concatenate(xs)
        f = None if any(v is None for v in fs) else np.concatenate(fs)
        out.append(encode(x[:n]) if f is None else encode(x[:n], f[:n]))
        xs[:] = [x[n:]] if n < len(x) else []
        fs[:] = [] if not xs else [None if f is None else f[n:]]

    rows = 0
    for x, f in windows:
        xs.append(x)
        fs.append(f)
        rows += len(x)
        while rows >= batch:
            run(batch)
            rows -= batch
    if rows:
        run(rows)
    return np.concatenate(out)


def _norm(tok: str) -> str:
    return tok.strip(string.punctuation + "，。、！？「」").lower()


def join_texts(texts: Sequence[str], lang: str, overlaps: Sequence[bool] = ()) -> str:
    """Join per-segment texts in `lang`; `overlaps[i]`: segments i and i + 1 overlap in time."""
    char = languages.normalize(lang) in languages.CHAR_LANGS
    sep, limit = ("", 2 * MAX_REPEAT) if char else (" ", MAX_REPEAT)
    out: list[str] = []  # tokens so far
    for i, text in enumerate(texts):
        toks = list(text.strip()) if char else text.split()
        if out and i - 1 < len(overlaps) and overlaps[i - 1]:
            for k in range(min(limit, len(out), len(toks)), 0, -1):
                if [_norm(t) for t in out[-k:]] == [_norm(t) for t in toks[:k]]:
                    toks = toks[k:]
                    break
        out += toks
    return sep.join(out).strip()


def overlaps_of(segments: Sequence[Segment]) -> list[bool]:
    """For each pair of consecutive segments: does the second start before the first ends?"""
    return [b.start < a.end for a, b in zip(segments, segments[1:])]


def span(seg: Segment) -> dict:
    """{"start", "end"} in seconds (ms precision) for JSON output."""
    return {"start": round(seg.start_s, 3), "end": round(seg.end_s, 3)}


def join_outputs(segments: Sequence[Segment], outs: Sequence[dict], src: str, tgt: str) -> dict:
    """Per-segment {"transcription", "translation"} (in time order) -> the joined pair plus
    "segments": [{"start", "end", "transcription", "translation"}]."""
    if len(segments) != len(outs) or not outs:
        raise ValueError(f"{len(segments)} segments but {len(outs)} outputs")
    ov = overlaps_of(segments)
    return {"transcription": join_texts([o["transcription"] for o in outs], src, ov),
            "translation": join_texts([o["translation"] for o in outs], tgt, ov),
            "segments": [{**span(s), "transcription": o["transcription"], "translation": o["translation"]}
                         for s, o in zip(segments, outs)]}


def empty_decodes(results: Sequence[dict], key: str) -> tuple[list[str], str | None]:
    """(warning lines, error line or None) for the empty `key` texts ("translation" or
    "transcription") of a run's results ({"id"/"audio", key, "segments": [{"start", "end", key}]}):
    a warning per empty result and per empty segment of a non-empty one; when every result is
    empty, no warnings but one error line (the caller exits with `EMPTY_RC`)."""
    empty = lambda r: not str(r.get(key) or "").strip()  # noqa: E731
    if results and all(empty(r) for r in results):
        return [], (f"error: the model decoded an empty {key} for every input ({len(results)} of "
                    f"{len(results)}): damaged or untrained weights? (exit status {EMPTY_RC})")
    out = []
    for r in results:
        name = r.get("audio") or r.get("id")
        if empty(r):
            out.append(f"warning: {name}: the model decoded an empty {key}")
            continue
        segs = r.get("segments") or []
        out += [f"warning: {name}: segment {i} ({s['start']:.1f}-{s['end']:.1f} s) decoded an empty {key}"
                for i, s in enumerate(segs) if len(segs) > 1 and empty(s)]
    return out, None
