"""Reports of scored results: terminal table, summary.json, directions.csv, markdown tables in
the papers' layout (rows = source, columns = target), a BLEU heatmap and a WER/CER bar chart.

Plots use matplotlib's object API with the Agg canvas (no pyplot, no display, no global
backend switch).
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Optional

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from esrt_jax import languages
from esrt_jax.eval.compare import Comparison
from esrt_jax.eval.listening import Listening
from esrt_jax.eval.results import ResultsFile
from esrt_jax.metrics import Scores

__all__ = [
    "summary_dict",
    "format_terminal",
    "markdown_report",
    "write_directions_csv",
    "write_compare_csv",
    "heatmap_size",
    "plot_heatmap",
    "plot_asr_bars",
    "write_reports",
]

DASH = "–"
_DPI = 100
_MAX_ISSUES_LISTED = 200
_TERMINAL_MATRIX_MAX = 16  # larger tables go to table.md only


def _fmt(v: Optional[float], nd: int = 1) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def _round(v: Optional[float], nd: int = 2) -> Optional[float]:
    return None if v is None or math.isnan(v) else round(v, nd)


def _metrics(scores: Scores) -> list[tuple[str, str]]:
    out = [("bleu", "BLEU"), ("chrf", "chrF++")]
    if scores.has_spbleu:
        out.append(("spbleu", "spBLEU"))
    return out


# ----------------------------------------------------------------------------- summary.json


def summary_dict(scores: Scores, rf: ResultsFile, comparison: Optional[Comparison] = None, compare_name: str = "",
                 listening: Optional[Listening] = None) -> dict:
    metrics = [m for m, _ in _metrics(scores)]
    out = {
        "results": rf.path,
        "lines": rf.n_lines,
        "records": len(rf.records),
        "skipped_lines": rf.n_skipped,
        "issues": {
            "counts": rf.issue_counts(),
            "listed": [str(i) for i in rf.issues[:_MAX_ISSUES_LISTED]],
            "total": len(rf.issues),
        },
        "languages": list(scores.languages),
        "n_directions": len(scores.directions),
        "averages": {m: _round(scores.average(m)) for m in metrics},
        "per_source": {
            s: {m: _round(scores.per_source(m)[s]) for m in metrics} for s in scores.languages
        },
        "per_target": {
            t: {m: _round(scores.per_target(m)[t]) for m in metrics} for t in scores.languages
        },
        "asr": {
            a.lang: {"metric": a.metric, "error": _round(a.error), "n": a.n} for a in scores.asr.values()
        },
        "signatures": scores.signatures,
        "spbleu": scores.spbleu_note,
    }
    out["averages"].update(
        {
            "asr_error": _round(scores.asr_average()),
            "wer": _round(scores.asr_average("wer")),
            "cer": _round(scores.asr_average("cer")),
        }
    )
    if listening is not None:
        out["listening"] = listening.to_dict()
    if comparison is not None:
        out["compare"] = comparison.to_dict(rf.path, compare_name)
    return out


# ----------------------------------------------------------------------------- CSV


def write_directions_csv(scores: Scores, path: str | os.PathLike) -> None:
    cols = ["src", "tgt", "n", "bleu", "bleu_tokenize", "chrf", "spbleu", "empty_hyps", "asr_metric", "asr_error", "asr_n"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for d in scores.directions.values():
            w.writerow(
                [d.src, d.tgt, d.n, _fmt(d.bleu, 2), d.bleu_tokenize, _fmt(d.chrf, 2), _fmt(d.spbleu, 2),
                 d.empty_hyps, d.asr_metric, _fmt(d.asr_error, 2), d.asr_n]
            )  # fmt: skip


def write_compare_csv(comparison: Comparison, path: str | os.PathLike) -> None:
    m = comparison.metric
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["src", "tgt", f"{m}_a", f"{m}_b", f"{m}_delta", "chrf_a", "chrf_b", "chrf_delta", "outcome"])
        for d in comparison.deltas:
            w.writerow([d.src, d.tgt, _fmt(d.a, 2), _fmt(d.b, 2), _fmt(d.delta, 2),
                        _fmt(d.chrf_a, 2), _fmt(d.chrf_b, 2), _fmt(d.chrf_delta, 2), d.outcome])  # fmt: skip


# ----------------------------------------------------------------------------- markdown


def _md_matrix(scores: Scores, metric: str, title: str) -> list[str]:
    langs = scores.languages
    src_avg = scores.per_source(metric)
    tgt_avg = scores.per_target(metric)
    lines = [f"### {title} (rows = source, columns = target)", ""]
    lines.append("| src \\ tgt | " + " | ".join(langs) + " | X→all |")
    lines.append("|---" * (len(langs) + 2) + "|")
    for s, row in zip(langs, scores.matrix(metric)):
        cells = [DASH if s == t else _fmt(v) for t, v in zip(langs, row)]
        lines.append(f"| **{s}** | " + " | ".join(cells) + f" | {_fmt(src_avg[s])} |")
    lines.append(
        "| all→X | " + " | ".join(_fmt(tgt_avg[t]) for t in langs) + f" | **{_fmt(scores.average(metric))}** |"
    )
    return lines + [""]


def _md_comparison(comparison: Comparison, langs: tuple[str, ...], name_a: str, name_b: str) -> list[str]:
    delta = {(d.src, d.tgt): d.delta for d in comparison.deltas}
    m = comparison.metric.upper()
    lines = [f"## Comparison: {name_a} − {name_b} ({m})", "", comparison.sentence(name_a, name_b) + ".", ""]
    lines.append("| src \\ tgt | " + " | ".join(langs) + " |")
    lines.append("|---" * (len(langs) + 1) + "|")
    for s in langs:
        cells = [DASH if s == t else ("" if (s, t) not in delta else f"{delta[(s, t)]:+.1f}") for t in langs]
        lines.append(f"| **{s}** | " + " | ".join(cells) + " |")
    if comparison.asr:
        lines += ["", "| language | metric | " + name_a + " | " + name_b + " | delta |", "|---|---|---|---|---|"]
        for d in comparison.asr:
            lines.append(f"| {d.lang} | {d.metric.upper()} | {_fmt(d.a)} | {_fmt(d.b)} | {d.delta:+.1f} |")
    return lines + [""]


def markdown_report(
    scores: Scores, rf: ResultsFile, comparison: Optional[Comparison] = None, compare_name: str = "",
    listening: Optional[Listening] = None,
) -> str:
    lines = [f"# Scores for `{rf.path}`", ""]
    lines.append(
        f"{len(scores.languages)} languages, {len(scores.directions)} directions, {len(rf.records)} records "
        f"({rf.n_skipped} of {rf.n_lines} lines skipped, {len(rf.issues)} issues)."
    )
    lines.append("")
    if scores.directions:
        avg = ", ".join(f"{label} {_fmt(scores.average(m), 2)}" for m, label in _metrics(scores))
        lines += [f"Average over all directions: {avg}.", ""]
        for m, label in _metrics(scores):
            lines += _md_matrix(scores, m, label)
    if scores.asr:
        lines += ["### ASR (after Whisper's BasicTextNormalizer)", "", "| language | metric | error % | n |", "|---|---|---|---|"]
        for a in scores.asr.values():
            lines.append(f"| {a.lang} ({languages.get(a.lang).name}) | {a.metric.upper()} | {_fmt(a.error)} | {a.n} |")
        parts = [f"{m.upper()} languages {_fmt(scores.asr_average(m))}" for m in ("wer", "cer")
                 if _fmt(scores.asr_average(m))]  # only the kinds present (no empty field)
        lines += ["", f"Average: {_fmt(scores.asr_average())} ({', '.join(parts)}).", ""]
    if listening is not None:
        lines += ["### Listening", ""] + [f"{l}." for l in listening.lines()] + [""]
        lines += listening.markdown_examples() + [""]
    if comparison is not None:
        lines += _md_comparison(comparison, scores.languages, Path(rf.path).name, Path(compare_name).name)
    lines += ["### Signatures", ""]
    lines += [f"- {k}: `{v}`" for k, v in scores.signatures.items()]
    lines += [f"- {scores.spbleu_note}", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- terminal


def _text_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]


def format_terminal(
    scores: Scores, rf: ResultsFile, comparison: Optional[Comparison] = None, compare_name: str = "",
    listening: Optional[Listening] = None,
) -> str:
    out = [
        f"{rf.path}: {len(rf.records)} records from {rf.n_lines} lines, {len(scores.languages)} languages, "
        f"{len(scores.directions)} directions"
    ]
    if rf.issues:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(rf.issue_counts().items()))
        out.append(f"issues: {len(rf.issues)} ({counts}); {rf.n_skipped} lines skipped")
        out += [f"  {i}" for i in rf.issues[:10]]
        if len(rf.issues) > 10:
            out.append(f"  ... {len(rf.issues) - 10} more in issues.txt")
    langs = scores.languages
    if scores.directions:
        out.append("")
        if len(langs) <= _TERMINAL_MATRIX_MAX:
            src_avg, tgt_avg = scores.per_source("bleu"), scores.per_target("bleu")
            rows = []
            for s, row in zip(langs, scores.matrix("bleu")):
                rows.append([s] + [DASH if s == t else _fmt(v) for t, v in zip(langs, row)] + [_fmt(src_avg[s])])
            rows.append(["all→X"] + [_fmt(tgt_avg[t]) for t in langs] + [_fmt(scores.average("bleu"))])
            out.append("BLEU (rows = source, columns = target)")
            out += _text_table(["src\\tgt"] + list(langs) + ["X→all"], rows)
        else:
            out.append("per language (full matrix in table.md)")
        out.append("")
        per = [(m, label, scores.per_source(m), scores.per_target(m)) for m, label in _metrics(scores)]
        header = ["lang"] + [f"{label} X→all" for _, label, _, _ in per] + [f"{label} all→X" for _, label, _, _ in per] + ["ASR %"]
        rows = []
        for lang in langs:
            asr = scores.asr.get(lang)
            rows.append(
                [lang] + [_fmt(p[2][lang]) for p in per] + [_fmt(p[3][lang]) for p in per]
                + ["" if asr is None else f"{_fmt(asr.error)} {asr.metric.upper()}"]
            )  # fmt: skip
        out += _text_table(header, rows)
        out.append("")
        out.append(
            "average over directions: "
            + ", ".join(f"{label} {_fmt(scores.average(m), 2)}" for m, label in _metrics(scores))
        )
    elif scores.asr:
        out.append("")
        out += _text_table(["lang", "ASR %", "n"], [[a.lang, f"{_fmt(a.error)} {a.metric.upper()}", str(a.n)] for a in scores.asr.values()])
    if scores.asr:
        parts = [f"{m.upper()} {_fmt(scores.asr_average(m), 2)}" for m in ("wer", "cer")
                 if any(a.metric == m for a in scores.asr.values())]
        out.append(f"ASR average: {_fmt(scores.asr_average(), 2)} ({', '.join(parts)})")
    out.append(scores.spbleu_note)
    if listening is not None:
        out += listening.terminal_examples()
        out += listening.lines()
    if comparison is not None:
        out.append("")
        out.append(comparison.sentence(Path(rf.path).name, Path(compare_name).name))
    return "\n".join(out)


# ----------------------------------------------------------------------------- plots


def heatmap_size(n: int) -> tuple[int, int]:
    """Pixel size (width, height) of the heatmap for n languages."""
    side = min(4.0 + 0.45 * n, 28.0)
    return int(round((side + 1.5) * _DPI)), int(round(side * _DPI))


def heatmap_vmax(data) -> float:
    """Top of the heatmap's colour scale: max(50, best score), never the data's range alone."""
    finite = np.asarray(data, float)[np.isfinite(np.asarray(data, float))]
    return max(50.0, float(finite.max()) if finite.size else 0.0)


def plot_heatmap(scores: Scores, path: str | os.PathLike, metric: str = "bleu") -> None:
    """N x N heatmap (rows = source, columns = target); the diagonal and missing cells blank.

    The colour scale is fixed at 0..max(50, best score), so a BLEU of 2 never looks like a good
    score; every cell shows its value (up to 30 languages)."""
    langs = scores.languages
    n = len(langs)
    data = np.array([[np.nan if v is None else v for v in row] for row in scores.matrix(metric)], float).reshape(n, n)
    w, h = heatmap_size(n)
    fig = Figure(figsize=(w / _DPI, h / _DPI), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    masked = np.ma.masked_invalid(data)
    vmax = heatmap_vmax(data)
    im = ax.imshow(masked, cmap="viridis", vmin=0.0, vmax=vmax, aspect="equal")
    ax.set_facecolor("#dddddd")
    ax.set_xticks(range(n), labels=langs, rotation=90, fontsize=8 if n > 20 else 10)
    ax.set_yticks(range(n), labels=langs, fontsize=8 if n > 20 else 10)
    ax.set_xlabel("target")
    ax.set_ylabel("source")
    label = {"bleu": "BLEU", "chrf": "chrF++", "spbleu": "spBLEU"}[metric]
    ax.set_title(f"{label} by direction (average {_fmt(scores.average(metric), 2)})")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if np.isfinite(data[i, j]):
                    light = data[i, j] < 0.6 * vmax
                    ax.text(j, i, f"{data[i, j]:.0f}" if n > 12 else f"{data[i, j]:.1f}", ha="center", va="center",
                            fontsize=6 if n > 12 else 9, color="white" if light else "black")  # fmt: skip
    fig.colorbar(im, ax=ax, label=label, shrink=0.8)
    fig.savefig(path, dpi=_DPI, format="png")


def plot_asr_bars(scores: Scores, path: str | os.PathLike) -> None:
    """Bar chart of WER (or CER) per source language."""
    items = list(scores.asr.values())
    n = max(len(items), 1)
    fig = Figure(figsize=(max(4.0, 0.4 * n + 1.5), 3.5), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    colors = ["tab:blue" if a.metric == "wer" else "tab:orange" for a in items]
    ax.bar(range(len(items)), [a.error for a in items], color=colors)
    ax.set_xticks(range(len(items)), labels=[a.lang for a in items], rotation=90 if n > 12 else 0)
    ax.set_ylabel("error %")
    ax.set_title("ASR error by source language")
    ax.margins(y=0.12)
    used = sorted({a.metric for a in items}, reverse=True)
    ax.legend(handles=[Patch(color="tab:blue" if m == "wer" else "tab:orange", label=m.upper()) for m in used],
              fontsize=8, loc="upper right")  # fmt: skip
    for i, a in enumerate(items):
        ax.text(i, a.error, _fmt(a.error), ha="center", va="bottom", fontsize=7)
    fig.savefig(path, dpi=_DPI, format="png")


# ----------------------------------------------------------------------------- all


def write_reports(
    scores: Scores,
    rf: ResultsFile,
    out_dir: str | os.PathLike,
    comparison: Optional[Comparison] = None,
    compare_name: str = "",
    listening: Optional[Listening] = None,
) -> dict[str, Path]:
    """Write every report into out_dir; returns {kind: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    paths["summary"] = out / "summary.json"
    paths["summary"].write_text(
        json.dumps(summary_dict(scores, rf, comparison, compare_name, listening), indent=2, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    paths["directions"] = out / "directions.csv"
    write_directions_csv(scores, paths["directions"])
    paths["table"] = out / "table.md"
    paths["table"].write_text(markdown_report(scores, rf, comparison, compare_name, listening), encoding="utf-8")
    paths["issues"] = out / "issues.txt"
    paths["issues"].write_text("".join(f"{i}\n" for i in rf.issues), encoding="utf-8")
    if scores.directions:
        paths["heatmap"] = out / "bleu_heatmap.png"
        plot_heatmap(scores, paths["heatmap"])
    if scores.asr:
        paths["asr_chart"] = out / "asr_by_language.png"
        plot_asr_bars(scores, paths["asr_chart"])
    if comparison is not None:
        paths["compare"] = out / "compare.csv"
        write_compare_csv(comparison, paths["compare"])
    return paths
