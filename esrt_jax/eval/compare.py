"""Comparing two scored results files direction by direction (the papers' "better in X of Y").

Translation metrics: higher is better. ASR (WER/CER): lower is better. Two scores that agree
to the reported precision (|delta| < 0.005) are a tie.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from esrt_jax.metrics import Scores, mean

__all__ = ["DirectionDelta", "LanguageDelta", "Comparison", "compare_scores", "TIE_EPS"]

TIE_EPS = 0.005


def _outcome(delta: float, higher_is_better: bool = True) -> str:
    if abs(delta) < TIE_EPS:
        return "tie"
    return "win" if (delta > 0) == higher_is_better else "loss"


@dataclasses.dataclass(frozen=True)
class DirectionDelta:
    src: str
    tgt: str
    a: float
    b: float
    delta: float  # a - b
    chrf_a: float
    chrf_b: float
    chrf_delta: float
    outcome: str  # win | loss | tie, for A by the primary metric


@dataclasses.dataclass(frozen=True)
class LanguageDelta:
    lang: str
    metric: str  # wer | cer
    a: float
    b: float
    delta: float  # a - b (negative = A better)
    outcome: str


@dataclasses.dataclass
class Comparison:
    metric: str
    deltas: list[DirectionDelta]
    asr: list[LanguageDelta]
    only_a: list[tuple[str, str]]
    only_b: list[tuple[str, str]]

    def count(self, outcome: str) -> int:
        return sum(1 for d in self.deltas if d.outcome == outcome)

    @property
    def wins(self) -> int:
        return self.count("win")

    @property
    def losses(self) -> int:
        return self.count("loss")

    @property
    def ties(self) -> int:
        return self.count("tie")

    @property
    def mean_delta(self) -> Optional[float]:
        return mean(d.delta for d in self.deltas)

    def asr_count(self, outcome: str) -> int:
        return sum(1 for d in self.asr if d.outcome == outcome)

    def sentence(self, name_a: str = "A", name_b: str = "B") -> str:
        n = len(self.deltas)
        s = (
            f"{name_a} is better than {name_b} in {self.wins} of {n} directions by {self.metric.upper()} "
            f"(worse in {self.losses}, tied in {self.ties})"
        )
        if self.mean_delta is not None:
            s += f"; mean delta {self.mean_delta:+.2f}"
        if self.asr:
            s += (
                f"; ASR better in {self.asr_count('win')} of {len(self.asr)} languages "
                f"(worse in {self.asr_count('loss')}, tied in {self.asr_count('tie')})"
            )
        return s

    def to_dict(self, name_a: str = "A", name_b: str = "B") -> dict:
        return {
            "a": name_a,
            "b": name_b,
            "metric": self.metric,
            "directions": len(self.deltas),
            "wins": self.wins,
            "losses": self.losses,
            "ties": self.ties,
            "mean_delta": self.mean_delta,
            "only_in_a": [f"{s}-{t}" for s, t in self.only_a],
            "only_in_b": [f"{s}-{t}" for s, t in self.only_b],
            "asr": {
                "languages": len(self.asr),
                "wins": self.asr_count("win"),
                "losses": self.asr_count("loss"),
                "ties": self.asr_count("tie"),
                "per_language": {d.lang: {"metric": d.metric, "a": d.a, "b": d.b, "delta": d.delta} for d in self.asr},
            },
            "sentence": self.sentence(name_a, name_b),
        }


def compare_scores(a: Scores, b: Scores, metric: str = "bleu") -> Comparison:
    """Per-direction deltas A - B over the directions both files have, and ASR per language."""
    if metric not in ("bleu", "chrf", "spbleu"):
        raise ValueError(f"compare metric must be bleu, chrf or spbleu, got {metric!r}")
    deltas = []
    for key, da in a.directions.items():
        db = b.directions.get(key)
        if db is None:
            continue
        va, vb = getattr(da, metric), getattr(db, metric)
        if va is None or vb is None:
            continue
        deltas.append(
            DirectionDelta(
                src=key[0], tgt=key[1], a=va, b=vb, delta=va - vb,
                chrf_a=da.chrf, chrf_b=db.chrf, chrf_delta=da.chrf - db.chrf,
                outcome=_outcome(va - vb),
            )
        )  # fmt: skip
    asr = []
    for lang, la in a.asr.items():
        lb = b.asr.get(lang)
        if lb is None:
            continue
        d = la.error - lb.error
        asr.append(LanguageDelta(lang=lang, metric=la.metric, a=la.error, b=lb.error, delta=d, outcome=_outcome(d, False)))
    only_a = [k for k in a.directions if k not in b.directions]
    only_b = [k for k in b.directions if k not in a.directions]
    return Comparison(metric=metric, deltas=deltas, asr=asr, only_a=only_a, only_b=only_b)
