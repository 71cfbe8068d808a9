"""The edge client on adapters that attend over each clip's real frames only (`model.adapter.attend_padding:
false`, as configs/real_small.yaml; `adapter.window_means`; `model.encoder_window: real`): the edge CLI
against the real HTTP service on 127.0.0.1 sends, for every segment of a long recording and for a short
clip, the features `python -m esrt_jax.infer --edge-only` computes in process (up to the fp16 payload
rounding); the library path at 1e-5 in fp32; the ONNX export, whose graph has only a mel input, refuses
such a model in one line.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import soundfile as sf
import yaml

pytest.importorskip("aiohttp")

from esrt_jax import audio as A  # noqa: E402
from esrt_jax import serve  # noqa: E402
from esrt_jax.config import apply_overrides  # noqa: E402
from esrt_jax.infer.cloud import CloudBackend  # noqa: E402
from helpers_serve import ServerThread  # noqa: E402

TOKEN = "lengths-token"
SR = A.SAMPLE_RATE
VARIANTS = {  # --set items on the tiny run with the demo's 3 s window (real windows of 1, 2 and 3 s)
    "mask": ["model.adapter.attend_padding=false"],
    "window_means": ["model.adapter.attend_padding=false", "model.adapter.window_means=2"],
    "real_window": ["model.adapter.attend_padding=false", "model.encoder_window=real"],
}


def tone(seconds: float, freq: float) -> np.ndarray:
    t = np.arange(int(round(seconds * SR))) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.4 * np.sin(2 * np.pi * 4 * t))).astype(np.float32)


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    """A 7.5 s recording of three phrases (segments of ~1.4, ~2.7 and ~0.7 s: three real windows)
    and a 0.6 s clip -> [paths]."""
    d = tmp_path_factory.mktemp("audio")
    gap = lambda s: np.zeros(int(round(s * SR)), np.float32)  # noqa: E731
    x = np.concatenate([gap(0.3), tone(1.2, 250), gap(1.5), tone(2.5, 330), gap(1.0), tone(0.5, 420), gap(0.5)])
    x = x + 3e-4 * np.random.default_rng(0).standard_normal(x.size).astype(np.float32)
    sf.write(d / "long.wav", x, SR, subtype="FLOAT")
    sf.write(d / "short.wav", tone(0.6, 280), SR, subtype="FLOAT")
    return [str(d / "long.wav"), str(d / "short.wav")]


class RecordingBackend(CloudBackend):
    """The service's backend, keeping every feature row it was sent (what arrived over HTTP)."""

    def __init__(self, translator, fingerprint):
        super().__init__(translator, fingerprint)
        self.seen, self.lock = [], threading.Lock()

    def decode_batch(self, features, src, tgt):
        with self.lock:
            self.seen += list(np.asarray(features, np.float32))
        return super().decode_batch(features, src, tgt)


@pytest.fixture(scope="module", params=list(VARIANTS))
def run(request, tmp_path_factory):
    """A tiny trained run of the variant, its in-process translator, and the real service on it."""
    from esrt_jax.speech.load import load_model, translator_for
    from helpers_sllm import make_tiny_run

    d = tmp_path_factory.mktemp(request.param)
    sets = ["model.whisper_config.max_source_positions=150", *VARIANTS[request.param]]
    # real windows train on an encoder cache only; the checkpoint's params are those of the padded window
    cfg, run_dir, _ = make_tiny_run(d, overrides=[x for x in sets if not x.startswith("model.encoder_window")])
    cfg.write_text(yaml.safe_dump(apply_overrides(yaml.safe_load(cfg.read_text()), sets)))
    loaded = load_model(cfg, run_dir)
    tr = translator_for(loaded)
    assert not tr.config.adapter.attend_padding
    assert tr.config.encoder_window == ("real" if request.param == "real_window" else "padded")
    backend = RecordingBackend(tr, loaded.fingerprint)
    srv = ServerThread(serve.make_app(backend, serve.ServeConfig(max_batch=8, max_wait_ms=50.0, warmup=False),
                                      TOKEN))
    (d / "token").write_text(TOKEN)
    yield {"name": request.param, "cfg": cfg, "run": run_dir, "loaded": loaded, "tr": tr, "backend": backend,
           "server": srv, "token": d / "token", "dir": d}
    srv.stop()


def infer_features(run, audio, *extra):
    """`python -m esrt_jax.infer --edge-only OUT.npz` (in process) -> (features (M, ...), [(start, end)])."""
    from esrt_jax.cli import infer as cli

    out = run["dir"] / f"edge-{len(extra)}.npz"
    assert cli.main(["--config", str(run["cfg"]), "--checkpoint", str(run["run"]), "--audio", *audio,
                     "--src", "eng", "--tgt", "deu", "--edge-only", str(out), *extra]) == 0
    z = np.load(out)
    return z["features"], list(zip(z["start"].tolist(), z["end"].tolist()))


