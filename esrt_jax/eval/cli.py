"""`python eval.py`: decode a test set with a trained model and score it, or score a results file.

Decode + score:

    python eval.py --config configs/demo.yaml --checkpoint runs/demo [--data test.jsonl]
        [--src eng,deu] [--tgt all] [--langs eng,deu,fra] [--limit N] [--beam 5] [--batch 64]
        [--task srt|asr|smt] [--max-new-tokens N] [--out DIR] [--overwrite]

decodes every (utterance, target) record of `--data` (ESRT or LLM-SRT JSONL; default: the demo
corpus' test set when the config trains on it) with the jitted generator, encoding each audio
once for all its targets (`esrt_jax.eval.decode`), writes `DIR/results.jsonl` in the public ESRT
result schema, then scores it into DIR exactly as `--score` does. An interrupted decode resumes
from the records already in `results.jsonl`. Without --src/--tgt/--langs, the languages are the
run config's `data.languages` when it names them (the languages the model was trained on).

Score only (no model):

    python eval.py --score results.jsonl [--out DIR] [--compare other.jsonl]

scores an existing results file (ours, or one written by the original ESRT/LLM-SRT inference
scripts): per-direction BLEU / chrF++ (/ spBLEU), WER/CER per language, averages as in the
papers, reports in DIR (default: next to the results file, `<name>_scores/`). With `--compare`
the second file is scored the same way and the first is compared with it direction by direction.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from esrt_jax import metrics
from esrt_jax.config import ConfigError
from esrt_jax.data.demo import build_demo_corpus, default_demo_dir
from esrt_jax.eval import compare as cmp
from esrt_jax.eval import decode as dec
from esrt_jax.eval import report, results
from esrt_jax.infer.cloud import translator_for
from esrt_jax.train.restore import load_model

__all__ = ["build_parser", "main", "run_score", "run_decode", "default_out_dir"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eval.py",
        description="Decode a test set and/or score speech-translation results: BLEU/chrF++/spBLEU "
                    "per direction, WER/CER per language.",
        epilog="Give --score RESULTS.jsonl to score a results file, or --config + --checkpoint to decode "
               "a test set first (see esrt_jax/eval/cli.py).",
    )
    p.add_argument(
        "--score",
        metavar="RESULTS.jsonl",
        help="results file to score (public ESRT schema, or original LLM-SRT/ESRT inference output)",
    )
    p.add_argument("--out", metavar="DIR",
                   help="report directory (decode: also holds results.jsonl; default <stage dir>/eval/<data name>; "
                        "score: <results name>_scores next to the file)")
    p.add_argument(
        "--compare",
        metavar="OTHER.jsonl",
        help="second results file: per-direction deltas (scored file minus OTHER) and win/loss counts",
    )
    d = p.add_argument_group("decode (instead of --score)")
    d.add_argument("--config", metavar="YAML", help="run config (the one train.py used)")
    d.add_argument("--checkpoint", metavar="DIR",
                   help="run dir (last finished stage), stage dir, checkpoints dir or step dir")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run config override")
    d.add_argument("--data", metavar="TEST.jsonl",
                   help="test records (ESRT or LLM-SRT JSONL; default: the demo test set for demo configs)")
    d.add_argument("--src", metavar="CODES", help="source languages, comma separated, or 'all'")
    d.add_argument("--tgt", metavar="CODES", help="target languages, comma separated, or 'all'")
    d.add_argument("--langs", metavar="CODES",
                   help="keep directions with source and target in these ('all': every language in the data)")
    d.add_argument("--limit", type=int, metavar="N", help="at most N records per direction (a quick table)")
    d.add_argument("--task", default="srt", choices=("srt", "asr", "smt"),
                   help="srt: transcribe+translate (default); asr: transcribe each utterance once; "
                        "smt: translate given the reference transcription")
    d.add_argument("--beam", type=int, metavar="N", help="beam size (default: the config's, else greedy)")
    d.add_argument("--batch", type=int, default=64, help="utterances per encode and records per decode (default 64)")
    d.add_argument("--max-new-tokens", type=int, metavar="N", help="generation length cap (default: the config's)")
    d.add_argument("--overwrite", action="store_true", help="start the results file over instead of resuming")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def default_out_dir(results: str) -> Path:
    path = Path(results)
    return path.with_name(path.stem + "_scores")


def run_score(args: argparse.Namespace, keep: Optional[set] = None) -> int:
    """Score args.score into args.out; `keep`: score only records with these (id, src, tgt) keys."""
    try:
        rf = results.read_results(args.score)
        other_rf = results.read_results(args.compare) if args.compare else None
    except results.ResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if keep is not None:
        mine = [r for r in rf.records if (r.id, r.src, r.tgt) in keep]
        if len(mine) != len(rf.records):
            print(f"scoring the {len(mine)} records of this selection ({rf.path} holds {len(rf.records)})",
                  file=sys.stderr)
            rf = dataclasses.replace(rf, records=mine)
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


def _default_data(cfg) -> str | None:
    """The demo corpus' test set when the run config trains on the demo corpus (built if needed)."""
    if not cfg.data.get("demo"):
        return None
    return str(build_demo_corpus(cfg.data.get("demo_dir") or default_demo_dir()) / "test.jsonl")


