"""Issue 29, edge items 12-13: the edge client against a misbehaving local HTTP service (a real
`http.server` on 127.0.0.1 answering each odd way, plus a seeded fuzz of answers; bounded), non-ASCII
bearer tokens end to end against the real service, tampered ONNX metadata and a missing checkpoint.
"""

from __future__ import annotations

import http.server
import json
import random
import threading
import time

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("aiohttp")
import onnx  # noqa: E402

from esrt_jax import serve  # noqa: E402
from esrt_jax.cli.edge import main as edge_main  # noqa: E402
from esrt_jax.edge import EdgeClient, EdgeError  # noqa: E402
from esrt_jax.export.onnx_edge import export_edge_onnx  # noqa: E402
from esrt_jax.infer import payload as pl  # noqa: E402
from esrt_jax.infer.cloud import CloudBackend, model_fingerprint  # noqa: E402
from helpers_serve import ServerThread, wait_ready  # noqa: E402
from helpers_sllm import tiny_speech_llm, tiny_translator, write_tone  # noqa: E402

TIMEOUT = 1.0  # the client's; "slow" answers take 3x longer
GOOD = {"transcription": "hallo", "translation": "hello", "src": "deu", "tgt": "eng", "scheme": "fp16",
        "batch_size": 1}


class Chaos(http.server.ThreadingHTTPServer):
    """A service that answers /healthz with `health` and each /v1/translate with the next mode of
    `plan` (then "ok"): the ways a slow, dropping or odd service answers."""

    daemon_threads = True

    def __init__(self, fingerprint: str, split: str):
        super().__init__(("127.0.0.1", 0), ChaosHandler)
        self.fingerprint, self.split = fingerprint, split
        self.health, self.plan, self.fuzz = "ok", [], None
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


def answer(mode: str, good: dict) -> tuple[int, str, bytes] | str:
    """-> (status, content type, body) or a connection-level mode name."""
    j = lambda x: json.dumps(x).encode()  # noqa: E731
    return {
        "ok": (200, "application/json", j(good)),
        "empty": (200, "application/json", j({**good, "translation": ""})),  # a model that decodes nothing
        "html": (200, "text/html", b"<html><body>502 Bad Gateway</body></html>"),
        "list": (200, "application/json", j([good])),
        "null": (200, "application/json", b"null"),
        "number": (200, "application/json", b"42"),
        "bad_utf8": (200, "application/json", b"\xff\xfe{\x00"),
        "missing": (200, "application/json", j({k: v for k, v in good.items() if k not in ("translation", "fingerprint")})),
        "types": (200, "application/json", j({**good, "transcription": 1, "translation": ["x"], "fingerprint": 7,
                                              "batch_size": "8"})),
        "error_list": (500, "application/json", b"[]"),
        "error_html": (502, "text/html", b"<html>bad gateway</html>"),
        "error_types": (400, "application/json", j({"error": {"nested": True}})),
    }.get(mode, mode)


class ChaosHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_GET(self):
        srv = self.server
        self.respond(srv.health, {"status": "ok", "fingerprint": srv.fingerprint, "split": srv.split})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        srv = self.server
        if srv.fuzz is not None:
            return self.respond_raw(*srv.fuzz.pop(0))
        self.respond(srv.plan.pop(0) if srv.plan else "ok", GOOD)

    def respond(self, mode: str, good: dict):
        a = answer(mode, good)
        if a == "drop":  # RemoteDisconnected: the connection closes, no status line
            return self.close_now()
        if a == "slow_headers":
            time.sleep(3 * TIMEOUT)
            return self.close_now()
        if a in ("slow", "cut"):  # headers, then the body stalls or is cut short
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "200")
            self.end_headers()
            self.wfile.write(b'{"transcription": ')
            self.wfile.flush()
            if a == "slow":
                time.sleep(3 * TIMEOUT)
            return self.close_now()
        self.respond_raw(*a)

    def respond_raw(self, status: int, ctype: str, body: bytes):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def close_now(self):
        self.close_connection = True
        self.wfile.flush()
        self.connection.shutdown(2)


@pytest.fixture(scope="module")
def edge_onnx(tmp_path_factory):
    model = tiny_speech_llm(0)
    fp = model_fingerprint(model)
    return export_edge_onnx(model, fp, tmp_path_factory.mktemp("onnx"))["fp32"], fp, model.config.split


