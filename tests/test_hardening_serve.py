"""Issue 29, service items 6-11, against the real service on 127.0.0.1 (raw sockets for slow and
partial uploads; every wait bounded): SIGTERM during an upload, header/body read deadlines, the
cap on unauthenticated connections, a client gone mid-upload, aiohttp's parser-level 400s in
/metrics, the log lines `python -m esrt_jax.serve` prints, one-line start-up errors, src == tgt.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("aiohttp")

from esrt_jax import serve  # noqa: E402
from esrt_jax.cli import serve as serve_cli  # noqa: E402
from esrt_jax.infer import payload as pl  # noqa: E402
from esrt_jax.infer.cloud import CloudBackend  # noqa: E402
from helpers_serve import ServerThread, wait_ready  # noqa: E402
from helpers_sllm import tiny_translator  # noqa: E402

TOKEN = "s3cret-token"
ROOT = Path(__file__).resolve().parents[1]
LIMITS = dict(header_timeout_s=2.0, body_timeout_s=1.5, max_unauthenticated=4, drain_s=3.0)


@pytest.fixture(scope="module")
def tiny():
    tr, _, fp = tiny_translator(max_new_tokens=4, max_batch=2)
    return tr, fp


def make_server(tiny, **kw) -> ServerThread:
    tr, fp = tiny
    cfg = serve.ServeConfig(warmup=False, max_wait_ms=1.0, max_payload_bytes=64 * 1024, **{**LIMITS, **kw})
    return ServerThread(serve.make_app(CloudBackend(tr, fp), cfg, TOKEN))


@pytest.fixture(scope="module")
def server(tiny):
    srv = make_server(tiny)
    wait_ready(srv.url)
    yield srv
    srv.stop()


def payload(tiny, seed=0) -> bytes:
    tr, fp = tiny
    x = np.random.default_rng(seed).standard_normal(tr.feature_shape).astype(np.float32)
    return pl.encode(x, fingerprint=fp, split=tr.split)


def metric(url: str, status: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        m = re.search(r'esrt_requests_total\{status="%s"\} (\d+\.\d+)' % status, r.read().decode())
    return float(m.group(1)) if m else 0.0


def upload_head(length: int, token: str = TOKEN) -> bytes:
    return (f"POST /v1/translate?src=eng&tgt=deu HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n").encode()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def wait_closed(sock: socket.socket, bound: float, trickle: bytes = b"") -> tuple[float | None, bytes]:
    """Send `trickle` every 0.3 s until the server closes the connection -> (seconds it took, or
    None if still open after `bound`; whatever the server sent)."""
    t0, got = time.monotonic(), b""
    while time.monotonic() - t0 < bound:
        sock.settimeout(0.3)
        try:
            chunk = sock.recv(65536)
            if not chunk:
                return time.monotonic() - t0, got
            got += chunk
            continue
        except socket.timeout:
            pass
        except ConnectionError:
            return time.monotonic() - t0, got
        if trickle:
            try:
                sock.sendall(trickle)
            except OSError:
                return time.monotonic() - t0, got
    return None, got


def status_of(raw: bytes) -> int | None:
    m = re.match(rb"HTTP/1\.[01] (\d{3})", raw)
    return int(m.group(1)) if m else None


# ----------------------------------------------------------------------------- item 7


def test_header_stalling_connection_is_closed_at_the_header_deadline(server):
    """No token needed to hold a connection by sending one header line every 0.3 s: closed
    after header_timeout_s (2 s), not kept open."""
    s = connect(server.port)
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        took, got = wait_closed(s, bound=8.0, trickle=b"X-Pad: 1\r\n")
    finally:
        s.close()
    assert took is not None, "a header-stalling connection is still open after 8 s"
    assert 1.5 <= took <= 5.0, took
    assert got == b""  # nothing was answered: there was no request yet


def test_body_stalling_upload_gets_408_at_the_body_deadline(server):
    """A token holder sending one body byte every 0.3 s gets 408 after body_timeout_s (1.5 s)."""
    s = connect(server.port)
    try:
        s.sendall(upload_head(5000) + b"E")
        took, got = wait_closed(s, bound=8.0, trickle=b"x")
    finally:
        s.close()
    assert took is not None and status_of(got) == 408, (took, got[:200])
    assert took <= 5.0 and b"did not arrive within 1.5 s" in got


def test_unauthenticated_connections_are_capped_oldest_closed_first(server):
    """max_unauthenticated=4: opening 7 stalled connections leaves the newest 4; a connection that
    showed the token does not count and keeps working; the evictions are counted."""
    authed = connect(server.port)  # keep-alive, authenticated: GET on the POST route -> 405 after auth
    authed.sendall(f"GET /v1/translate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
    assert status_of(authed.recv(65536)) == 405
    flood = []
    try:
        for _ in range(7):
            s = connect(server.port)
            s.sendall(b"GET /healthz HTTP/1.1\r\n")  # never finished
            flood.append(s)
            time.sleep(0.05)  # in order: the server sees them oldest first
        time.sleep(0.3)
        open_now = [wait_closed(s, bound=0.3)[0] is None for s in flood]
        assert open_now == [False] * 3 + [True] * 4, open_now
        authed.sendall(f"GET /v1/translate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
        assert status_of(authed.recv(65536)) == 405  # still served
        with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
            text = r.read().decode()
        assert float(re.search(r"esrt_unauthenticated_evicted_total (\d+\.\d+)", text).group(1)) >= 3
    finally:
        for s in flood + [authed]:
            s.close()


# ----------------------------------------------------------------------------- item 8


def test_client_gone_mid_upload_is_499_without_a_traceback(server, caplog):
    before = {s: metric(server.url, s) for s in ("499", "500")}
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            s = connect(server.port)
            s.sendall(upload_head(5000) + b"E" * 100)
            time.sleep(0.1)
            s.close()
        deadline = time.monotonic() + 5
        while metric(server.url, "499") < before["499"] + 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert metric(server.url, "499") == before["499"] + 3
    assert metric(server.url, "500") == before["500"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, [r.getMessage() for r in errors]


@pytest.mark.parametrize("raw", [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nNo colon in this header line\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n",
    b"\x16\x03\x01\x00\xa5garbage-not-http\r\n\r\n",
], ids=["bad_header", "header_too_long", "not_http"])
def test_parser_level_400s_are_counted_and_logged_in_one_line(server, caplog, raw):
    before = metric(server.url, "400")
    with caplog.at_level(logging.INFO):
        s = connect(server.port)
        try:
            s.sendall(raw)
            _, got = wait_closed(s, bound=5.0)
        finally:
            s.close()
    assert status_of(got) == 400, got[:200]
    assert metric(server.url, "400") == before + 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, [r.getMessage() for r in errors]
    said = [r.getMessage() for r in caplog.records if r.name == "esrt_jax.serve"]
    assert len(said) == 1 and said[0].startswith("bad request from 127.0.0.1: ") and "\n" not in said[0], said


# ----------------------------------------------------------------------------- item 11


def test_src_equal_to_tgt_is_refused(server, tiny):
    req = urllib.request.Request(f"{server.url}/v1/translate?src=eng&tgt=eng", data=payload(tiny), method="POST",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 422 and "both eng" in json.loads(e.value.read())["error"]
    with pytest.raises(serve.languages.NotTrainedError, match="both deu"):
        serve.check_direction(("eng", "deu"), "deu", "deu")
    serve.check_direction(("eng", "deu"), "deu", "eng")


# ----------------------------------------------------------------------------- item 6


def test_shutdown_answers_an_upload_in_progress_with_503_and_is_bounded(tiny):
    srv = make_server(tiny)
    s = connect(srv.port)
    try:
        s.sendall(upload_head(5000) + b"E" * 100)
        time.sleep(0.2)
        t0 = time.monotonic()
        stopper = threading.Thread(target=srv.stop)
        stopper.start()
        took, got = wait_closed(s, bound=8.0)
        stopper.join(15)
        assert not stopper.is_alive(), "shutdown did not finish within 15 s"
        assert took is not None and status_of(got) == 503, (took, got[:200])
        assert b"shutting down" in got and time.monotonic() - t0 < serve.UPLOAD_GRACE_S + 3
    finally:
        s.close()
        srv.stop()


def test_serve_command_sigterm_mid_upload_logs_and_startup(tiny_run, tmp_path):
    """The real `python -m esrt_jax.serve`: it prints the "serving model" line, warm-up progress
    and the access log (item 9); SIGTERM while a body uploads -> that request gets 503 and the
    process exits 0 within a few seconds (item 6)."""
    cfg_path, run_dir = tiny_run
    (tmp_path / "token").write_text(TOKEN + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "esrt_jax.serve", "--config", str(cfg_path), "--checkpoint",
                             str(run_dir), "--port", "0", "--token-file", str(tmp_path / "token"), "--max-batch", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        url = None
        while url is None:
            assert proc.poll() is None, "server exited:\n" + "".join(lines)
            assert time.monotonic() < deadline, "no 'Running on' line:\n" + "".join(lines)
            m = re.search(r"Running on (http://127\.0\.0\.1:(\d+))", "".join(lines))
            url, port = (m.group(1), int(m.group(2))) if m else (None, None)
            time.sleep(0.1)
        wait_ready(url, timeout=240)
        s = connect(port)
        s.sendall(upload_head(5000) + b"E" * 100)
        time.sleep(0.3)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        took, got = wait_closed(s, bound=10.0)
        s.close()
        assert took is not None and status_of(got) == 503, (took, got[:200], "".join(lines))
        rc = proc.wait(timeout=20)
        assert time.monotonic() - t0 < 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        reader.join(10)
    text = "".join(lines)
    assert rc == 0, text
    assert "serving model " in text and "warm-up: decode for batch 1 compiled" in text, text
    assert re.search(r'"GET /healthz" 200 ', text) and re.search(r'"POST /v1/translate\?<redacted>" 503 ', text), text
    assert "Traceback" not in text, text


# ----------------------------------------------------------------------------- item 10


def run_main(argv: list[str], timeout: float = 180) -> BaseException | None:
    """`esrt_jax.cli.serve.main(argv)` in a thread (a server that wrongly starts fails there, bounded: no
    signal handlers outside the main thread) -> what it raised."""
    out: list[BaseException | None] = [None]

    def target():
        try:
            serve_cli.main(argv)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            out[0] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"cli.serve.main{argv} still running after {timeout} s"
    return out[0]


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


@pytest.mark.parametrize("case", ["max_batch_0", "port_99999", "binary_token", "missing_config",
                                  "missing_checkpoint", "bad_set", "port_in_use"])
def test_startup_errors_are_one_line(case, tiny_run, tmp_path, restore_logging):
    cfg_path, run_dir = tiny_run
    (tmp_path / "token").write_text(TOKEN)
    opts = {"--config": str(cfg_path), "--checkpoint": str(run_dir), "--port": "0",
            "--token-file": str(tmp_path / "token")}
    extra, want, busy = [], None, None
    if case == "max_batch_0":
        extra, want = ["--max-batch", "0"], "max_batch must be a positive integer"
    elif case == "port_99999":
        opts["--port"], want = "99999", "port must be in 0..65535"
    elif case == "binary_token":
        (tmp_path / "token").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
        want = "is not UTF-8 text"
    elif case == "missing_config":
        opts["--config"], want = str(tmp_path / "nope.yaml"), "does not exist"
    elif case == "missing_checkpoint":
        opts["--checkpoint"], want = str(tmp_path / "no-run"), "does not exist"
    elif case == "bad_set":
        extra, want = ["--set", "model.adapter.num_queries=many"], "expected an integer"
    else:
        busy = socket.create_server(("127.0.0.1", 0))
        opts["--port"], want = str(busy.getsockname()[1]), "cannot listen on 127.0.0.1:"
    try:
        e = run_main([x for kv in opts.items() for x in kv] + extra)
    finally:
        if busy is not None:
            busy.close()
    assert isinstance(e, SystemExit), repr(e)
    msg = str(e.code)
    assert msg.startswith("error: ") and "\n" not in msg and want in msg, msg
