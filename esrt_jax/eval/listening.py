"""Does the model listen? Output diversity and the score lost when the audio is swapped.

A speech LLM whose LLM ignores the adapter (the classic collapse of speech-LLM training) still
emits fluent text: its sentence prior. BLEU/WER alone do not say whether the output follows the
audio, so every report carries two diagnostics:

- **distinct**: distinct hypotheses / distinct references, per direction (and overall). A model
  that answers every clip of a direction with the same sentence has 1/n; one that follows the
  audio has 1.0 (the share is capped at 1: one sentence spoken by two voices and decoded two ways
  counts as one, `esrt_jax.metrics.distinct_share`).
- **audio gain**: the same records decoded a second time with each utterance's audio replaced by
  another utterance of the same source language with a different reference transcription
  (`swap_partners`), scored against the real references: BLEU gain = BLEU(real audio) -
  BLEU(swapped audio), WER gain = WER(swapped) - WER(real). A model that ignores the audio gives
  the same outputs either way: gains ~0. A model that listens outputs the other clip's sentence:
  large gains.

`eval.py` writes the swapped decode next to the results (`swapped_path`); scoring a results file
picks it up when present.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Iterable, Optional, Sequence

from esrt_jax.metrics import Scores, clean_segment, distinct_share, normalize_transcript
from esrt_jax.pytree import swap_partners as swap_rule

__all__ = ["Listening", "distinct_counts", "pick_examples", "swap_partners", "swapped_path", "listening",
           "normalize"]


def swapped_path(results: str | Path) -> Path:
    """Where the swapped-audio decode of `results` lives: `<stem>.swapped.jsonl` next to it."""
    p = Path(results)
    return p.with_name(p.stem + ".swapped.jsonl")


def _output(rec) -> tuple[str, str]:
    return (clean_segment(rec.asr_hyp or ""), clean_segment(rec.hyp or ""))


def _reference(rec) -> tuple[str, str]:
    return (clean_segment(rec.asr_ref or ""), clean_segment(rec.ref or ""))


def distinct_counts(records: Iterable) -> dict[tuple[str, str], tuple[int, int, int]]:
    """(src, tgt) -> (records, distinct hypotheses, distinct references); results.Record-like input
    (`src, tgt, asr_hyp, hyp, asr_ref, ref`). ASR-only records have src == tgt."""
    groups: dict[tuple[str, str], list] = {}
    for r in records:
        groups.setdefault((r.src, r.tgt), []).append(r)
    return {k: (len(v), len({_output(r) for r in v}), len({_reference(r) for r in v}))
            for k, v in groups.items()}


def swap_partners(paths: Sequence[str], src: Sequence[str], transcripts: Sequence[str]) -> dict[str, str]:
    """Audio path -> the path whose audio replaces it in the swapped decode: the swap rule
    (`esrt_jax.pytree.swap_partners`) over the distinct paths in first-appearance order, grouped
    by source language, references compared after Whisper's normaliser (`normalize_transcript`).
    """
    first: dict[str, int] = {}
    for i, p in enumerate(paths):
        first.setdefault(p, i)
    rows = list(first.values())
    partner = swap_rule([normalize_transcript(transcripts[i]) for i in rows], [src[i] for i in rows])
    return {paths[i]: paths[rows[int(k)]] for i, k in zip(rows, partner)}


def normalize(text: str) -> str:
    """Case- and whitespace-insensitive form, for comparing transcriptions."""
    return " ".join(text.lower().split())


@dataclasses.dataclass(frozen=True)
class Listening:
    """Listening diagnostics of one scored results file (see the module doc)."""

    distinct: dict[tuple[str, str], tuple[int, int, int]]  # (src, tgt) -> (n, distinct hyps, distinct refs)
    bleu: Optional[float]          # average BLEU over directions, real audio
    wer: Optional[float]           # average ASR error (WER/CER %), real audio
    bleu_swapped: Optional[float]  # the same with swapped audio (None: no swapped decode)
    wer_swapped: Optional[float]
    swapped_records: int = 0
    # A few records per direction: {"id", "src", "tgt", "ref", "hyp", "swapped"} (swapped: the
    # output for the same prompt with another clip's audio, None without a swapped decode).
    examples: tuple = ()

    @staticmethod
    def share(n_hyp: int, n_ref: int) -> float:
        return distinct_share(n_hyp, n_ref)

    def distinct_share(self, key: tuple[str, str] | None = None) -> Optional[float]:
        """Distinct hypotheses / distinct references of one direction, or pooled over all."""
        if key is not None:
            _, h, r = self.distinct[key]
            return self.share(h, r)
        if not self.distinct:
            return None
        # each direction's excess is capped first, so that it cannot hide another's collapse
        return self.share(sum(min(h, r) for _, h, r in self.distinct.values()),
                          sum(r for _, _, r in self.distinct.values()))

    @property
    def bleu_gain(self) -> Optional[float]:
        return _diff(self.bleu, self.bleu_swapped)

    @property
    def wer_gain(self) -> Optional[float]:
        return _diff(self.wer_swapped, self.wer)

    def to_dict(self) -> dict:
        r = lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else round(v, 3)  # noqa: E731
        return {
            "distinct_share": r(self.distinct_share()),
            "per_direction": {f"{s}-{t}": {"n": n, "distinct_hyps": h, "distinct_refs": d,
                                           "share": r(self.share(h, d))}
                              for (s, t), (n, h, d) in self.distinct.items()},
            "bleu": r(self.bleu), "bleu_swapped": r(self.bleu_swapped), "bleu_gain": r(self.bleu_gain),
            "wer": r(self.wer), "wer_swapped": r(self.wer_swapped), "wer_gain": r(self.wer_gain),
            "swapped_records": self.swapped_records,
            "examples": list(self.examples),
        }

    def terminal_examples(self) -> list[str]:
        out = []
        if self.examples:
            swap = " / hyp with another clip's audio" if self.swapped_records else ""
            out.append(f"examples (ref / hyp{swap}; = exact, ≠ not):")
        for e in self.examples:
            ok = "=" if normalize(e["hyp"]) == normalize(e["ref"]) else "≠"
            out.append(f"  {e['id']} {e['src']}->{e['tgt']}")
            out.append(f"    ref:  {e['ref']}")
            out.append(f"    hyp{ok} {e['hyp']}")
            if e["swapped"] is not None:
                out.append(f"    swap: {e['swapped']}")
        return out

    def markdown_examples(self) -> list[str]:
        if not self.examples:
            return []
        swap = self.swapped_records > 0
        lines = ["| id | direction | reference | hypothesis |" + (" hypothesis, another clip's audio |" if swap else ""),
                 "|---|---|---|---|" + ("---|" if swap else "")]
        cell = lambda t: t.replace("|", "\\|")  # noqa: E731
        for e in self.examples:
            lines.append(f"| {e['id']} | {e['src']}→{e['tgt']} | {cell(e['ref'])} | {cell(e['hyp'])} |"
                         + (f" {cell(e['swapped'] or '')} |" if swap else ""))
        return lines

    def lines(self) -> list[str]:
        """Terminal / markdown sentences."""
        parts = [f"distinct outputs {_fmt(self.distinct_share(), 2)} of distinct references"]
        worst = sorted(self.distinct, key=lambda k: self.distinct_share(k))[:3]
        if worst:
            parts[0] += " (lowest: " + ", ".join(
                f"{s}->{t} {self.distinct[(s, t)][1]}/{self.distinct[(s, t)][2]}" if s != t else
                f"{s} ASR {self.distinct[(s, t)][1]}/{self.distinct[(s, t)][2]}" for s, t in worst) + ")"
        if self.bleu_swapped is None and self.wer_swapped is None:
            gain = "audio gain: not measured (no swapped-audio decode next to the results)"
        else:
            g = []
            if self.bleu is not None and self.bleu_swapped is not None:
                g.append(f"BLEU {_fmt(self.bleu)} real vs {_fmt(self.bleu_swapped)} swapped = gain {_fmt(self.bleu_gain)}")
            if self.wer is not None and self.wer_swapped is not None:
                g.append(f"WER {_fmt(self.wer)} real vs {_fmt(self.wer_swapped)} swapped = gain {_fmt(self.wer_gain)}")
            gain = "audio gain (each clip's audio replaced by another clip's): " + "; ".join(g)
        return ["listening: " + parts[0], gain]


def _diff(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else a - b


def _fmt(v: Optional[float], nd: int = 1) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def _text(asr: Optional[str], s2tt: Optional[str]) -> str:
    return " | ".join(clean_segment(t) for t in (asr, s2tt) if t is not None)


def pick_examples(records: Sequence, swapped_records: Sequence = (), per_direction: int = 2,
                  limit: int = 12) -> tuple:
    """The first `per_direction` records of each direction (at most `limit`), with their swapped
    output when there is one."""
    swapped = {(r.id, r.src, r.tgt): r for r in swapped_records}
    count: dict[tuple[str, str], int] = {}
    out = []
    for r in records:
        k = (r.src, r.tgt)
        if count.get(k, 0) >= per_direction or len(out) >= limit:
            continue
        count[k] = count.get(k, 0) + 1
        sw = swapped.get((r.id, r.src, r.tgt))
        out.append({"id": r.id, "src": r.src, "tgt": r.tgt, "ref": _text(r.asr_ref, r.ref),
                    "hyp": _text(r.asr_hyp, r.hyp), "swapped": None if sw is None else _text(sw.asr_hyp, sw.hyp)})
    return tuple(out)


def listening(records: Sequence, scores: Scores, swapped: Optional[Scores] = None,
              swapped_records: Sequence = ()) -> Listening:
    """Listening diagnostics from the scored real-audio records (+ the scored swapped decode)."""
    return Listening(
        distinct=distinct_counts(records),
        bleu=scores.average("bleu") if scores.directions else None,
        wer=scores.asr_average() if scores.asr else None,
        bleu_swapped=(swapped.average("bleu") if swapped.directions else None) if swapped else None,
        wer_swapped=(swapped.asr_average() if swapped.asr else None) if swapped else None,
        swapped_records=len(swapped_records),
        examples=pick_examples(records, swapped_records),
    )
