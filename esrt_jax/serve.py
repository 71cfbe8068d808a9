"""Cloud translation service: `python -m esrt_jax.serve --config ... --checkpoint ...`.

HTTP API (aiohttp):
- `POST /v1/translate?src=eng&tgt=deu` with an edge payload (`esrt_jax.infer.payload`) as the
  body (`application/octet-stream`) -> `{"transcription", "translation", "src", "tgt", "scheme",
  "batch_size"}` (`batch_size`: how many requests were decoded together with this one).
- `GET /healthz` -> `{"status": "ok", ...}`; `GET /metrics` -> Prometheus text format.

Requests need `Authorization: Bearer <token>` (token from `--token-file` or $ESRT_SERVE_TOKEN).
Concurrent requests are batched dynamically (up to `max_batch`, waiting at most `max_wait_ms`)
into one jitted decode that runs in a worker thread, so the event loop keeps accepting requests.
On SIGINT/SIGTERM the server stops accepting connections and finishes in-flight requests.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from esrt_jax import languages
from esrt_jax.infer import payload as pl
from esrt_jax.train.restore import load_backend

log = logging.getLogger("esrt_jax.serve")


class Backend(Protocol):
    """What the service needs from a model: payload expectations and a batched decode."""

    fingerprint: str
    split: str
    feature_shape: tuple[int, ...]

    def decode_batch(self, features: np.ndarray, src: Sequence[str], tgt: Sequence[str]
                     ) -> list[tuple[str, str]]:
        """(B, *feature_shape) float32 -> [(transcription, translation)] * B."""


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_batch: int = 8
    max_wait_ms: float = 10.0
    max_payload_bytes: int = pl.DEFAULT_MAX_BYTES


@dataclass
class _Job:
    features: np.ndarray
    src: str
    tgt: str
    future: asyncio.Future


class Batcher:
    """Collects jobs into batches and runs `backend.decode_batch` in one worker thread."""

    def __init__(self, backend: Backend, cfg: ServeConfig, on_batch: Callable[[int], None]):
        self.backend, self.cfg, self.on_batch = backend, cfg, on_batch
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        self.task: asyncio.Task | None = None
        self.inflight = 0

    def start(self):
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, features, src, tgt) -> tuple[tuple[str, str], int]:
        """-> ((transcription, translation), size of the batch it was decoded in)."""
        fut = asyncio.get_running_loop().create_future()
        self.inflight += 1
        try:
            await self.queue.put(_Job(features, src, tgt, fut))
            return await fut
        finally:
            self.inflight -= 1

    async def _run(self):
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            deadline = loop.time() + self.cfg.max_wait_ms / 1000
            while len(jobs) < self.cfg.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    jobs.append(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            feats = np.stack([j.features for j in jobs])
            try:
                outs = await loop.run_in_executor(
                    self.pool, self.backend.decode_batch, feats, [j.src for j in jobs], [j.tgt for j in jobs])
                self.on_batch(len(jobs))
                for j, out in zip(jobs, outs):
                    if not j.future.done():
                        j.future.set_result((out, len(jobs)))
            except Exception as e:  # a failing batch must not kill the service
                log.exception("decode failed for a batch of %d", len(jobs))
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e)

    async def close(self):
        while self.inflight:  # graceful: let queued and running jobs finish
            await asyncio.sleep(0.01)
        if self.task:
            self.task.cancel()
        self.pool.shutdown(wait=True)


BATCHER = web.AppKey("batcher", Batcher)
BATCH_SIZES = web.AppKey("batch_sizes", list)  # every decoded batch's size, in order (tests, debugging)


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def make_app(backend: Backend, cfg: ServeConfig, token: str) -> web.Application:
    """Build the aiohttp application (also used by tests with a real socket)."""
    if not token:
        raise ValueError("a bearer token is required (set --token-file or $ESRT_SERVE_TOKEN)")
    registry = CollectorRegistry()
    requests = Counter("esrt_requests", "translate requests by HTTP status", ["status"], registry=registry)
    batch_hist = Histogram("esrt_batch_size", "decoded batch sizes", registry=registry,
                           buckets=(1, 2, 4, 8, 16, 32, 64))
    latency = Histogram("esrt_request_seconds", "translate request latency", registry=registry)
    batch_sizes: list[int] = []
    inflight = Gauge("esrt_inflight_requests", "translate requests queued or decoding", registry=registry)

    def on_batch(n):
        batch_hist.observe(n)
        batch_sizes.append(n)

    batcher = Batcher(backend, cfg, on_batch)
    inflight.set_function(lambda: batcher.inflight)
    app = web.Application(client_max_size=cfg.max_payload_bytes)
    app[BATCHER], app[BATCH_SIZES] = batcher, batch_sizes

    async def start(app):
        batcher.start()

    async def stop(app):
        await batcher.close()

    app.on_startup.append(start)
    # on_cleanup runs after aiohttp has waited for every in-flight handler (shutdown_timeout), so
    # a request still being read when shutdown began is decoded too, not stranded in the queue.
    app.on_cleanup.append(stop)

    @web.middleware
    async def auth(request, handler):
        if request.path.startswith("/v1/"):
            got = request.headers.get("Authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
                requests.labels("401").inc()
                return web.json_response({"error": "missing or wrong bearer token"}, status=401,
                                         headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    app.middlewares.append(auth)

    async def translate(request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        status, resp = 200, None
        try:
            src, tgt = request.query.get("src", ""), request.query.get("tgt", "")
            try:
                src, tgt = languages.get(src).code, languages.get(tgt).code
            except (KeyError, ValueError) as e:
                status, resp = 400, _json_error(400, f"bad src/tgt: {e}")
                return resp
            if request.content_length is not None and request.content_length > cfg.max_payload_bytes:
                status, resp = 413, _json_error(413, f"payload larger than {cfg.max_payload_bytes} bytes")
                return resp
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                status, resp = 413, _json_error(413, f"payload larger than {cfg.max_payload_bytes} bytes")
                return resp
            try:
                p = pl.decode(body, fingerprint=backend.fingerprint, split=backend.split,
                              shape=backend.feature_shape, max_bytes=cfg.max_payload_bytes)
            except pl.PayloadError as e:
                status, resp = e.status, _json_error(e.status, str(e))
                return resp
            if not np.all(np.isfinite(p.features)):  # well-formed fp16 can still hold NaN/Inf bits
                status, resp = 400, _json_error(400, "payload features contain NaN or Inf")
                return resp
            (transcription, translation), n = await batcher.submit(p.features, src, tgt)
            resp = web.json_response({"transcription": transcription, "translation": translation,
                                      "src": src, "tgt": tgt, "scheme": p.scheme, "batch_size": n})
            return resp
        except Exception as e:
            log.exception("translate failed")
            status, resp = 500, _json_error(500, f"internal error: {type(e).__name__}")
            return resp
        finally:
            requests.labels(str(status)).inc()
            latency.observe(time.perf_counter() - t0)

    async def healthz(request):
        return web.json_response({"status": "ok", "fingerprint": backend.fingerprint,
                                  "split": backend.split, "feature_shape": list(backend.feature_shape)})

    async def metrics(request):
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_post("/v1/translate", translate)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m esrt_jax.serve", description=__doc__.split("\n")[0])
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
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = pl.read_token(args.token_file)
    cfg = ServeConfig(args.host, args.port, args.max_batch, args.max_wait_ms, args.max_payload_bytes)
    backend = load_backend(args.config, args.checkpoint, args.set, split=args.split, max_batch=args.max_batch)
    log.info("serving model %s, split %s, features %s", backend.fingerprint, backend.split, backend.feature_shape)
    web.run_app(make_app(backend, cfg, token), host=cfg.host, port=cfg.port, shutdown_timeout=60)


if __name__ == "__main__":
    main()