@pytest.fixture(scope="module")
def chaos(edge_onnx):
    _, fp, split = edge_onnx
    srv = Chaos(fp, split)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def wavs(tmp_path_factory):
    d = tmp_path_factory.mktemp("wav")
    return [str(write_tone(d / f"{i}.wav", 0.5, 200.0 + 60 * i, seed=i)) for i in range(3)]


@pytest.fixture
def token_file(tmp_path):
    (tmp_path / "token").write_text("t0ken")
    return str(tmp_path / "token")


def cli(model, server, audio, token_file, *extra):
    return ["--runtime", "onnx", "--model", str(model), "--audio", *audio, "--src", "deu", "--tgt", "eng",
            "--server", server, "--token-file", token_file, "--timeout", str(TIMEOUT), "--threads", "1", *extra]


TRANSLATE_MODES = ["slow", "slow_headers", "drop", "cut", "html", "list", "null", "number", "bad_utf8",
                   "missing", "types", "error_list", "error_html", "error_types"]


@pytest.mark.parametrize("mode", TRANSLATE_MODES)
def test_odd_translate_answer_is_one_line_for_that_file_and_the_rest_go_on(mode, chaos, edge_onnx, wavs,
                                                                          token_file, capsys):
    chaos.health, chaos.plan = "ok", ["ok", mode, "ok"]
    capsys.readouterr()
    rc = edge_main(cli(edge_onnx[0], chaos.url, wavs, token_file))
    out, err = capsys.readouterr()
    assert rc == 1
    assert [json.loads(x)["audio"] for x in out.splitlines()] == [wavs[0], wavs[2]]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {wavs[1]}: "), err
    assert "Traceback" not in err


HEALTH_MODES = ["slow", "slow_headers", "drop", "cut", "html", "list", "null", "bad_utf8", "missing", "types",
                "error_list", "error_html"]


@pytest.mark.parametrize("mode", HEALTH_MODES)
def test_odd_healthz_answer_is_a_one_line_error(mode, chaos, edge_onnx, wavs, token_file):
    chaos.health, chaos.plan = mode, []
    with pytest.raises(SystemExit) as e:
        edge_main(cli(edge_onnx[0], chaos.url, wavs[:1], token_file))
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg


def random_answer(rng: random.Random) -> tuple[int, str, bytes]:
    """One odd answer: a status, and a body of random bytes, random JSON or a mangled good answer."""
    status = rng.choice([200, 200, 200, 201, 204, 400, 401, 404, 413, 422, 500, 503])
    kind = rng.randrange(4)
    if kind == 0:
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
    elif kind == 1:
        values = [None, True, 0, -1, 1.5, "", "x", [], {}, [1, "a"], {"a": None}]
        body = json.dumps(rng.choice(values)).encode()
    else:
        d = dict(GOOD, error="refused")
        for k in rng.sample(sorted(d), rng.randrange(1, 4)):
            d[k] = rng.choice([None, 1, "", [], {"x": 1}, True]) if rng.random() < 0.7 else d.pop(k)
        body = json.dumps(d).encode()
        if kind == 3:
            body = body[: rng.randrange(len(body))]
    return status, rng.choice(["application/json", "text/plain"]), body


def test_fuzzed_answers_give_a_result_or_an_edge_error(chaos, edge_onnx):
    """60 seeded random answers to `send`: each is a valid result or an EdgeError, nothing else."""
    rng = random.Random(29)
    client = EdgeClient.from_onnx(edge_onnx[0], server=chaos.url, token="t0ken", timeout=TIMEOUT)
    body = client.payload(np.zeros(client.translator.feature_shape, np.float32))
    chaos.fuzz = [random_answer(rng) for _ in range(60)]
    outcomes = {"ok": 0, "refused": 0}
    try:
        while chaos.fuzz:
            try:
                out = client.send(body, "deu", "eng")
            except EdgeError as e:
                assert "\n" not in str(e)
                outcomes["refused"] += 1
            else:
                assert isinstance(out["transcription"], str) and isinstance(out["translation"], str), out
                outcomes["ok"] += 1
    finally:
        chaos.fuzz = None
    assert outcomes["refused"] > 20 and outcomes["ok"] > 0, outcomes


