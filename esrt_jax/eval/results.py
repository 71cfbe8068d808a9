"""Reading results files for scoring, tolerant of bad lines.

The public ESRT result schema is one JSON object per line with the fields
`id, audio, prompt, src, tgt, asr, s2tt, asr_r, s2tt_r, response` (`asr`/`s2tt` are the
reference transcription/translation, `asr_r`/`s2tt_r` the model's). Outputs of the original
LLM-SRT inference scripts are read too: there the reference is `gt` =
`transcription<|src|><|tgt|>translation`, the hypothesis is `response` in the same shape, and
the languages are the last two `<|xxx|>` tags of the prompt (or of `gt`). A prompt with a
single tag is an ASR record (scored for WER/CER only).

Nothing in a file makes reading crash: malformed JSON, non-objects, missing or non-string
fields, unknown language codes and duplicate records are reported as `Issue`s with their line
numbers and skipped; empty hypotheses are reported and scored as empty.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from typing import Optional

from esrt_jax import languages
from esrt_jax.data.records import JSON_KEYS
from esrt_jax.data.tasks import split_srt_output

__all__ = [
    "RESULT_FIELDS",
    "RESULT_KEYS",
    "ScoredRecord",
    "Issue",
    "ResultsFile",
    "ResultsError",
    "read_results",
    "parse_record",
    "TAG_RE",
]

# The model's two texts' keys in a results file (the references' are `records.JSON_KEYS`): in code
# the texts are `transcription` / `translation` everywhere; these are their names on disk.
RESULT_KEYS = {"transcription": "asr_r", "translation": "s2tt_r"}
# The public ESRT result schema, in its order.
RESULT_FIELDS = ("id", "audio", "prompt", "src", "tgt", JSON_KEYS["transcription"], JSON_KEYS["translation"],
                 RESULT_KEYS["transcription"], RESULT_KEYS["translation"], "response")

TAG_RE = re.compile(r"<\|([A-Za-z]{2,8})\|>")


class ResultsError(ValueError):
    """A results file that cannot be read at all (missing, a directory, not text)."""


@dataclasses.dataclass(frozen=True)
class ScoredRecord:
    """One scorable record. Codes are canonical (`zho` -> `cmn`); text fields may be None."""

    line: int
    id: Optional[str]
    src: str
    tgt: str
    ref: Optional[str]  # reference translation (s2tt)
    hyp: Optional[str]  # hypothesis translation (s2tt_r)
    asr_ref: Optional[str]  # reference transcription (asr)
    asr_hyp: Optional[str]  # hypothesis transcription (asr_r)


@dataclasses.dataclass(frozen=True)
class Issue:
    line: int
    kind: str  # malformed_json | not_object | missing_field | bad_field | unknown_language | duplicate | empty_hypothesis
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclasses.dataclass
class ResultsFile:
    path: str
    records: list[ScoredRecord]
    issues: list[Issue]
    n_lines: int  # non-blank lines

    def issue_counts(self) -> dict[str, int]:
        return dict(collections.Counter(i.kind for i in self.issues))

    @property
    def n_skipped(self) -> int:
        """Non-blank lines that gave no record."""
        return self.n_lines - len(self.records)


def _str_field(obj: dict, key: str, line: int, issues: list[Issue]) -> Optional[str]:
    """obj[key] if it is a string; None if absent/null; a `bad_field` issue otherwise."""
    v = obj.get(key)
    if v is None or isinstance(v, str):
        return v
    issues.append(Issue(line, "bad_field", f"field {key!r} must be a string, got {type(v).__name__}"))
    return None


def parse_record(obj: object, line: int) -> tuple[Optional[ScoredRecord], list[Issue]]:
    """One decoded JSON value -> (ScoredRecord or None, issues)."""
    issues: list[Issue] = []
    if not isinstance(obj, dict):
        return None, [Issue(line, "not_object", f"expected a JSON object, got {type(obj).__name__}")]

    prompt = _str_field(obj, "prompt", line, issues)
    gt = _str_field(obj, "gt", line, issues)
    response = _str_field(obj, "response", line, issues)
    src_raw = _str_field(obj, "src", line, issues)
    tgt_raw = _str_field(obj, "tgt", line, issues)
    # Original LLM-SRT outputs carry the languages only in the prompt/gt tags.
    tags = TAG_RE.findall(prompt or "") or TAG_RE.findall(gt or "")
    if src_raw is None and tags:
        src_raw = tags[-2] if len(tags) >= 2 else tags[-1]
    if tgt_raw is None and tags:
        tgt_raw = tags[-1]
    if src_raw is None:
        issues.append(Issue(line, "missing_field", "no source language ('src' field or <|xxx|> tags in 'prompt'/'gt')"))
        return None, issues
    if tgt_raw is None:
        tgt_raw = src_raw  # an ASR record: transcription only
    codes = []
    for key, raw in (("src", src_raw), ("tgt", tgt_raw)):
        try:
            codes.append(languages.normalize(raw))
        except languages.LanguageError as e:
            issues.append(Issue(line, "unknown_language", f"{key}: {e}"))
    if len(codes) < 2:
        return None, issues
    src, tgt = codes
    src_raw, tgt_raw = src_raw.strip(), tgt_raw.strip()

    ref = _str_field(obj, JSON_KEYS["translation"], line, issues)
    asr_ref = _str_field(obj, JSON_KEYS["transcription"], line, issues)
    if ref is None and asr_ref is None and gt is not None:
        if src == tgt:
            asr_ref = gt.strip()
        else:
            # A gt without the marker is a plain translation reference: no ASR reference.
            sep = languages.srt_marker(src_raw, tgt_raw)
            asr_ref, ref = ((p.strip() for p in gt.split(sep, 1)) if sep in gt else (None, gt.strip()))
    hyp = _str_field(obj, RESULT_KEYS["translation"], line, issues)
    asr_hyp = _str_field(obj, RESULT_KEYS["transcription"], line, issues)
    if hyp is None and asr_hyp is None and response is not None:
        if src == tgt:
            asr_hyp = response.strip()
        else:
            asr_hyp, hyp = split_srt_output(response, src_raw, tgt_raw)  # the reference's fallbacks
            if asr_ref is None:
                asr_hyp = None

    translation = src != tgt and ref is not None and hyp is not None
    transcription = asr_ref is not None and asr_hyp is not None
    if src != tgt and not translation:
        missing = [k for k, v in ((JSON_KEYS["translation"], ref), (RESULT_KEYS["translation"], hyp)) if v is None]
        issues.append(Issue(line, "missing_field", f"{src}->{tgt}: no {' or '.join(missing)} (nor gt/response to take it from)"))
    if not translation and not transcription:
        if src == tgt:
            issues.append(Issue(line, "missing_field", f"{src} ASR record without both '{JSON_KEYS['transcription']}' and "
                                f"'{RESULT_KEYS['transcription']}'"))
        return None, issues
    if translation and not hyp.strip():
        issues.append(Issue(line, "empty_hypothesis", f"{src}->{tgt}: empty translation hypothesis (scored as empty)"))
    if transcription and not asr_hyp.strip() and asr_ref.strip():
        issues.append(Issue(line, "empty_hypothesis", f"{src}: empty transcription hypothesis (scored as empty)"))
    rid = obj.get("id", obj.get("key"))
    rec = ScoredRecord(
        line=line,
        id=None if rid is None else str(rid),
        src=src,
        tgt=tgt,
        ref=ref if translation else None,
        hyp=hyp if translation else None,
        asr_ref=asr_ref if transcription else None,
        asr_hyp=asr_hyp if transcription else None,
    )
    return rec, issues


def read_results(path: str | os.PathLike) -> ResultsFile:
    """Read a results JSONL file; bad lines become `Issue`s, never exceptions."""
    name = os.fspath(path)
    if not os.path.exists(name):
        raise ResultsError(f"{name}: results file does not exist")
    if os.path.isdir(name):
        raise ResultsError(f"{name}: is a directory, expected a results .jsonl file")
    records: list[ScoredRecord] = []
    issues: list[Issue] = []
    seen: dict[tuple, int] = {}
    n_lines = 0
    with open(name, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                issues.append(Issue(lineno, "malformed_json", f"not UTF-8 ({e.reason} at byte {e.start})"))
                n_lines += 1
                continue
            if not text.strip():
                continue
            n_lines += 1
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                issues.append(Issue(lineno, "malformed_json", f"not valid JSON ({e.msg} at column {e.colno})"))
                continue
            rec, rec_issues = parse_record(obj, lineno)
            issues.extend(rec_issues)
            if rec is None:
                continue
            if rec.id is not None:
                key = (rec.id, rec.src, rec.tgt)
                if key in seen:
                    issues.append(Issue(lineno, "duplicate", f"record id={rec.id!r} {rec.src}->{rec.tgt} already on line {seen[key]}; skipped"))
                    continue
                seen[key] = lineno
            records.append(rec)
    return ResultsFile(path=name, records=records, issues=issues, n_lines=n_lines)
