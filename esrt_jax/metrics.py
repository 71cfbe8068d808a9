"""Many-to-many speech-translation metrics, scored per direction as in the papers.

For every direction src -> tgt (src == tgt skipped):
- BLEU with sacrebleu, tokenised by the *target* language (`char` for cmn/zho, yue, jpn, kor,
  tha, lao, mya, khm; `13a` otherwise, from `esrt_jax.languages`);
- chrF++ (sacrebleu CHRF with word_order=2);
- spBLEU (sacrebleu `flores200` tokeniser) only when sentencepiece and the SentencePiece model
  are present locally: nothing is downloaded; otherwise `spbleu_status()` says why not.
ASR per source language (and per direction): WER, or CER for the character languages, with
jiwer after Whisper's `BasicTextNormalizer` (the same normaliser the original scripts use).

Averages follow the papers' N x (N-1) tables: the mean of per-direction scores over all
directions, per source language (X -> all) and per target language (all -> X).

Segments are scored one per line, so newlines inside a hypothesis or reference are turned into
spaces and the ends stripped (exactly what the sacrebleu command line sees for the same files).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Iterable, Optional, Sequence

import jiwer
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.tokenizers.tokenizer_spm import SPM_MODELS
from sacrebleu.utils import SACREBLEU_DIR
# Whisper's own normaliser (pure python; importing it does not import torch).
from transformers.models.whisper.english_normalizer import BasicTextNormalizer

from esrt_jax import languages

__all__ = [
    "DirectionScore",
    "LanguageASR",
    "Scores",
    "clean_segment",
    "normalize_transcript",
    "bleu",
    "chrf",
    "spbleu",
    "spbleu_status",
    "asr_error",
    "score_records",
    "mean",
    "distinct_share",
]


def clean_segment(text: str) -> str:
    """One line per segment: newlines become spaces, ends stripped."""
    return " ".join(text.splitlines()).strip()


@functools.lru_cache(maxsize=1)
def _normalizer():

    return BasicTextNormalizer()


@functools.lru_cache(maxsize=1 << 17)  # each reference recurs once per target language
def normalize_transcript(text: str) -> str:
    """Whisper's BasicTextNormalizer: lower-case, drop bracketed words, symbols -> spaces."""
    return _normalizer()(text)


@functools.lru_cache(maxsize=8)
def _bleu_metric(tokenize: str):

    return BLEU(tokenize=tokenize)


@functools.lru_cache(maxsize=1)
def _chrf_metric():

    return CHRF(word_order=2)


def bleu(hyps: Sequence[str], refs: Sequence[str], tokenize: str) -> tuple[float, str]:
    """Corpus BLEU and its sacrebleu signature."""
    metric = _bleu_metric(tokenize)
    score = metric.corpus_score([clean_segment(h) for h in hyps], [[clean_segment(r) for r in refs]])
    return float(score.score), str(metric.get_signature())


def chrf(hyps: Sequence[str], refs: Sequence[str]) -> tuple[float, str]:
    """Corpus chrF++ (character 6-grams + word 2-grams) and its sacrebleu signature."""
    metric = _chrf_metric()
    score = metric.corpus_score([clean_segment(h) for h in hyps], [[clean_segment(r) for r in refs]])
    return float(score.score), str(metric.get_signature())


def _spm_model_path() -> str:
    return os.path.join(SACREBLEU_DIR, "models", os.path.basename(SPM_MODELS["flores200"]["url"]))


def spbleu_status() -> tuple[bool, str]:
    """(available, explanation) for spBLEU; checks files only, never downloads."""
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        return False, "spBLEU unavailable: the sentencepiece package is not installed"
    path = _spm_model_path()
    if not os.path.isfile(path):
        return False, (
            f"spBLEU unavailable: the flores200 SentencePiece model is not at {path} "
            "(copy it there, or set $SACREBLEU to a directory holding models/flores200sacrebleuspm)"
        )
    return True, f"spBLEU: flores200 SentencePiece model {path}"


def spbleu(hyps: Sequence[str], refs: Sequence[str]) -> tuple[float, str]:
    """Corpus spBLEU (flores200). Call only when `spbleu_status()[0]` is True."""
    ok, why = spbleu_status()
    if not ok:
        raise RuntimeError(why)
    return bleu(hyps, refs, "flores200")


def asr_error(refs: Sequence[str], hyps: Sequence[str], metric: str) -> float:
    """WER or CER in percent over the whole set, after Whisper's BasicTextNormalizer."""

    if metric not in ("wer", "cer"):
        raise ValueError(f"ASR metric must be 'wer' or 'cer', got {metric!r}")
    if not refs:
        return math.nan
    r = [normalize_transcript(x) for x in refs]
    h = [normalize_transcript(x) for x in hyps]
    fn = jiwer.cer if metric == "cer" else jiwer.wer
    return 100.0 * float(fn(r, h))


def distinct_share(n_hyp: int, n_ref: int) -> float:
    """Distinct outputs / distinct references, at most 1: a model that gives every clip the same
    output has 1/n, one that follows the audio 1. More distinct outputs than references (one
    sentence in two voices decoded two ways) is still 1, not a share above it."""
    return min(n_hyp, n_ref) / max(n_ref, 1)


