"""The cloud service on a real localhost socket with a tiny random speech LLM.

Concurrency (answers identical to in-process decoding, real batching), bearer auth, malformed
payloads (right 4xx, server keeps serving), /healthz, /metrics, the edge client, graceful shutdown.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("aiohttp")

from esrt_jax import serve  # noqa: E402
from esrt_jax.audio import mel_from_file  # noqa: E402
from esrt_jax.edge import EdgeClient, EdgeError  # noqa: E402
from esrt_jax.infer import payload as pl  # noqa: E402
from esrt_jax.infer.cloud import CloudBackend  # noqa: E402
from helpers_serve import TOKEN, ServerThread, wait_ready  # noqa: E402
from helpers_sllm import tiny_translator, write_tone  # noqa: E402

MAX_BYTES = 64 * 1024
PAIRS = [("eng", "deu"), ("deu", "eng"), ("cmn", "jpn"), ("fra", "spa")]


def post(url, body: bytes, token: str | None = TOKEN, src="eng", tgt="deu", timeout=120):
    """-> (status, json)."""
    headers = {"Content-Type": "application/octet-stream"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"{url}/v1/translate?src={src}&tgt={tgt}", data=body, method="POST",
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def tiny():
    tr, tok, fp = tiny_translator(max_new_tokens=6, max_batch=8)
    return tr, fp


@pytest.fixture(scope="module")
def server(tiny):
    tr, fp = tiny
    cfg = serve.ServeConfig(max_batch=8, max_wait_ms=300.0, max_payload_bytes=MAX_BYTES)
    srv = ServerThread(serve.make_app(CloudBackend(tr, fp), cfg, TOKEN))
    wait_ready(srv.url)
    yield srv
    srv.stop()


def feats(tr, seed):
    return np.random.default_rng(seed).standard_normal(tr.feature_shape).astype(np.float32)


def expected(tr, x, src, tgt):
    """In-process decode of what the server sees (the fp16-rounded features)."""
    r = tr.decode(x.astype(np.float16).astype(np.float32)[None], [src], [tgt])[0]
    return r["transcription"], r["translation"]


def good_payload(tr, fp, seed=0, scheme="fp16"):
    return pl.encode(feats(tr, seed), fingerprint=fp, split=tr.split, scheme=scheme)


def test_healthz_and_metrics(server, tiny):
    tr, fp = tiny
    with urllib.request.urlopen(server.url + "/healthz", timeout=30) as r:
        h = json.loads(r.read())
    assert h == {"status": "ok", "fingerprint": fp, "split": tr.split, "feature_shape": list(tr.feature_shape),
                 "languages": None, "warmup": {"done": 4, "total": 4}}
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
        text = r.read().decode()
        assert r.headers["Content-Type"].startswith("text/plain")
    assert "esrt_batch_size" in text and "esrt_request_seconds" in text and "esrt_inflight_requests" in text


def test_auth_required(server, tiny):
    tr, fp = tiny
    body = good_payload(tr, fp)
    for token in (None, "wrong", TOKEN + "x", ""):
        status, out = post(server.url, body, token=token)
        assert status == 401, token
        assert "bearer token" in out["error"]
    req = urllib.request.Request(f"{server.url}/v1/translate?src=eng&tgt=deu", data=body, method="POST",
                                 headers={"Authorization": TOKEN})  # no "Bearer " scheme
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 401 and e.value.headers["WWW-Authenticate"] == "Bearer"


def test_concurrent_requests_match_in_process_and_are_batched(server, tiny):
    tr, fp = tiny
    n = 32
    jobs = [(i, *PAIRS[i % len(PAIRS)]) for i in range(n)]
    want = {i: expected(tr, feats(tr, 100 + i), s, t) for i, s, t in jobs}
    before = len(server.app[serve.BATCH_SIZES])

    def one(job):
        i, s, t = job
        return i, post(server.url, good_payload(tr, fp, 100 + i), src=s, tgt=t)

    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(one, jobs))
    sizes = []
    for i, (status, out) in results:
        assert status == 200, out
        assert (out["transcription"], out["translation"]) == want[i], i
        assert (out["src"], out["tgt"]) == PAIRS[i % len(PAIRS)]
        sizes.append(out["batch_size"])
    batches = server.app[serve.BATCH_SIZES][before:]
    assert sum(batches) == n
    assert max(batches) > 1 and max(sizes) > 1, batches  # the batcher really batched
    assert max(batches) <= 8


@pytest.mark.parametrize("case", ["truncated", "cut_header", "corrupted", "bad_magic", "wrong_shape",
                                  "wrong_fingerprint", "wrong_split", "nonfinite", "oversize",
                                  "bad_language"])
def test_bad_requests_get_4xx_and_server_keeps_serving(server, tiny, case):
    tr, fp = tiny
    good = good_payload(tr, fp, 7)
    src, tgt = "eng", "deu"
    if case == "truncated":
        body, status, msg = good[:-10], 400, "does not match its header"
    elif case == "cut_header":
        body, status, msg = good[:9], 400, "shorter than the fixed prefix"
    elif case == "corrupted":
        b = bytearray(good)
        b[len(b) // 2 + 20] ^= 0xFF
        body, status, msg = bytes(b), 400, "checksum mismatch"
    elif case == "bad_magic":
        body, status, msg = b"RIFF" + good[4:], 400, "not an esrt-jax payload"
    elif case == "wrong_shape":
        x = np.zeros((tr.feature_shape[0] + 1, tr.feature_shape[1]), np.float32)
        body, status, msg = pl.encode(x, fingerprint=fp, split=tr.split), 422, "does not match the served model"
    elif case == "wrong_fingerprint":
        body, status, msg = pl.encode(feats(tr, 7), fingerprint="0" * 16, split=tr.split), 422, "made by model"
    elif case == "wrong_split":
        other = "qformer" if tr.split == "projector" else "projector"
        body, status, msg = pl.encode(feats(tr, 7), fingerprint=fp, split=other), 422, "split point"
    elif case == "nonfinite":  # a well-formed, correctly checksummed payload of NaNs
        import zlib

        blob = bytearray(pl.encode(np.zeros(tr.feature_shape, np.float32), fingerprint=fp, split=tr.split)[:-4])
        n = 2 * int(np.prod(tr.feature_shape))
        blob[-n:] = np.full(n // 2, np.nan, np.float16).tobytes()
        body, status, msg = bytes(blob) + zlib.crc32(bytes(blob)).to_bytes(4, "little"), 400, "NaN or Inf"
    elif case == "oversize":
        body, status, msg = good + b"\0" * MAX_BYTES, 413, "larger than"
    else:
        body, status, msg, src = good, 400, "bad src/tgt", "xxq"
    got, out = post(server.url, body, src=src, tgt=tgt)
    assert got == status, out
    assert msg in out["error"], out
    # ... and the next good request is answered correctly
    got, out = post(server.url, good)
    assert got == 200 and (out["transcription"], out["translation"]) == expected(tr, feats(tr, 7), "eng", "deu")


def test_metrics_count_requests_by_status_and_batch_sizes(server):
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    for status in ("200", "401", "400", "413", "422"):  # after the tests above
        m = re.search(r'esrt_requests_total\{status="%s"\} (\d+\.\d+)' % status, text)
        assert m and float(m.group(1)) >= 1, status
    n = float(re.search(r"esrt_batch_size_count (\d+\.\d+)", text).group(1))
    assert n == len(server.app[serve.BATCH_SIZES])


def test_quantised_and_compressed_payloads_are_served(server, tiny):
    tr, fp = tiny
    for scheme in ("int8", "int4"):
        body = pl.encode(feats(tr, 3), fingerprint=fp, split=tr.split, scheme=scheme, compress=True)
        x = pl.decode(body).features
        status, out = post(server.url, body)
        want = tr.decode(x[None], ["eng"], ["deu"])[0]
        assert status == 200 and out["scheme"] == scheme
        assert (out["transcription"], out["translation"]) == (want["transcription"], want["translation"])


def test_edge_client_sends_only_the_payload(server, tiny, tmp_path):
    tr, fp = tiny
    wav = write_tone(tmp_path / "a.wav", 0.6, 220.0)  # within the tiny encoder's 0.64 s window
    client = EdgeClient(tr, fp, server=server.url, token=TOKEN, scheme="fp16")
    sent = []
    orig = client.send
    client.send = lambda body, s, t: sent.append(body) or orig(body, s, t)
    out = client.translate(wav, "eng", "deu")
    mel, dur = mel_from_file(wav, 80, 64)
    x = tr.encode(mel[None])[0]
    assert len(sent) == 1 and sent[0].startswith(pl.MAGIC) and out["bytes_sent"] == len(sent[0])
    assert len(sent[0]) < 0.1 * dur * 16000 * 2  # far smaller than the PCM it replaces
    assert (out["transcription"], out["translation"]) == expected(tr, x, "eng", "deu")
    assert [(s["start"], s["end"]) for s in out["segments"]] == [(0.0, 0.6)]
    with pytest.raises(ValueError, match="not a feature payload"):
        orig(b"RIFF....WAVEfmt ", "eng", "deu")
    bad = EdgeClient(tr, fp, server=server.url, token="nope")
    with pytest.raises(EdgeError, match="HTTP 401") as e:
        bad.translate(wav, "eng", "deu")
    assert e.value.status == 401


class SlowBackend(CloudBackend):
    """Decodes like CloudBackend, but slowly, so that shutdown surely meets an in-flight request."""

    def __init__(self, translator, fingerprint, delay):
        super().__init__(translator, fingerprint)
        self.delay, self.started = delay, threading.Event()

    def decode_batch(self, features, src, tgt):
        self.started.set()
        time.sleep(self.delay)
        return super().decode_batch(features, src, tgt)


def test_graceful_shutdown_finishes_inflight_requests(tiny):
    tr, fp = tiny
    backend = SlowBackend(tr, fp, delay=1.5)
    srv = ServerThread(serve.make_app(backend, serve.ServeConfig(max_wait_ms=1.0), TOKEN))
    try:
        with ThreadPoolExecutor(2) as ex:
            futs = [ex.submit(post, srv.url, good_payload(tr, fp, 40 + i)) for i in range(2)]
            assert backend.started.wait(60)
            deadline = time.time() + 60
            while srv.app[serve.BATCHER].inflight < 2 and time.time() < deadline:
                time.sleep(0.01)
            assert srv.app[serve.BATCHER].inflight == 2
            t0 = time.perf_counter()
            srv.stop()  # returns only after the in-flight requests were answered
            assert time.perf_counter() - t0 > 0.2
            for i, f in enumerate(futs):
                status, out = f.result(timeout=60)
                assert status == 200, out
                assert (out["transcription"], out["translation"]) == expected(tr, feats(tr, 40 + i), "eng", "deu")
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(srv.url + "/healthz", timeout=5)
    finally:
        srv.stop()


def metric(url: str, status: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        m = re.search(r'esrt_requests_total\{status="%s"\} (\d+\.\d+)' % status, r.read().decode())
    return float(m.group(1)) if m else 0.0


def raw_request(url: str, method: str, path: str, headers: dict, body: bytes = b"") -> tuple[int, bytes]:
    """http.client, so that header values go out as raw latin-1 bytes (urllib would refuse some)."""
    import http.client

    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_non_ascii_authorization_is_401_and_every_response_is_counted(server, tiny):
    tr, fp = tiny
    before = {s: metric(server.url, s) for s in ("401", "404", "405")}
    status, body = raw_request(server.url, "POST", "/v1/translate?src=eng&tgt=deu",
                               {"Authorization": "Bearer s3cr\xe9t-t\xf6ken"}, good_payload(tr, fp))
    assert status == 401 and b"bearer token" in body
    assert raw_request(server.url, "GET", "/nothing-here", {})[0] == 404
    assert raw_request(server.url, "GET", "/v1/translate", {"Authorization": f"Bearer {TOKEN}"})[0] == 405
    after = {s: metric(server.url, s) for s in ("401", "404", "405")}
    assert after == {"401": before["401"] + 1, "404": before["404"] + 1, "405": before["405"] + 1}
    assert metric(server.url, "500") == 0.0  # nothing above was an internal error


def test_access_log_never_shows_query_strings(server, tiny, caplog):
    tr, fp = tiny
    with caplog.at_level(logging.INFO, logger="aiohttp.access"):
        status, _ = raw_request(server.url, "POST", "/v1/translate?src=eng&tgt=deu&token=" + TOKEN,
                                {}, good_payload(tr, fp))
        assert status == 401
        assert post(server.url, good_payload(tr, fp))[0] == 200
        deadline = time.time() + 10
        while len(caplog.records) < 2 and time.time() < deadline:
            time.sleep(0.01)
    text = caplog.text
    assert "/v1/translate?<redacted>" in text and '" 401 ' in text and '" 200 ' in text
    assert TOKEN not in text and "tgt=deu" not in text


class GatedBackend(CloudBackend):
    """Warm-up waits for `go` (so the test sees the service warming)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.go = threading.Event()

    def warm(self, batch_size):
        assert self.go.wait(120)
        super().warm(batch_size)


