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
must not end up in logs).

Limits (`ServeConfig`): a request line and headers must arrive within `header_timeout_s` of the
connection (or of the previous response), a body within `body_timeout_s` of its headers (408);
at most `max_unauthenticated` connections that have not yet shown a valid token are kept (the
oldest is closed first). A client that goes away mid-upload is counted as status 499, without a
traceback; aiohttp's own parser-level 400s are counted too. On SIGINT/SIGTERM the server stops
accepting connections, answers a request whose body is still uploading with 503 (after at most
`UPLOAD_GRACE_S`), lets decodes in flight finish and gives up on what is left after `drain_s`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from esrt_jax import languages
from esrt_jax.config import setting
from esrt_jax.infer import payload as pl

log = logging.getLogger("esrt_jax.serve")
UPLOAD_GRACE_S = 1.0   # on shutdown, a body still uploading gets this long to finish before its 503
CLIENT_CLOSED = 499    # metrics/access-log status of a request whose client went away (nginx's)
LINGER_S = 2.0         # after answering a request whose body was not read, read (and drop) it this long


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
    header_timeout_s: float = setting(10.0, help="deadline of the request line + headers, from connect or the "
                                                 "previous response")
    body_timeout_s: float = setting(60.0, help="deadline of the whole body, from the end of its headers "
                                               "(8 MB at ~1 Mbit/s)")
    drain_s: float = setting(10.0, help="on shutdown: how long in-flight requests may still take")
    max_unauthenticated: int = setting(64, help="open connections without a valid token yet (oldest closed "
                                                "first)")

    def __post_init__(self):
        for name in ("max_batch", "max_payload_bytes", "max_unauthenticated"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if type(self.port) is not int or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port!r}")
        for name in ("max_wait_ms", "header_timeout_s", "body_timeout_s", "drain_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 <= v < float("inf")) or (v == 0 and name != "max_wait_ms"):
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")


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


class Limits:
    """What the service's connections share: the draining flag, the response counter and the
    connections that have not shown a valid token yet (insertion order: oldest first)."""

    def __init__(self, cfg: ServeConfig, count: Callable[[int], None], evicted: Callable[[], None]):
        self.cfg, self.count, self.evicted = cfg, count, evicted
        self.draining = asyncio.Event()
        self.unauthenticated: dict[RequestHandler, None] = {}

    def opened(self, conn: RequestHandler) -> None:
        while len(self.unauthenticated) >= self.cfg.max_unauthenticated:
            oldest = next(iter(self.unauthenticated))
            del self.unauthenticated[oldest]
            self.evicted()
            oldest.force_close()
        self.unauthenticated[conn] = None

    def authenticated(self, conn: RequestHandler) -> None:
        self.unauthenticated.pop(conn, None)

    def closed(self, conn: RequestHandler) -> None:
        self.unauthenticated.pop(conn, None)


LIMITS = web.AppKey("limits", Limits)


class _Connection(RequestHandler):
    """aiohttp's per-connection protocol with the service's `Limits`; its parser-level errors
    (a malformed request line or header) are counted and logged in one line."""

    def __init__(self, manager, limits: Limits, **kw):
        super().__init__(manager, **kw)
        self.limits = limits

    def connection_made(self, transport):
        super().connection_made(transport)
        self.limits.opened(self)

    def connection_lost(self, exc):
        self.limits.closed(self)
        super().connection_lost(exc)

    def handle_error(self, request, status=500, exc=None, message=None):
        self.limits.count(status)
        if status >= 500:
            return super().handle_error(request, status, exc, message)
        # the client's fault: one line, no traceback (aiohttp's messages quote the bad bytes over lines)
        log.info("bad request from %s: %s", request.remote, " ".join(str(message or exc).split())[:300])
        resp = web.Response(status=status, text=f"{status}: {message or 'bad request'}\n")
        resp.force_close()
        return resp


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class AccessLogger(AbstractAccessLogger):
    """aiohttp access log without query strings (they may carry secrets)."""

    def log(self, request, response, time):
        path = request.path + ("?<redacted>" if request.query_string else "")
        self.logger.info('%s "%s %s" %s %s %.3fs', request.remote, request.method, path,
                         response.status, response.body_length, time)


def bearer_ok(header: str, token: str) -> bool:
    """Constant-time check of an Authorization header against the token, as UTF-8 bytes on both
    sides (aiohttp decodes header bytes as UTF-8 with surrogateescape; the edge client sends the
    token's UTF-8 bytes); any undecodable header is just wrong."""
    try:
        got = header.encode("utf-8", "surrogateescape")
        want = f"Bearer {token}".encode("utf-8", "surrogateescape")
    except UnicodeError:
        return False
    return hmac.compare_digest(got, want)


def make_app(backend: Backend, cfg: ServeConfig, token: str) -> web.Application:
    """Build the aiohttp application (also used by tests with a real socket); serve it with
    `Service` (which applies `cfg`'s connection limits)."""
    if not token:
        raise ValueError("a bearer token is required (set --token-file or $ESRT_SERVE_TOKEN)")
    registry = CollectorRegistry()
    requests = Counter("esrt_requests", "HTTP responses by status (every path, errors included; "
                       f"{CLIENT_CLOSED}: the client went away)", ["status"], registry=registry)
    evicted = Counter("esrt_unauthenticated_evicted", "connections closed to stay within max_unauthenticated",
                      registry=registry)
    batch_hist = Histogram("esrt_batch_size", "decoded batch sizes", registry=registry,
                           buckets=(1, 2, 4, 8, 16, 32, 64))
    latency = Histogram("esrt_request_seconds", "translate request latency", registry=registry)
    batch_sizes: list[int] = []
    inflight = Gauge("esrt_inflight_requests", "translate requests queued or decoding", registry=registry)

    def on_batch(n):
        batch_hist.observe(n)
        batch_sizes.append(n)

    batcher = Batcher(backend, cfg, on_batch)
    limits = Limits(cfg, lambda status: requests.labels(str(status)).inc(), evicted.inc)
    inflight.set_function(lambda: batcher.inflight)
    app = web.Application(client_max_size=cfg.max_payload_bytes)
    app[BATCHER], app[BATCH_SIZES], app[LIMITS] = batcher, batch_sizes, limits

    async def start(app):
        batcher.start()

    async def stop(app):
        await batcher.close()

    app.on_startup.append(start)
    # on_cleanup runs after aiohttp has waited for every in-flight handler (drain_s), so a decode
    # in flight when shutdown began is answered, not stranded in the queue.
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
        finally:  # status None: the handler was cancelled, no response was sent
            if status is not None:
                requests.labels(str(status)).inc()
            if request.path == "/v1/translate":
                latency.observe(time.perf_counter() - t0)

    @web.middleware
    async def auth(request, handler):
        if request.path.startswith("/v1/"):
            if not bearer_ok(request.headers.get("Authorization", ""), token):
                return web.json_response({"error": "missing or wrong bearer token"}, status=401,
                                         headers={"WWW-Authenticate": "Bearer"})
            limits.authenticated(request.protocol)
        return await handler(request)

    app.middlewares.extend([observe, auth])
    served = tuple(backend.languages) if getattr(backend, "languages", None) else None

    async def read_body(request: web.Request) -> bytes:
        """The whole body within `body_timeout_s` (else 408); on shutdown, 503 unless it ends
        within `UPLOAD_GRACE_S`; a client gone mid-upload -> _Refused(CLIENT_CLOSED)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.body_timeout_s
        read = asyncio.ensure_future(request.read())
        drain = asyncio.ensure_future(limits.draining.wait())
        try:
            await asyncio.wait({read, drain}, timeout=cfg.body_timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if not read.done() and drain.done():
                await asyncio.wait({read}, timeout=max(0.0, min(UPLOAD_GRACE_S, deadline - loop.time())))
        finally:
            drain.cancel()
            arrived = read.done()
            if not arrived:
                read.cancel()
        if not arrived:
            if limits.draining.is_set():
                raise _Refused(503, "the service is shutting down; the request body did not arrive in time")
            raise _Refused(408, f"the request body did not arrive within {cfg.body_timeout_s:g} s")
        try:
            return read.result()
        except web.HTTPRequestEntityTooLarge:
            raise _Refused(413, f"payload larger than {cfg.max_payload_bytes} bytes") from None
        except ConnectionError:  # the client went away mid-upload: nobody to answer, nothing to alert on
            log.info("%s went away while uploading a request body", request.remote)
            raise _Refused(CLIENT_CLOSED, "client closed the connection") from None
        except HttpProcessingError as e:
            raise _Refused(400, f"malformed request body: {e.message}") from None

    async def translate(request: web.Request) -> web.Response:
        if limits.draining.is_set():
            return _json_error(503, "the service is shutting down")
        src, tgt = request.query.get("src", ""), request.query.get("tgt", "")
        try:
            src, tgt = languages.get(src).code, languages.get(tgt).code
        except (KeyError, ValueError) as e:
            return _json_error(400, f"bad src/tgt: {e}")
        try:
            check_direction(served, src, tgt)
        except languages.NotTrainedError as e:
            return _json_error(422, str(e))
        if request.content_length is not None and request.content_length > cfg.max_payload_bytes:
            return _json_error(413, f"payload larger than {cfg.max_payload_bytes} bytes")
        try:
            body = await read_body(request)
        except _Refused as e:
            resp = _json_error(e.status, str(e))
            resp.force_close()  # the rest of a body that was not read cannot be skipped: close
            return resp
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


def check_direction(trained: Sequence[str] | None, src: str, tgt: str) -> None:
    """NotTrainedError for a direction the served model never trained: a language outside its
    `data.languages`, or src == tgt (its SRT/SMT records all translate into another language)."""
    languages.check_trained(trained, src, tgt)
    if src == tgt:
        raise languages.NotTrainedError(f"src and tgt are both {src}: this service translates into another "
                                        f"language (the model was trained on directions src != tgt)")


def listen_socket(cfg: ServeConfig) -> socket.socket:
    """A socket bound to cfg.host:cfg.port, not yet listening (connections are refused until the
    service starts): taken before the model loads, so a busy port fails in seconds."""
    try:
        infos = socket.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:
        raise SystemExit(f"error: cannot listen on {cfg.host}:{cfg.port}: {e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise SystemExit(f"error: cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    return sock


class Service:
    """A `make_app` app on `sock` (default: its config's host:port) with its config's limits:
    `await start()` -> port; `await stop()` drains.

    aiohttp's keep-alive timer runs from the connection (or the previous response) until the next
    request's headers are complete, so `keepalive_timeout=header_timeout_s` is the header deadline.
    """

    def __init__(self, app: web.Application, sock: socket.socket | None = None):
        self.app, self.cfg, self.sock = app, app[LIMITS].cfg, sock
        cfg = self.cfg
        self.handler_kw = dict(access_log_class=AccessLogger, keepalive_timeout=cfg.header_timeout_s,
                               lingering_time=LINGER_S)
        self.runner = web.AppRunner(app, shutdown_timeout=cfg.drain_s, **self.handler_kw)
        self.server: asyncio.base_events.Server | None = None
        self.port = cfg.port

    async def start(self) -> int:
        sock = self.sock or listen_socket(self.cfg)
        await self.runner.setup()
        loop = asyncio.get_running_loop()
        manager, limits = self.runner.server, self.app[LIMITS]
        self.server = await loop.create_server(
            lambda: _Connection(manager, limits, loop=loop, **self.handler_kw), sock=sock, backlog=128)
        self.port = self.server.sockets[0].getsockname()[1]
        log.info("Running on http://%s:%d", self.cfg.host, self.port)
        return self.port

    async def stop(self) -> None:
        """Stop accepting; refuse uploads (503), finish decodes in flight, at most ~drain_s."""
        if self.server is not None:
            self.server.close()
        self.app[LIMITS].draining.set()
        await self.runner.cleanup()

    async def run_until_signal(self) -> None:
        """Serve until SIGINT/SIGTERM, then `stop()`."""
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        try:
            await self.start()
            await stopping.wait()
            log.info("shutting down: draining in-flight requests (at most %g s)", self.cfg.drain_s)
        finally:
            await self.stop()


if __name__ == "__main__":  # the command is esrt_jax.cli.serve (commands live in the top layer)
    import runpy

    runpy.run_module("esrt_jax.cli.serve", run_name="__main__", alter_sys=True)