def match(sent: list[np.ndarray], want: np.ndarray, rtol: float, atol: float) -> None:
    """Every row of `want` arrived exactly once (the service sees them in any order)."""
    assert len(sent) == len(want)
    left = list(range(len(want)))
    for row in sent:
        d = [np.max(np.abs(row - want[i]) - rtol * np.abs(want[i])) for i in left]
        k = int(np.argmin(d))
        assert d[k] <= atol, f"a payload the service got is {d[k]:.3g} off every in-process row"
        left.pop(k)


def test_edge_cli_sends_what_infer_computes_through_the_real_service(run, audio, capsys):
    """The edge CLI (jax runtime, fp16 payloads) on a long recording and a short clip: every segment's
    features as the service received them equal infer --edge-only's fp32 ones up to fp16 rounding."""
    from esrt_jax.cli.edge import main as edge_main

    want, spans = infer_features(run, audio)
    assert len(want) == 4  # three segments of the long recording, one short clip
    run["backend"].seen.clear()
    capsys.readouterr()
    rc = edge_main(["--config", str(run["cfg"]), "--checkpoint", str(run["run"]), "--audio", *audio,
                    "--src", "eng", "--tgt", "deu", "--server", run["server"].url,
                    "--token-file", str(run["token"])])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    outs = [json.loads(x) for x in cap.out.strip().splitlines()]
    assert [(s["start"], s["end"]) for o in outs for s in o["segments"]] == spans
    # fp16: relative rounding 2^-11; the rows differ between clips far more than that
    match(run["backend"].seen, want, rtol=2.0 ** -11, atol=1e-5)


def test_edge_library_features_equal_infer_in_fp32(run, audio):
    """`EdgeEncoder.features` with the segments' lengths = infer's features at 1e-5 (fp32, no payload),
    for the JAX edge half (no LLM loaded) and for the whole model's translator."""
    from esrt_jax.edge import EdgeClient, EdgeEncoder

    want, _ = infer_features(run, audio)
    client = EdgeClient.from_checkpoint(run["cfg"], run["run"], server=run["server"].url, token=TOKEN)
    for enc in (client, EdgeEncoder(run["tr"], run["loaded"].fingerprint)):
        got = []
        for path in audio:
            mels, segs = enc.segments(path)
            got.append(enc.features(mels, enc.enc_frames(segs)))
        np.testing.assert_allclose(np.concatenate(got), want, rtol=0, atol=1e-5)
    got = np.concatenate([pl_features(b) for b in client.payloads(audio[1:])])
    np.testing.assert_allclose(got, want[-1:], rtol=2.0 ** -11, atol=1e-5)


def pl_features(body: bytes) -> np.ndarray:
    from esrt_jax.infer import payload as pl

    return pl.decode(body).features[None]


def test_no_segment_cuts_to_the_window_with_its_real_length(run, audio, capsys):
    """--no-segment on the 7.5 s recording: one 3 s window on both paths, the same features."""
    from esrt_jax.cli.edge import main as edge_main

    with pytest.warns(UserWarning, match="segmentation is off"):
        want, spans = infer_features(run, audio[:1], "--no-segment")
    assert spans == [(0.0, 3.0)]
    run["backend"].seen.clear()
    with pytest.warns(UserWarning, match="segmentation is off"):
        rc = edge_main(["--config", str(run["cfg"]), "--checkpoint", str(run["run"]), "--audio", audio[0],
                        "--src", "eng", "--tgt", "deu", "--server", run["server"].url,
                        "--token-file", str(run["token"]), "--no-segment"])
    assert rc == 0, capsys.readouterr().err
    match(run["backend"].seen, want, rtol=2.0 ** -11, atol=1e-5)


def test_features_without_lengths_is_a_one_line_error(run, audio):
    from esrt_jax.edge import load_edge

    model, _ = load_edge(run["cfg"], run["run"])
    mel = A.mel_segments(audio[1], 80, 300)[0]
    with pytest.raises(ValueError, match="enc_frames") as e:
        model.encode(mel)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"enc_frames .* 2 .* 1 clip") as e:
        model.encode(mel, np.array([10, 20]))
    assert "\n" not in str(e.value)


def test_onnx_export_refuses_an_adapter_that_needs_real_lengths(run, tmp_path, capsys):
    """The ONNX graph has only a mel input: the export CLI refuses in one line and writes nothing."""
    pytest.importorskip("onnxruntime")
    from esrt_jax.cli.export import main as export_main

    out = tmp_path / "edge"
    capsys.readouterr()
    assert export_main(["--run", str(run["run"]), "--config", str(run["cfg"]), "--edge", "--format", "onnx",
                        "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "attend_padding: false" in err[0] and "--runtime jax" in err[0], err
    assert not out.exists() or not any(out.iterdir())