def test_warmup_compiles_every_batch_bucket_and_readiness_reports_it(tiny):
    from esrt_jax.infer import translator as translator_mod

    tr, fp = tiny
    backend = GatedBackend(tr, fp, languages=("eng", "deu"))
    srv = ServerThread(serve.make_app(backend, serve.ServeConfig(max_wait_ms=1.0), TOKEN))
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(srv.url + "/healthz", timeout=30)
        h = json.loads(e.value.read())
        assert e.value.code == 503 and h["status"] == "warming" and h["warmup"] == {"done": 0, "total": 4}
        backend.go.set()
        h = wait_ready(srv.url)
        assert h["status"] == "ok" and h["warmup"] == {"done": 4, "total": 4} and h["languages"] == ["eng", "deu"]
        compiled = translator_mod._decode._cache_size()
        for n in range(1, 9):  # every batch size the batcher can form: no new compile
            x = np.stack([feats(tr, i) for i in range(n)])
            backend.decode_batch(x, (["eng", "deu"] * 4)[:n], (["deu", "eng"] * 4)[:n])
        assert translator_mod._decode._cache_size() == compiled
    finally:
        backend.go.set()
        srv.stop()


def test_languages_the_model_was_not_trained_on_get_422(tiny):
    tr, fp = tiny
    backend = CloudBackend(tr, fp, languages=("eng", "deu", "fra"))
    srv = ServerThread(serve.make_app(backend, serve.ServeConfig(warmup=False), TOKEN))
    try:
        status, out = post(srv.url, good_payload(tr, fp), src="eng", tgt="jpn")
        assert status == 422 and "not trained on tgt=jpn" in out["error"] and "eng, deu, fra" in out["error"]
        status, out = post(srv.url, good_payload(tr, fp), src="cmn", tgt="deu")
        assert status == 422 and "src=cmn" in out["error"]
        assert post(srv.url, good_payload(tr, fp), src="fra", tgt="deu")[0] == 200
        assert metric(srv.url, "422") == 2.0
    finally:
        srv.stop()


