"""Long recordings: join the outputs of a recording's windows (`esrt_jax.audio.find_segments`).

Every path that takes audio (the inference CLI, the edge client, eval) cuts a recording longer
than the encoder's window into segments, runs each segment as an utterance, and joins the texts
here, in order: with a space, or with nothing for languages written without spaces
(`languages.CHAR_LANGS`). Where two segments overlap (speech longer than a window, cut with a
small overlap) the words (characters) the second segment repeats from the end of the first are
dropped: the longest such run of up to `MAX_REPEAT` words (2 x that many characters).
"""

from __future__ import annotations

import string
from typing import Sequence

from esrt_jax import languages
from esrt_jax.audio import Segment

MAX_REPEAT = 6


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