def mean(values: Iterable[Optional[float]]) -> Optional[float]:
    """Mean of the values that are not None/NaN; None when there are none."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


@dataclasses.dataclass(frozen=True)
class DirectionScore:
    """Scores of one direction src -> tgt (canonical codes)."""

    src: str
    tgt: str
    n: int  # segments scored for translation
    bleu: float
    bleu_tokenize: str
    chrf: float
    spbleu: Optional[float]
    empty_hyps: int  # translation hypotheses that were empty
    asr_metric: str  # of the source language
    asr_error: Optional[float]  # over this direction's transcripts, percent
    asr_n: int


@dataclasses.dataclass(frozen=True)
class LanguageASR:
    """ASR of one source language, pooled over every record with that source."""

    lang: str
    metric: str
    error: float  # percent
    n: int


@dataclasses.dataclass
class Scores:
    """Everything scored from one results file."""

    languages: tuple[str, ...]  # in the papers' order
    directions: dict[tuple[str, str], DirectionScore]
    asr: dict[str, LanguageASR]
    signatures: dict[str, str]
    spbleu_note: str

    def matrix(self, metric: str = "bleu") -> list[list[Optional[float]]]:
        """N x N matrix (rows = source, columns = target) of a direction metric; None = absent."""
        out = []
        for s in self.languages:
            row = []
            for t in self.languages:
                d = self.directions.get((s, t))
                row.append(None if d is None else getattr(d, metric))
            out.append(row)
        return out

    def average(self, metric: str = "bleu") -> Optional[float]:
        return mean(getattr(d, metric) for d in self.directions.values())

    def per_source(self, metric: str = "bleu") -> dict[str, Optional[float]]:
        """X -> all: mean over the directions leaving each source language."""
        return {
            s: mean(getattr(d, metric) for (ds, _), d in self.directions.items() if ds == s)
            for s in self.languages
        }

    def per_target(self, metric: str = "bleu") -> dict[str, Optional[float]]:
        """all -> X: mean over the directions into each target language."""
        return {
            t: mean(getattr(d, metric) for (_, dt), d in self.directions.items() if dt == t)
            for t in self.languages
        }

    def asr_average(self, metric: Optional[str] = None) -> Optional[float]:
        """Mean ASR error over source languages (all, or only 'wer' / 'cer' languages)."""
        return mean(a.error for a in self.asr.values() if metric is None or a.metric == metric)

    @property
    def has_spbleu(self) -> bool:
        return any(d.spbleu is not None for d in self.directions.values())


def _order(codes: Iterable[str]) -> tuple[str, ...]:
    rank = {c: i for i, c in enumerate(languages.ESRT_LANGS)}
    return tuple(sorted(set(codes), key=lambda c: (rank.get(c, len(rank)), c)))


def score_records(records: Sequence, *, use_spbleu: Optional[bool] = None) -> Scores:
    """Score records (see `esrt_jax.eval.results.ScoredRecord`): per direction and per language.

    Records need `.src`, `.tgt` (canonical codes), `.ref`/`.hyp` (translation, may be None)
    and `.asr_ref`/`.asr_hyp` (transcription, may be None). `use_spbleu=None` scores spBLEU
    when it is available locally.
    """
    sp_ok, sp_note = spbleu_status()
    if use_spbleu is None:
        use_spbleu = sp_ok
    elif use_spbleu and not sp_ok:
        raise RuntimeError(sp_note)
    if not use_spbleu and sp_ok:
        sp_note = "spBLEU not requested"

    by_dir: dict[tuple[str, str], list] = {}
    asr_by_src: dict[str, list] = {}
    for rec in records:
        if rec.src != rec.tgt and rec.ref is not None and rec.hyp is not None:
            by_dir.setdefault((rec.src, rec.tgt), []).append(rec)
        if rec.asr_ref is not None and rec.asr_hyp is not None:
            asr_by_src.setdefault(rec.src, []).append(rec)

    signatures: dict[str, str] = {}
    directions: dict[tuple[str, str], DirectionScore] = {}
    for (s, t), recs in by_dir.items():
        hyps = [r.hyp for r in recs]
        refs = [r.ref for r in recs]
        tok = languages.get(t).bleu_tokenize
        b, sig = bleu(hyps, refs, tok)
        signatures[f"bleu_{tok}"] = sig
        c, csig = chrf(hyps, refs)
        signatures["chrf++"] = csig
        sb = None
        if use_spbleu:
            sb, ssig = spbleu(hyps, refs)
            signatures["spbleu"] = ssig
        asr_recs = [r for r in recs if r.asr_ref is not None and r.asr_hyp is not None]
        src_metric = languages.get(s).asr_metric
        err = (
            asr_error([r.asr_ref for r in asr_recs], [r.asr_hyp for r in asr_recs], src_metric)
            if asr_recs
            else None
        )
        directions[(s, t)] = DirectionScore(
            src=s, tgt=t, n=len(recs), bleu=b, bleu_tokenize=tok, chrf=c, spbleu=sb,
            empty_hyps=sum(1 for h in hyps if not clean_segment(h)),
            asr_metric=src_metric, asr_error=err, asr_n=len(asr_recs),
        )  # fmt: skip

    asr: dict[str, LanguageASR] = {}
    for s, recs in asr_by_src.items():
        metric = languages.get(s).asr_metric
        err = asr_error([r.asr_ref for r in recs], [r.asr_hyp for r in recs], metric)
        asr[s] = LanguageASR(lang=s, metric=metric, error=err, n=len(recs))
    if asr:
        signatures["asr"] = "jiwer (wer/cer) after whisper BasicTextNormalizer"

    langs = _order([s for s, _ in directions] + [t for _, t in directions] + list(asr))
    ordered = {k: directions[k] for k in sorted(directions, key=lambda k: (langs.index(k[0]), langs.index(k[1])))}
    asr = {k: asr[k] for k in langs if k in asr}
    return Scores(languages=langs, directions=ordered, asr=asr, signatures=signatures, spbleu_note=sp_note)