@pytest.mark.parametrize("plan, rc, want", [
    (["empty", "ok", "empty"], 0, ["warning: {0}: the model decoded an empty translation",
                                   "warning: {2}: the model decoded an empty translation"]),
    (["empty", "empty", "empty"], 3, ["error: the model decoded an empty translation for every input (3 of 3)"]),
    (["empty", "drop", "empty"], 3, ["error: {1}: ", "error: the model decoded an empty translation for every "
                                                    "input (2 of 2)"]),
], ids=["some", "all", "all_answered"])
def test_empty_translations_warn_and_all_empty_exits_3(plan, rc, want, chaos, edge_onnx, wavs, token_file, capsys):
    """Item 5 on the edge: an empty translation among others warns (rc 0); when every answer is
    empty, one error line and exit status 3; the results are printed either way."""
    chaos.health, chaos.plan = "ok", list(plan)
    capsys.readouterr()
    assert edge_main(cli(edge_onnx[0], chaos.url, wavs, token_file)) == rc
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == len(want) and all(line.startswith(w.format(*wavs)) for line, w in zip(lines, want)), err
    assert len(out.splitlines()) == sum(m != "drop" for m in plan)


# ----------------------------------------------------------------------------- item 13


@pytest.mark.parametrize("text", ["café-token", "токен-секрет"], ids=["latin1", "cyrillic"])
def test_non_ascii_token_from_the_same_file_works_on_both_ends(text, tmp_path):
    """The service and the client read the same UTF-8 token file; the client sends its UTF-8 bytes."""
    (tmp_path / "token").write_text(text + "\n", encoding="utf-8")
    token = pl.read_token(str(tmp_path / "token"))
    assert token == text
    tr, _, fp = tiny_translator(max_new_tokens=4, max_batch=2)
    srv = ServerThread(serve.make_app(CloudBackend(tr, fp), serve.ServeConfig(warmup=False), token))
    try:
        wait_ready(srv.url)
        wav = write_tone(tmp_path / "a.wav", 0.5, 240.0)
        out = EdgeClient(tr, fp, server=srv.url, token=token).translate(wav, "eng", "deu")
        assert isinstance(out["translation"], str) and out["bytes_sent"] > 0
        with pytest.raises(EdgeError, match="HTTP 401"):
            EdgeClient(tr, fp, server=srv.url, token=text[:-1]).translate(wav, "eng", "deu")
    finally:
        srv.stop()


@pytest.mark.parametrize("raw,want", [(b"\x89PNG\r\n\x1a\n\x00\xff", "not UTF-8 text"),
                                      (b"ab\x00cd\n", "control characters"),
                                      (b"ab\x1b[31mcd", "control characters")])
def test_unusable_token_file_is_a_one_line_error(raw, want, tmp_path):
    (tmp_path / "token").write_bytes(raw)
    with pytest.raises(SystemExit) as e:
        pl.read_token(str(tmp_path / "token"))
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg and want in msg, msg


@pytest.mark.parametrize("key,value", [("esrt.mel_shape", "[128, 64]"), ("esrt.mel_shape", "[80]"),
                                       ("esrt.mel_shape", '"80x64"'), ("esrt.mel_shape", "[80, -64]"),
                                       ("esrt.feature_shape", "[7, 64]")])
def test_tampered_onnx_metadata_is_a_one_line_error(key, value, edge_onnx, chaos, wavs, token_file, tmp_path):
    m = onnx.load(str(edge_onnx[0]))
    for p in m.metadata_props:
        if p.key == key:
            p.value = value
    onnx.save(m, str(tmp_path / "tampered.onnx"))
    chaos.health, chaos.plan = "ok", []
    with pytest.raises(SystemExit) as e:
        edge_main(cli(tmp_path / "tampered.onnx", chaos.url, wavs[:1], token_file))
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg and key.split(".")[1] in msg, msg


def test_jax_runtime_with_a_missing_checkpoint_is_a_one_line_error(tiny_run, chaos, wavs, token_file, tmp_path):
    cfg_path, _ = tiny_run
    with pytest.raises(SystemExit) as e:
        edge_main(["--config", str(cfg_path), "--checkpoint", str(tmp_path / "no-run"), "--audio", wavs[0],
                   "--src", "deu", "--tgt", "eng", "--server", chaos.url, "--token-file", token_file])
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg and "does not exist" in msg, msg
