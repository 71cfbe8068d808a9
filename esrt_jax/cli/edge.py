"""`python -m esrt_jax.edge` / `esrt-edge`: the edge client (see `esrt_jax.edge`). With `--runtime onnx` it
imports no JAX, Flax or torch (what it imports is `esrt_jax.edge`'s no-JAX half)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from esrt_jax import audio as audio_lib
from esrt_jax import edge, languages
from esrt_jax.edge import RUNTIMES, EdgeClient, EdgeError, EdgeModelError
from esrt_jax.infer import payload as pl
from esrt_jax.infer.longform import EMPTY_RC, empty_decodes


def client_from_args(args: argparse.Namespace) -> EdgeClient:
    """The command line's client, checked against the service; a token, model or service that
    cannot be used -> one-line SystemExit."""
    token = pl.read_token(args.token_file)
    kw = dict(server=args.server, token=token, scheme=args.scheme, compress=args.zstd, timeout=args.timeout)
    try:
        if args.runtime == "onnx":
            client = EdgeClient.from_onnx(args.model, threads=args.threads, **kw)
        else:
            import yaml  # the jax runtime's config; not needed (nor installed) on an onnx device

            try:
                client = EdgeClient.from_checkpoint(args.config, args.checkpoint, args.set, split=args.split, **kw)
            except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise EdgeModelError(f"cannot load the edge model ({args.config}, {args.checkpoint}): {msg}") from None
        client.check_service()
    except (EdgeError, EdgeModelError) as e:
        raise SystemExit(f"error: {e}") from None
    return client


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m esrt_jax.edge", description=edge.__doc__.split("\n\n")[0],
        epilog=f"Exit status: 0 done; 1 a file failed (one line each; the other files still run); {EMPTY_RC} "
               f"every translation came back empty (damaged or untrained model; the results are still printed); "
               f"an empty one among others is a warning.")
    ap.add_argument("--runtime", default="jax", choices=RUNTIMES,
                    help="jax: our model from --config/--checkpoint; onnx: the exported --model in "
                         "onnxruntime (no JAX needed)")
    ap.add_argument("--config", help="run config YAML (the same as the server's; --runtime jax)")
    ap.add_argument("--checkpoint", help="run dir, stage dir or step dir (same as the server's; --runtime jax)")
    ap.add_argument("--model", help="exported edge model, OUT/edge.onnx or OUT/edge.int8.onnx (--runtime onnx)")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: one per core)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--audio", required=True, nargs="+", help="audio file(s) (wav/flac/...)")
    ap.add_argument("--src", required=True, help="source language (ISO 639-3)")
    ap.add_argument("--tgt", required=True, help="target language (ISO 639-3)")
    ap.add_argument("--server", required=True, help="service URL, e.g. http://127.0.0.1:8080")
    ap.add_argument("--scheme", default="fp16", choices=pl.SCHEMES)
    ap.add_argument("--zstd", action="store_true", help="zstd-compress the payload body")
    ap.add_argument("--split", default=None, choices=pl.SPLITS,
                    help="split point (must match the server's; default: the model config's)")
    ap.add_argument("--token-file", default=None, help="bearer token file (default: $ESRT_SERVE_TOKEN)")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--no-segment", dest="segment", action="store_false",
                    help="do not segment audio longer than the encoder's window: cut it to one window (warns)")
    args = ap.parse_args(argv)
    if args.runtime == "jax" and not (args.config and args.checkpoint):
        ap.error("--runtime jax needs --config and --checkpoint")
    if args.runtime == "onnx" and (not args.model or args.config or args.checkpoint or args.set or args.split):
        ap.error("--runtime onnx takes --model (the exported file, which fixes the split point) instead of "
                 "--config/--checkpoint/--set/--split")

    try:
        src, tgt = languages.get(args.src).code, languages.get(args.tgt).code
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    client = client_from_args(args)
    rc, results = 0, []
    for path in args.audio:
        try:
            out = client.translate(path, src, tgt, segment=args.segment)
        except (EdgeError, audio_lib.AudioError, ValueError) as e:  # this file failed: say so, go on
            print(f"error: {path}: {e}", file=sys.stderr)
            rc = 1
            continue
        results.append({"audio": str(path), **out})
        print(json.dumps(results[-1], ensure_ascii=False))
    warnings, error = empty_decodes(results, "translation")
    for w in warnings + [error] * bool(error):
        print(w, file=sys.stderr)
    return EMPTY_RC if error else rc


if __name__ == "__main__":
    sys.exit(main())