def run_decode(args: argparse.Namespace) -> int:
    """Load the model, decode the test set into OUT/results.jsonl (resuming), then score it."""
    t_start = time.perf_counter()
    try:
        loaded = load_model(args.config, args.checkpoint, args.set)
    except (FileNotFoundError, ConfigError, ImportError, KeyError, ValueError) as e:
        print(f"error: cannot load the model: {e}", file=sys.stderr)
        return 2
    gen = {k: v for k, v in (("num_beams", args.beam), ("max_new_tokens", args.max_new_tokens)) if v}
    try:
        tr = translator_for(loaded, max_batch=args.batch, gen_overrides=gen)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t_load = time.perf_counter() - t_start
    data = args.data or _default_data(loaded.run_config)
    if data is None:
        print("error: --data is required (the run config does not use the demo corpus)", file=sys.stderr)
        return 2
    langs = args.langs
    cfg_langs = loaded.run_config.data.get("languages")
    if args.src is None and args.tgt is None and langs is None and cfg_langs:
        langs = ",".join(cfg_langs)
        print(f"languages: {langs} (the run config's data.languages; --langs all for every language in the data)",
              file=sys.stderr)
    try:
        items, issues = dec.read_items(data, src=args.src, tgt=args.tgt, langs=langs, limit=args.limit,
                                       task=args.task)
    except Exception as e:  # DecodeError, LanguageError for a bad --src/--tgt/--langs code
        print(f"error: {e}", file=sys.stderr)
        return 2
    if issues:
        print(dec.summarize_issues(issues, data), file=sys.stderr)
    if not items:
        print(f"error: {data}: no records to decode for this selection", file=sys.stderr)
        return 1
    stage_dir = loaded.checkpoint_dir.parent if loaded.checkpoint_dir is not None else Path(loaded.run_config.run_dir)
    name = Path(data).stem + ("" if args.task == "srt" else f"_{args.task}")
    out_dir = Path(args.out) if args.out else stage_dir / "eval" / name
    results_path = out_dir / "results.jsonl"
    info = {"config": str(args.config), "overrides": list(args.set), "checkpoint": str(args.checkpoint),
            "stage": loaded.stage, "step": loaded.step, "data": str(Path(data).absolute())}
    n_utts = len({it.path for it in items})
    print(f"model: stage {loaded.stage} step {loaded.step} ({loaded.fingerprint}), loaded in {t_load:.1f}s; "
          f"{len(items)} records from {n_utts} utterances -> {results_path}", file=sys.stderr)
    try:
        stats = dec.decode_to_file(tr, items, results_path, task=args.task, batch=args.batch,
                                   progress=not args.no_progress, overwrite=args.overwrite, info=info,
                                   fingerprint=loaded.fingerprint)
    except dec.DecodeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    all_issues = issues + stats.issues
    (out_dir / "decode_issues.txt").write_text(
        "".join(f"{data}:{i.line}: [{i.kind}] {i.message}\n" for i in all_issues), encoding="utf-8")
    if stats.issues:
        print(dec.summarize_issues(stats.issues, data), file=sys.stderr)
    rate = stats.decoded / stats.decode_s if stats.decode_s else 0.0
    print(f"decoded {stats.decoded} records ({stats.already_done} already done, {stats.failed} failed) of "
          f"{stats.selected}; encoded {stats.audio_encoded} utterances in {stats.encode_s:.1f}s, decode "
          f"{stats.decode_s:.1f}s ({rate:.1f} rec/s, compiles included); total {time.perf_counter() - t_start:.1f}s",
          file=sys.stderr)
    score_args = argparse.Namespace(score=str(results_path), out=str(out_dir), compare=args.compare)
    return run_score(score_args, keep={it.key for it in items})


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    decode_opts = [o for o in ("config", "checkpoint", "data", "src", "tgt", "langs", "limit", "beam",
                               "max_new_tokens") if getattr(args, o) is not None]
    if args.score:
        if decode_opts:
            parser.error(f"--score scores an existing file; do not combine it with "
                         f"{', '.join('--' + o.replace('_', '-') for o in decode_opts)}")
        return run_score(args)
    if not args.config or not args.checkpoint:
        parser.error("give --score RESULTS.jsonl, or --config and --checkpoint to decode a test set")
    for opt in ("batch", "beam", "limit", "max_new_tokens"):
        v = getattr(args, opt)
        if v is not None and v < 1:
            parser.error(f"--{opt.replace('_', '-')} must be >= 1, got {v}")
    return run_decode(args)
