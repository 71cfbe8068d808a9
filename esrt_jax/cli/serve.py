"""`python -m esrt_jax.serve` / `esrt-serve`: the cloud translation service (see `esrt_jax.serve`)."""

from __future__ import annotations

import argparse
import logging
from typing import Sequence

from aiohttp import web

from esrt_jax import serve
from esrt_jax.infer import payload as pl
from esrt_jax.serve import AccessLogger, ServeConfig, log, make_app
from esrt_jax.speech.load import load_backend


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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = pl.read_token(args.token_file)
    cfg = ServeConfig(args.host, args.port, args.max_batch, args.max_wait_ms, args.max_payload_bytes,
                      warmup=args.warmup)
    backend = load_backend(args.config, args.checkpoint, args.set, split=args.split, max_batch=args.max_batch)
    log.info("serving model %s, split %s, features %s, languages %s", backend.fingerprint, backend.split,
             backend.feature_shape, ",".join(backend.languages or ()) or "any")
    web.run_app(make_app(backend, cfg, token), host=cfg.host, port=cfg.port, shutdown_timeout=60,
                access_log_class=AccessLogger)


if __name__ == "__main__":
    main()
