"""`python eval.py`: decode a test set with a trained model and score it, or score a results file.

Decode + score:

    python eval.py --config configs/demo.yaml --checkpoint runs/demo [--data test.jsonl]
        [--src eng,deu] [--tgt all] [--langs eng,deu,fra] [--limit N] [--beam 5] [--batch 64]
        [--task srt|asr|smt] [--max-new-tokens N] [--out DIR] [--overwrite] [--no-swap]
        [--no-segment]

decodes every (utterance, target) record of `--data` (ESRT or LLM-SRT JSONL; default: the demo
corpus' test sets when the config trains on it: with `data.demo_heldout_clips`, the trained clips
with noise added, the held-out clips, then the held-out sentences, each reported, then one
closing line per set) with the jitted generator, encoding each audio
once for all its targets (`esrt_jax.eval.decode`), writes `DIR/results.jsonl` in the public ESRT
result schema, then scores it into DIR exactly as `--score` does. An interrupted decode resumes
from the records already in `results.jsonl`. Then, unless `--no-swap`, the same records are
decoded again with each clip's audio swapped for another clip's (`results.swapped.jsonl`), for
the listening diagnostic (audio gain, distinct outputs: `esrt_jax.eval.listening`). Audio longer
than the encoder's window is cut into segments at pauses, each decoded, and the joined texts are
scored (`--no-segment`: cut to one window instead). Without --src/--tgt/--langs, the languages are the
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
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from esrt_jax import metrics
from esrt_jax.config import ConfigError
from esrt_jax.data.demo import clip_split, demo_corpus_for, noisy_clips
from esrt_jax.data.encode_cache import FeatureCache, encoder_fingerprint
from esrt_jax.data.tasks import DEFAULT_TASK, TASKS
from esrt_jax.eval import compare as cmp
from esrt_jax.eval import decode as dec
from esrt_jax.eval import listening, report, results
from esrt_jax.speech.config import SpeechDataConfig
from esrt_jax.speech.load import load_model, translator_for

__all__ = ["build_parser", "main", "run_score", "run_decode", "default_out_dir", "default_test_sets"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eval.py",
        description="Decode a test set and/or score speech-translation results: BLEU/chrF++/spBLEU "
                    "per direction, WER/CER per language.",
        epilog="Give --score RESULTS.jsonl to score a results file, or --config + --checkpoint to decode "
               "a test set first (see esrt_jax/cli/eval.py).",
    )
    p.add_argument(
        "--score",
        metavar="RESULTS.jsonl",
        help="results file to score (public ESRT schema, or original LLM-SRT/ESRT inference output)",
    )
    p.add_argument("--out", metavar="DIR",
                   help="report directory (decode: also holds results.jsonl; default <stage dir>/eval/<data name>; "
                        "several default demo test sets: the first here, the others in subfolders; "
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
    d.add_argument("--task", default=DEFAULT_TASK, choices=list(TASKS),
                   help="; ".join(f"{n}: {t.help}" + (" (default)" if n == DEFAULT_TASK else "")
                                  for n, t in TASKS.items()))
    d.add_argument("--beam", type=int, metavar="N", help="beam size (default: the config's, else greedy)")
    d.add_argument("--batch", type=int, default=64, help="utterances per encode and records per decode (default 64)")
    d.add_argument("--max-new-tokens", type=int, metavar="N", help="generation length cap (default: the config's)")
    d.add_argument("--overwrite", action="store_true", help="start the results file over instead of resuming")
    d.add_argument("--no-swap", dest="swap", action="store_false",
                   help="skip the listening check (a second decode with each clip's audio replaced by "
                        "another clip's, scored as the audio gain; it doubles the decode time)")
    d.add_argument("--no-segment", dest="segment", action="store_false",
                   help="do not segment audio longer than the encoder's window (default: cut it into segments "
                        "at pauses, decode each and score the joined text): cut it to one window (warns)")
    d.add_argument("--encoder-cache", metavar="DIR",
                   help="encoder feature cache (python -m esrt_jax.data.encode_cache ... --data TEST.jsonl) "
                        "to read instead of running the encoder (default: the config's data.encoder_cache)")
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
    listen = _listening(rf, scores, keep)
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
    paths = report.write_reports(scores, rf, out_dir, comparison, args.compare or "", listen)
    print(report.format_terminal(scores, rf, comparison, args.compare or "", listen))
    print()
    print(f"reports in {out_dir}: " + ", ".join(p.name for p in paths.values()))
    return 0


def _listening(rf, scores, keep: Optional[set]):
    """Listening diagnostics of rf; with its swapped-audio decode (`listening.swapped_path`)
    when that file is there, restricted to the records of rf."""
    sw_path = listening.swapped_path(rf.path)
    if not sw_path.is_file():
        return listening.listening(rf.records, scores)
    mine = {(r.id, r.src, r.tgt) for r in rf.records}
    sw = [r for r in results.read_results(sw_path).records if (r.id, r.src, r.tgt) in mine]
    if not sw:
        return listening.listening(rf.records, scores)
    return listening.listening(rf.records, scores, metrics.score_records(sw, use_spbleu=False), sw)


def _default_data(cfg) -> str | None:
    """The first default test set of a demo run config (`default_test_sets`), else None."""
    sets = default_test_sets(cfg)
    return sets[0][1] if sets else None


def default_test_sets(cfg) -> list[tuple[str, str]]:
    """[(label, test file)] for a run config that trains on the demo corpus (built if needed): its
    test set of held-out sentences and, with `data.demo_heldout_clips`, first one trained voice's
    clips with noise added and the held-out clips (training sentences, each in a voice it was not
    trained in); see `esrt_jax.data.demo.clip_split`. [] otherwise."""
    sd = SpeechDataConfig.of(cfg)
    if not sd.demo:
        return []
    d = demo_corpus_for(cfg.data)
    if not sd.demo_heldout_clips:
        return [("held-out sentences", str(d / "test.jsonl"))]
    split = clip_split(d, sd.demo_sentences)
    return [("trained clips + noise", str(noisy_clips(d, split["trained"]))),
            ("held-out clips", str(split["heldout"])),
            ("held-out sentences", str(split["test"]))]


def run_decode(args: argparse.Namespace) -> int:
    """Load the model, decode the test set(s) into OUT/results.jsonl (resuming), then score them."""
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
    cache_dir = args.encoder_cache or loaded.run_config.data.get("encoder_cache")
    try:
        cache = FeatureCache(cache_dir, encoder_fingerprint(loaded.model.encoder)) if cache_dir else None
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t_load = time.perf_counter() - t_start
    sets = [("", args.data)] if args.data else default_test_sets(loaded.run_config)
    if not sets:
        print("error: --data is required (the run config does not use the demo corpus)", file=sys.stderr)
        return 2
    langs = args.langs
    cfg_langs = loaded.run_config.data.get("languages")
    if args.src is None and args.tgt is None and langs is None and cfg_langs:
        langs = ",".join(cfg_langs)
        print(f"languages: {langs} (the run config's data.languages; --langs all for every language in the data)",
              file=sys.stderr)
    closing = []
    rc = 0
    for i, (label, data) in enumerate(sets):
        if label:
            print(f"\n=== {label}: {data}", file=sys.stderr)
        # --out holds the first test set's reports, further default sets go into subfolders.
        out = args.out if not args.out or i == 0 else str(Path(args.out) / Path(data).stem)
        rc_one, summary = _decode_and_score(args, loaded, tr, data, langs, t_start, t_load, out, cache)
        rc = max(rc, rc_one)
        if summary is not None:
            closing.append((label or Path(data).stem, summary))
    if len(closing) > 1:
        print()
        print(_closing_table(closing))
    return rc


def _closing_table(rows: list[tuple[str, dict]]) -> str:
    """One line per test set: BLEU, ASR error, audio gains, distinct share."""
    def f(v, nd=1):
        return "n/a" if v is None else f"{v:.{nd}f}"

    head = ["test set", "BLEU", "ASR err %", "BLEU gain", "WER gain", "distinct", "records"]
    body = []
    for label, s in rows:
        li = s.get("listening", {})
        body.append([label, f(s["averages"].get("bleu")), f(s["averages"].get("asr_error")), f(li.get("bleu_gain")),
                     f(li.get("wer_gain")), f(li.get("distinct_share"), 2), str(s["records"])])
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join(["summary (audio gain: real audio minus another clip's audio; distinct: distinct outputs / "
                      "distinct references)", fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body])


def _decode_and_score(args, loaded, tr, data: str, langs, t_start: float, t_load: float, out: Optional[str],
                      cache: Optional[FeatureCache] = None):
    """Decode one test file (and its swapped-audio twin), score it: (exit code, summary dict or None).
    `cache`: encoder outputs to read instead of running the encoder."""
    try:
        items, issues = dec.read_items(data, src=args.src, tgt=args.tgt, langs=langs, limit=args.limit,
                                       task=args.task)
    except Exception as e:  # DecodeError, LanguageError for a bad --src/--tgt/--langs code
        print(f"error: {e}", file=sys.stderr)
        return 2, None
    if issues:
        print(dec.summarize_issues(issues, data), file=sys.stderr)
    if not items:
        print(f"error: {data}: no records to decode for this selection", file=sys.stderr)
        return 1, None
    stage_dir = loaded.checkpoint_dir.parent if loaded.checkpoint_dir is not None else Path(loaded.run_config.run_dir)
    name = Path(data).stem + ("" if args.task == DEFAULT_TASK else f"_{args.task}")
    out_dir = Path(out) if out else stage_dir / "eval" / name
    results_path = out_dir / "results.jsonl"
    info = {"config": str(args.config), "overrides": list(args.set), "checkpoint": str(args.checkpoint),
            "stage": loaded.stage, "step": loaded.step, "data": str(Path(data).absolute())}
    n_utts = len({it.path for it in items})
    print(f"model: stage {loaded.stage} step {loaded.step} ({loaded.fingerprint}), loaded in {t_load:.1f}s; "
          f"{len(items)} records from {n_utts} utterances -> {results_path}", file=sys.stderr)
    try:
        stats = dec.decode_to_file(tr, items, results_path, task=args.task, batch=args.batch,
                                   progress=not args.no_progress, overwrite=args.overwrite, info=info,
                                   fingerprint=loaded.fingerprint, encoder_cache=cache,
                                   segment=args.segment)
    except dec.DecodeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2, None
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
    sw_path = listening.swapped_path(results_path)
    if args.swap:
        # The listening check: the same records again, each clip's audio replaced by another one's.
        partners = listening.swap_partners([it.path for it in items], [it.src for it in items],
                                           [it.transcription for it in items])
        t0 = time.perf_counter()
        try:
            sw = dec.decode_to_file(tr, items, sw_path, task=args.task, batch=args.batch,
                                    progress=not args.no_progress, overwrite=args.overwrite,
                                    info={**info, "audio": "swapped"}, fingerprint=loaded.fingerprint,
                                    audio_of=partners.__getitem__, encoder_cache=cache,
                                    segment=args.segment)
        except dec.DecodeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2, None
        print(f"swapped-audio decode: {sw.decoded} records in {time.perf_counter() - t0:.1f}s -> {sw_path}",
              file=sys.stderr)
    elif sw_path.exists():
        sw_path.unlink()  # a stale one would be scored as this decode's
    score_args = argparse.Namespace(score=str(results_path), out=str(out_dir), compare=args.compare)
    rc = run_score(score_args, keep={it.key for it in items})
    summary_path = out_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if rc == 0 and summary_path.is_file() else None
    return rc, summary


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


if __name__ == "__main__":
    sys.exit(main())
