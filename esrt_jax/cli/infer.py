"""Inference CLI: audio in, transcription + translation out.

    python -m esrt_jax.infer --config configs/demo.yaml --checkpoint runs/demo \\
        --audio a.wav --src eng --tgt deu              # one utterance
    python -m esrt_jax.infer --config ... --checkpoint ... --jsonl test.jsonl    # many (ESRT/LLM-SRT JSONL)

The two halves can run apart (on two machines, or at two times):

    python -m esrt_jax.infer ... --jsonl test.jsonl --edge-only feats.jsonl     # edge: audio -> features
    python -m esrt_jax.infer ... --from-embeds feats.jsonl                       # cloud: features -> text

Recordings longer than the encoder's window (30 s for Whisper; `max_source_positions / 50` s in
general) are cut into segments at pauses (`esrt_jax.audio.find_segments`: energy-based voice
activity, at most one window each, a small overlap where speech runs longer than a window); each
segment is decoded and the texts are joined in order. Each result then also lists its
"segments": [{"start", "end", "transcription", "translation"}] (seconds). `--no-segment` cuts every
recording to one window instead, with a warning. Empty or silent audio is an error naming the file.
An empty decoded text (the translation; the transcription with `--task asr`) is a warning naming the
file (and the segment); when every output of the run is empty the command exits with status 3 and
one error line (the results are still printed). Exit status 2: bad input, model or config.

`--edge-only OUT` writes what the edge would send: `OUT.jsonl` holds one line per segment with its
times and payload (`esrt_jax.infer.payload`, `--scheme fp16|int8|int4`, `--zstd`) in base64; any other name
holds the raw payload of a single utterance (exactly the HTTP body the edge client sends; give
`--src/--tgt` again when decoding it); `OUT.npz` holds float32 features (bit-exact, for checks).
`--from-embeds FILE` verifies each payload against the loaded model (fingerprint, split point,
shape, finite values) before decoding. `--checkpoint` is required (`--untrained` runs the model as
built from the config, e.g. to smoke-test a config). Languages outside the set the model was trained
on (`data.languages` saved with the run) are refused. Results are printed as JSON lines {id, audio, src, tgt, transcription,
translation} (and written to `--output` if given). The functions behind it are in
`esrt_jax.infer.batch`; this command module is `esrt_jax.cli.infer` (console command `esrt-infer`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from esrt_jax.config import ConfigError
from esrt_jax.data.tasks import DEFAULT_TASK, TASKS, get_task
from esrt_jax.infer import payload as pl
from esrt_jax.infer.batch import (InferError, Utterance, check_trained, decode_features,  # noqa: F401
                                  encode_segments, encode_utterances, join_segments, read_embeds, translate,
                                  utterances, write_embeds)
from esrt_jax.infer.longform import EMPTY_RC, empty_decodes
from esrt_jax.speech.load import load_model, translator_for


# ----------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    head, _, rest = __doc__.partition("\n\n")
    ap = argparse.ArgumentParser(prog="python -m esrt_jax.infer", description=head,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=rest)
    ap.add_argument("--config", required=True, help="run config YAML (the one train.py used)")
    ap.add_argument("--checkpoint", default=None,
                    help="run dir, stage dir, checkpoints dir or step dir of the trained model")
    ap.add_argument("--untrained", action="store_true",
                    help="no checkpoint: run the model as built from the config (untrained adapter)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--audio", nargs="+", default=[], help="audio file(s), all with --src/--tgt")
    ap.add_argument("--jsonl", default=None, help="JSONL of records (audio, src, tgt per line)")
    ap.add_argument("--src", default=None)
    ap.add_argument("--tgt", default=None)
    ap.add_argument("--edge-only", default=None, metavar="OUT",
                    help="run only the edge half and write its features to OUT (.jsonl / .npz / raw payload)")
    ap.add_argument("--from-embeds", default=None, metavar="FILE", help="run only the cloud half on an --edge-only file")
    ap.add_argument("--scheme", default="fp16", choices=pl.SCHEMES, help="payload quantisation for --edge-only")
    ap.add_argument("--zstd", action="store_true", help="zstd-compress --edge-only payloads")
    ap.add_argument("--split", default=None, choices=pl.SPLITS, help="split point (default: the model config's)")
    # tasks whose prompt holds no reference text: inference input has none
    ap.add_argument("--task", default=DEFAULT_TASK, choices=[n for n, t in TASKS.items() if not t.given])
    ap.add_argument("--no-segment", dest="segment", action="store_false",
                    help="do not segment recordings longer than the encoder's window: cut them to it (warns)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--num-beams", type=int, default=None)
    ap.add_argument("--output", default=None, help="also write the results as JSONL here")
    args = ap.parse_args(argv)
    if (args.checkpoint is None) == (not args.untrained):
        ap.error("give --checkpoint RUN_DIR (the trained model), or --untrained to run the model as "
                 "built from the config" if args.checkpoint is None else "--checkpoint and --untrained "
                 "exclude each other")
    if args.edge_only and args.from_embeds:
        ap.error("--edge-only and --from-embeds are the two halves; give one of them")
    if args.from_embeds and (args.jsonl or args.audio):
        ap.error("--from-embeds decodes a features file; do not also give --audio/--jsonl")
    if args.batch_size < 1:
        ap.error("--batch-size must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.untrained:
        print("note: --untrained: running the model as built from the config (untrained adapter)",
              file=sys.stderr)
    try:
        loaded = load_model(args.config, args.checkpoint, args.set)
        gen = {k: v for k, v in (("max_new_tokens", args.max_new_tokens), ("num_beams", args.num_beams)) if v}
        tr = translator_for(loaded, split=args.split, max_batch=args.batch_size, gen_overrides=gen)
    except (ConfigError, FileNotFoundError, ImportError, KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    fp = loaded.fingerprint
    try:
        if args.from_embeds:
            feats, utts = read_embeds(args.from_embeds, fingerprint=fp, split=tr.split, shape=tr.feature_shape,
                                      src=args.src, tgt=args.tgt)
            check_trained(utts, loaded.languages)
            results = join_segments(decode_features(tr, feats, utts, args.batch_size, args.task), utts)
        else:
            utts = utterances(args.audio, args.jsonl, args.src, args.tgt)
            check_trained(utts, loaded.languages)
            if args.edge_only:
                feats, segs = encode_segments(tr, utts, args.batch_size, segment=args.segment)
                out = write_embeds(args.edge_only, feats, segs, fingerprint=fp, split=tr.split,
                                   scheme=args.scheme, compress=args.zstd)
                print(f"wrote {len(utts)} utterance(s) ({len(segs)} segments) of {tr.split} features "
                      f"{tr.feature_shape} to {out} ({out.stat().st_size} bytes, model {fp})", file=sys.stderr)
                return 0
            results = translate(tr, utts, args.batch_size, args.task, segment=args.segment)
    except (InferError, ValueError, OSError) as e:  # LanguageError, ConfigError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    warnings, error = empty_decodes(results, get_task(args.task).outputs[-1])
    for w in warnings + [error] * bool(error):
        print(w, file=sys.stderr)
    lines = [json.dumps(r, ensure_ascii=False) for r in results]  # written even when empty: nothing lost
    print("\n".join(lines))
    if args.output:
        Path(args.output).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return EMPTY_RC if error else 0


if __name__ == "__main__":
    sys.exit(main())
