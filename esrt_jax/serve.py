"""Cloud translation service: `python -m esrt_jax.serve --config ... --checkpoint ...`.

HTTP API (aiohttp):
- `POST /v1/translate?src=eng&tgt=deu` with an edge payload (`esrt_jax.infer.payload`) as the
  body (`application/octet-stream`) -> `{"transcription", "translation", "src", "tgt", "scheme",
  "batch_size"}` (`batch_size`: how many requests were decoded together with this one).
  Languages outside the served model's training set (saved with the run) get 422.
- `GET /healthz` -> 200 `{"status": "ok", "warmup": {"done", "total"}, ...}` once every batch bucket
  is compiled, 503 `{"status": "warming", ...}` before (readiness); `GET /metrics` -> Prometheus
  text format, every HTTP response counted by status.

One request is one encoder window. A recording longer than that is segmented where the audio is:
the edge client (`esrt_jax.edge`) cuts it at pauses, sends one payload per segment (several at
once, so they are batched here) and joins the answers in order with each segment's start/end.

Requests need `Authorization: Bearer <token>` (token from `--token-file` or $ESRT_SERVE_TOKEN).
Concurrent requests are batched dynamically (up to `max_batch`, waiting at most `max_wait_ms`)
into one jitted decode that runs in a worker thread, so the event loop keeps accepting requests.
At start-up (unless `--no-warmup`) the worker thread first compiles the decode for every batch
bucket, so no request pays a compile. The access log never shows query strings (a token sent there
must not end up in logs). On SIGINT/SIGTERM the server stops accepting connections and finishes
in-flight requests.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from esrt_jax import languages
from esrt_jax.config import setting
from esrt_jax.infer import payload as pl

log = logging.getLogger("esrt_jax.serve")


class Backend(Protocol):
    """What the service needs from a model: payload expectations and a batched decode."""

    fingerprint: str
    split: str
    feature_shape: tuple[int, ...]
    languages: tuple[str, ...] | None  # codes the model was trained on (None: not known, any)

    def decode_batch(self, features: np.ndarray, src: Sequence[str], tgt: Sequence[str]
                     ) -> list[tuple[str, str]]:
        """(B, *feature_shape) float32 -> [(transcription, translation)] * B."""

    def warmup_batches(self) -> Sequence[int]:
        """Batch sizes whose compiled decode covers every batch the service can form."""

    def warm(self, batch_size: int) -> None:
        """Compile (and run once) the decode for `batch_size`."""


@dataclass(frozen=True)
class ServeConfig:
    host: str = setting("127.0.0.1", help="address to listen on")
    port: int = setting(8080, help="port to listen on (0: any free one)")
    max_batch: int = setting(8, help="most requests decoded together")
    max_wait_ms: float = setting(10.0, help="longest wait for a batch to fill")
    max_payload_bytes: int = setting(pl.DEFAULT_MAX_BYTES, help="largest request body accepted")
    warmup: bool = setting(True, help="compile every batch bucket before serving (healthz reports progress)")


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
        self.warm_sizes = list(backend.warmup_batches()) if cfg.warmup else []
        self.warmed = 0

    @property
    def ready(self) -> bool:
        return self.warmed == len(self.warm_sizes)

    def start(self):
        loop = asyncio.get_running_loop()
        for n in self.warm_sizes:  # queued first on the one worker thread: requests wait behind it
            loop.run_in_executor(self.pool, self._warm, n)
        self.task = loop.create_task(self._run())

    def _warm(self, n: int) -> None:
        t0 = time.perf_counter()
        try:
            self.backend.warm(n)
            log.info("warm-up: decode for batch %d compiled in %.1fs", n, time.perf_counter() - t0)
        except Exception:  # a failed warm-up only costs a compile later
            log.exception("warm-up for batch %d failed", n)
        self.warmed += 1

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


class AccessLogger(AbstractAccessLogger):
    """aiohttp access log without query strings (they may carry secrets)."""

    def log(self, request, response, time):
        path = request.path + ("?<redacted>" if request.query_string else "")
        self.logger.info('%s "%s %s" %s %s %.3fs', request.remote, request.method, path,
                         response.status, response.body_length, time)


def bearer_ok(header: str, token: str) -> bool:
    """Constant-time check of an Authorization header; any undecodable header is just wrong."""
    try:
        got = header.encode("utf-8", "surrogateescape")
    except UnicodeError:
        return False
    return hmac.compare_digest(got, f"Bearer {token}".encode())


def make_app(backend: Backend, cfg: ServeConfig, token: str) -> web.Application:
    """Build the aiohttp application (also used by tests with a real socket)."""
    if not token:
        raise ValueError("a bearer token is required (set --token-file or $ESRT_SERVE_TOKEN)")
    registry = CollectorRegistry()
    requests = Counter("esrt_requests", "HTTP responses by status (every path, errors included)",
                       ["status"], registry=registry)
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
    async def observe(request, handler):
        """Outermost: every response is counted (aiohttp's own 404/405/413 and 500s included)."""
        t0 = time.perf_counter()
        status = None
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except web.HTTPException as e:
            status = e.status
            raise
        except Exception as e:  # noqa: BLE001 - one bad request must not take the service down
            log.exception("%s %s failed", request.method, request.path)
            status = 500
            return _json_error(500, f"internal error: {type(e).__name__}")
        finally:  # status None: the client went away (cancelled), no response was sent
            if status is not None:
                requests.labels(str(status)).inc()
            if request.path == "/v1/translate":
                latency.observe(time.perf_counter() - t0)

    @web.middleware
    async def auth(request, handler):
        if request.path.startswith("/v1/") and not bearer_ok(request.headers.get("Authorization", ""), token):
            return web.json_response({"error": "missing or wrong bearer token"}, status=401,
                                     headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    app.middlewares.extend([observe, auth])
    served = tuple(backend.languages) if getattr(backend, "languages", None) else None

    async def translate(request: web.Request) -> web.Response:
        src, tgt = request.query.get("src", ""), request.query.get("tgt", "")
        try:
            src, tgt = languages.get(src).code, languages.get(tgt).code
        except (KeyError, ValueError) as e:
            return _json_error(400, f"bad src/tgt: {e}")
        try:
            languages.check_trained(served, src, tgt)
        except languages.NotTrainedError as e:
            return _json_error(422, str(e))
        if request.content_length is not None and request.content_length > cfg.max_payload_bytes:
            return _json_error(413, f"payload larger than {cfg.max_payload_bytes} bytes")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _json_error(413, f"payload larger than {cfg.max_payload_bytes} bytes")
        try:
            p = pl.decode(body, fingerprint=backend.fingerprint, split=backend.split,
                          shape=backend.feature_shape, max_bytes=cfg.max_payload_bytes)
        except pl.PayloadError as e:
            return _json_error(e.status, str(e))
        (transcription, translation), n = await batcher.submit(p.features, src, tgt)
        return web.json_response({"transcription": transcription, "translation": translation,
                                  "src": src, "tgt": tgt, "scheme": p.scheme, "batch_size": n})

    async def healthz(request):
        ready = batcher.ready
        return web.json_response({"status": "ok" if ready else "warming", "fingerprint": backend.fingerprint,
                                  "split": backend.split, "feature_shape": list(backend.feature_shape),
                                  "languages": list(served) if served else None,
                                  "warmup": {"done": batcher.warmed, "total": len(batcher.warm_sizes)}},
                                 status=200 if ready else 503)

    async def metrics(request):
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_post("/v1/translate", translate)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


if __name__ == "__main__":  # the command is esrt_jax.cli.serve (commands live in the top layer)
    import runpy

    runpy.run_module("esrt_jax.cli.serve", run_name="__main__", alter_sys=True)
