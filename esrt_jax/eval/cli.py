"""`python eval.py --score results.jsonl [--out DIR] [--compare other.jsonl]`.

Scores an existing results file without a model (ours, or one written by the original
ESRT/LLM-SRT inference scripts): per-direction BLEU / chrF++ (/ spBLEU), WER/CER per
language, averages as in the papers, reports in DIR (default: next to the results file,
`<name>_scores/`). With `--compare` the second file is scored the same way and the first is
compared with it direction by direction.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["build_parser", "main", "run_score"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eval.py",
        description="Score speech-translation results: BLEU/chrF++/spBLEU per direction, WER/CER per language.",
    )
    p.add_argument(
        "--score",
        metavar="RESULTS.jsonl",
        required=True,
        help="results file to score (public ESRT schema, or original LLM-SRT/ESRT inference output)",
    )
    p.add_argument("--out", metavar="DIR", help="report directory (default: <results name>_scores next to the file)")
    p.add_argument(
        "--compare",
        metavar="OTHER.jsonl",
        help="second results file: per-direction deltas (scored file minus OTHER) and win/loss counts",
    )
    return p


def default_out_dir(results: str) -> Path:
    path = Path(results)
    return path.with_name(path.stem + "_scores")


def run_score(args: argparse.Namespace) -> int:
    from esrt_jax.eval import compare as cmp
    from esrt_jax.eval import metrics, report, results

    try:
        rf = results.read_results(args.score)
        other_rf = results.read_results(args.compare) if args.compare else None
    except results.ResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not rf.records:
        print(
            f"error: {rf.path}: no scorable records in {rf.n_lines} lines "
            f"({len(rf.issues)} issues; first: {rf.issues[0] if rf.issues else 'file is empty'})",
            file=sys.stderr,
        )
        return 1
    scores = metrics.score_records(rf.records)
    comparison = None
    if other_rf is not None:
        if not other_rf.records:
            print(f"error: {other_rf.path}: no scorable records to compare with", file=sys.stderr)
            return 1
        other = metrics.score_records(other_rf.records, use_spbleu=scores.has_spbleu)
        comparison = cmp.compare_scores(scores, other)
        if other_rf.issues:
            counts = ", ".join(f"{k} {v}" for k, v in sorted(other_rf.issue_counts().items()))
            print(f"{other_rf.path}: {len(other_rf.issues)} issues ({counts})")
    out_dir = Path(args.out) if args.out else default_out_dir(args.score)
    paths = report.write_reports(scores, rf, out_dir, comparison, args.compare or "")
    print(report.format_terminal(scores, rf, comparison, args.compare or ""))
    print()
    print(f"reports in {out_dir}: " + ", ".join(p.name for p in paths.values()))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_score(args)
