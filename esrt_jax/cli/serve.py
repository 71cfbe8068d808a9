"""`python -m esrt_jax.serve` / `esrt-serve`: the cloud translation service (see `esrt_jax.serve`)."""

from __future__ import annotations

import argparse
import asyncio
from typing import Sequence

from esrt_jax import logs, serve
from esrt_jax.infer import payload as pl
from esrt_jax.serve import Backend, ServeConfig, Service, listen_socket, log, make_app
from esrt_jax.speech.load import load_backend


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The command line's ServeConfig; a bad value -> one-line SystemExit."""
    try:
        return ServeConfig(args.host, args.port, args.max_batch, args.max_wait_ms, args.max_payload_bytes,
                           warmup=args.warmup)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def load_backend_or_exit(args: argparse.Namespace) -> Backend:
    """`load_backend` for the command line: a missing/invalid config, checkpoint or `--set` -> one line."""
    import yaml

    try:
        return load_backend(args.config, args.checkpoint, args.set, split=args.split, max_batch=args.max_batch)
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"error: cannot load the model ({args.config}, {args.checkpoint}): {msg}") from None


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m esrt_jax.serve", description=serve.__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="run config YAML (same as train.py)")
    ap.add_argument("--checkpoint", required=True, help="run dir, stage dir or step dir")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    ap.add_argument("--max-payload-bytes", type=int, default=pl.DEFAULT_MAX_BYTES)
    ap.add_argument("--token-file", default=None)
    ap.add_argument("--split", default=None, choices=pl.SPLITS,
                    help="split point the edge sends (default: the model config's `split`)")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="do not compile every batch bucket at start-up (the first request of each "
                         "new batch size then pays a compile; /healthz is ready at once)")
    args = ap.parse_args(argv)
    logs.setup()
    cfg = config_from_args(args)
    token = pl.read_token(args.token_file)
    sock = listen_socket(cfg)
    backend = load_backend_or_exit(args)
    log.info("serving model %s, split %s, features %s, languages %s", backend.fingerprint, backend.split,
             backend.feature_shape, ",".join(backend.languages or ()) or "any")
    asyncio.run(Service(make_app(backend, cfg, token), sock).run_until_signal())


if __name__ == "__main__":
    main()