def test_make_app_requires_a_token(tiny):
    tr, fp = tiny
    with pytest.raises(ValueError, match="bearer token is required"):
        serve.make_app(CloudBackend(tr, fp), serve.ServeConfig(), "")


@pytest.mark.slow
def test_serve_and_edge_commands_end_to_end(tmp_path, capsys):
    """`python -m esrt_jax.serve` as a real process on a run config + checkpoint, the edge CLI
    (`esrt_jax.cli.edge.main`) against it; SIGTERM stops the server cleanly."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from esrt_jax.cli.edge import main as edge_main
    from esrt_jax.cli import infer as cli
    from esrt_jax.speech.load import load_model, translator_for
    from helpers_sllm import make_tiny_run

    cfg_path, run_dir, _ = make_tiny_run(tmp_path)
    (tmp_path / "token").write_text(TOKEN + "\n")
    wav = write_tone(tmp_path / "a.wav", 0.6, 300.0)  # one window (long recordings: test_longform.py)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"}
    common = ["--config", str(cfg_path), "--checkpoint", str(run_dir)]
    server = subprocess.Popen([sys.executable, "-m", "esrt_jax.serve", *common, "--port", "0",
                               "--token-file", str(tmp_path / "token"), "--max-wait-ms", "5"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        loaded = load_model(cfg_path, run_dir)  # meanwhile: the in-process reference
        tr = translator_for(loaded)
        utts = cli.utterances(audio=[str(wav)], src="eng", tgt="deu")
        feats = cli.encode_utterances(tr, utts)
        x = pl.decode(pl.encode(feats[0], fingerprint=loaded.fingerprint, split=tr.split, scheme="int8",
                                compress=True)).features
        want = cli.decode_features(tr, x[None], utts)[0]
        seen = []
        while True:  # the server binds port 0 itself and prints where it listens
            line = server.stdout.readline()
            assert line, "server exited:\n" + "".join(seen)
            seen.append(line)
            m = re.search(r"Running on (http://127\.0\.0\.1:\d+)", line)
            if m:
                url = m.group(1)
                break
        health = wait_ready(url)  # 503 "warming" until every batch bucket is compiled
        assert health["warmup"]["done"] == health["warmup"]["total"] > 0
        assert health["fingerprint"] == loaded.fingerprint, (health, loaded.step, loaded.checkpoint_dir)
        capsys.readouterr()
        rc = edge_main([*common, "--audio", str(wav), "--src", "eng", "--tgt", "deu", "--server", url,
                        "--token-file", str(tmp_path / "token"), "--scheme", "int8", "--zstd"])
        assert rc == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (out["transcription"], out["translation"]) == (want["transcription"], want["translation"])
        assert out["scheme"] == "int8" and 0 < out["bytes_sent"] < 2 * np.prod(tr.feature_shape)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            rc = server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert rc == 0, server.stdout.read()
