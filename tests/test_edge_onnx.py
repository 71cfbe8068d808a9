"""The edge half exported to ONNX (`esrt_jax.export.onnx_edge`) and run by onnxruntime
(`esrt_jax.edge --runtime onnx`): parity with the JAX edge half, int8, the export CLI, the edge
client against the real HTTP service (same translation as the JAX client, fingerprint refusal)
and a device-side run with JAX, Flax and torch unimportable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("aiohttp")
from flax import nnx  # noqa: E402
from transformers import Qwen2Config  # noqa: E402

from esrt_jax import serve  # noqa: E402
from esrt_jax.cli.edge import main as edge_main  # noqa: E402
from esrt_jax.edge import EdgeClient, EdgeError, EdgeModel, EdgeModelError, OnnxEdgeModel  # noqa: E402
from esrt_jax.export.onnx_edge import edge_model_proto, export_edge_onnx, save_model  # noqa: E402
from esrt_jax.infer.cloud import CloudBackend, model_fingerprint  # noqa: E402
from esrt_jax.models.llm import config_from_hf  # noqa: E402
from esrt_jax.models.speech_llm import (EdgeHalf, QFormerConfig, SpeechAdapter, SpeechLLMConfig,  # noqa: E402
                                        WhisperEncoder, WhisperEncoderConfig)
from helpers_sllm import tiny_speech_llm, tiny_translator, write_tone  # noqa: E402
from helpers_serve import TOKEN, ServerThread, wait_ready  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def tiny_half(**adapter) -> EdgeHalf:
    """A tiny random edge half; `adapter` overrides the Q-Former / projector config."""
    enc = WhisperEncoderConfig(num_mel_bins=80, d_model=32, encoder_layers=3, encoder_attention_heads=4,
                               encoder_ffn_dim=64, max_source_positions=32)
    ad = QFormerConfig(**{**dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                 encoder_hidden_size=32, num_queries=6, llm_dim=64), **adapter})
    llm = config_from_hf(Qwen2Config(vocab_size=64, hidden_size=ad.llm_dim, intermediate_size=32,
                                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    rngs = nnx.Rngs(7)
    half = EdgeHalf(SpeechLLMConfig(enc, ad, llm), WhisperEncoder(enc, rngs=rngs), SpeechAdapter(ad, rngs=rngs))
    # non-trivial norms and biases, so that a misplaced one cannot hide behind ones / zeros
    flat = dict(nnx.to_flat_state(nnx.state(half, nnx.Param)))
    for i, (path, var) in enumerate(flat.items()):
        if path[-1] in ("bias", "scale"):
            var.set_value(var[...] + 0.1 * np.random.default_rng(i).standard_normal(var.shape).astype(np.float32))
    nnx.update(half, nnx.from_flat_state(flat))
    return half


def mels(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 80, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def plain_half() -> EdgeHalf:
    return tiny_half()


@pytest.mark.parametrize("variant,split", [
    ("plain", "projector"), ("plain", "qformer"),
    # pooled adapter (Linear-ReLU-Linear projector), cross-attention in every layer, tanh GELU
    ("pooled", "projector"),
])
def test_onnx_matches_the_jax_edge_half(variant, split, plain_half, tmp_path):
    half = plain_half if variant == "plain" else tiny_half(num_queries=8, pool_k=4, cross_attention_frequency=1,
                                                            hidden_act="gelu_new")
    path = save_model(edge_model_proto(half, "f" * 16, split), tmp_path / "edge.onnx")
    onnx_model, jax_model = OnnxEdgeModel(path), EdgeModel(half, split)
    assert onnx_model.feature_shape == jax_model.feature_shape and onnx_model.split == split
    x = mels(3, seed=1)
    want = jax_model.encode(x)  # (JAX rows do not depend on the batch: one compile)
    for batch in (1, 3):  # one file, any batch size
        got = onnx_model.encode(x[:batch])
        assert got.shape == (batch, *jax_model.feature_shape)
        diff = float(np.abs(got - want[:batch]).max())
        print(f"{variant} {split} batch {batch}: max |onnx - jax| {diff:.2e}")
        assert diff <= 1e-5
    with pytest.raises(ValueError, match="expects mel"):
        onnx_model.encode(np.zeros((1, 80, 32), np.float32))


def test_int8_model_is_smaller_keeps_metadata_and_stays_close(tmp_path):
    half = tiny_half(hidden_size=64, intermediate_size=256, encoder_hidden_size=32)
    fp = model_fingerprint(half)
    paths = export_edge_onnx(half, fp, tmp_path, int8=True)
    f32, i8 = OnnxEdgeModel(paths["fp32"]), OnnxEdgeModel(paths["int8"])
    assert (i8.fingerprint, i8.split, i8.feature_shape) == (fp, half.config.split, f32.feature_shape)
    assert paths["int8"].stat().st_size < 0.6 * paths["fp32"].stat().st_size
    ops = {n.op_type for n in __import__("onnx").load(str(paths["int8"])).graph.node}
    assert {"DynamicQuantizeMatMul", "QAttention"} & ops or "MatMulInteger" in ops, ops
    x = mels(4, seed=3)
    a, b = f32.encode(x), i8.encode(x)
    cos = (a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum())
    print(f"int8 vs fp32: max |diff| {np.abs(a - b).max():.3e}, cosine {cos:.5f}")
    assert 0 < np.abs(a - b).max() < 0.2 * np.abs(a).max() and cos > 0.99


def test_large_models_keep_their_weights_beside_and_a_reexport_replaces_them(plain_half, tmp_path, monkeypatch):
    from esrt_jax.export import onnx_edge

    monkeypatch.setattr(onnx_edge, "EXTERNAL_DATA_BYTES", 1000)  # whisper-large-v3 is over the real limit
    x = mels(2, seed=4)
    sizes = []
    for _ in range(2):  # the second export into the same dir must not append to the first's data
        paths = export_edge_onnx(plain_half, "f" * 16, tmp_path, int8=True)
        data = [p.parent / (p.name + ".data") for p in paths.values()]
        sizes.append([d.stat().st_size for d in data])
        assert paths["fp32"].stat().st_size < sizes[-1][0]  # the graph alone; the weights beside it
    assert sizes[0] == sizes[1]
    got = OnnxEdgeModel(paths["fp32"]).encode(x)
    assert np.abs(got - EdgeModel(plain_half).encode(x)).max() <= 1e-5
    assert OnnxEdgeModel(paths["int8"]).encode(x).shape == got.shape


def test_export_cli_writes_the_runs_edge_half(tmp_path, capsys):
    from esrt_jax.edge import load_edge
    from esrt_jax.cli.export import main as export_main
    from helpers_sllm import make_tiny_run

    cfg_path, run_dir, _ = make_tiny_run(tmp_path)
    out = tmp_path / "edge"
    for split in ("projector", "qformer"):
        assert export_main(["--run", str(run_dir), "--config", str(cfg_path), "--edge", "--format", "onnx",
                            "--out", str(out / split), "--split", split, "--int8"]) == 0
        printed = capsys.readouterr().out
        jax_model, fp = load_edge(cfg_path, run_dir, split=split)
        assert fp in printed and "edge.int8.onnx" in printed
        onnx_model = OnnxEdgeModel(out / split / "edge.onnx")
        assert (onnx_model.fingerprint, onnx_model.split) == (fp, split)
        x = mels(2, seed=5)
        assert np.abs(onnx_model.encode(x) - jax_model.encode(x)).max() <= 1e-5
    with pytest.raises(SystemExit):
        export_main(["--run", str(run_dir), "--out", str(out), "--int8"])  # --int8 without --edge


# ----------------------------------------------------------------------------- the edge client


@pytest.fixture(scope="module")
def service():
    tr, _, fp = tiny_translator(max_new_tokens=6, max_batch=8)
    srv = ServerThread(serve.make_app(CloudBackend(tr, fp), serve.ServeConfig(max_wait_ms=5.0, warmup=False), TOKEN))
    wait_ready(srv.url)
    yield srv, tr, fp
    srv.stop()


@pytest.fixture(scope="module")
def exported(service, tmp_path_factory):
    """The served model's edge half as ONNX (fp32 + int8), and another model's."""
    _, tr, fp = service
    d = tmp_path_factory.mktemp("onnx")
    paths = export_edge_onnx(tiny_speech_llm(0), fp, d / "served", int8=True)
    other = tiny_speech_llm(1)
    paths["other"] = export_edge_onnx(other, model_fingerprint(other), d / "other")["fp32"]
    return paths


def test_onnx_edge_client_translates_like_the_jax_client(service, exported, tmp_path, capsys):
    srv, tr, fp = service
    wavs = [write_tone(tmp_path / f"{i}.wav", 1.0 + 0.4 * i, 180.0 + 90 * i, seed=i) for i in range(3)]
    jax_client = EdgeClient(tr, fp, server=srv.url, token=TOKEN)
    onnx_client = EdgeClient.from_onnx(exported["fp32"], server=srv.url, token=TOKEN)
    assert onnx_client.fingerprint == fp and onnx_client.check_service()["fingerprint"] == fp
    for wav in wavs:
        want, got = jax_client.translate(wav, "eng", "deu"), onnx_client.translate(wav, "eng", "deu")
        assert (got["transcription"], got["translation"]) == (want["transcription"], want["translation"])
        assert got["bytes_sent"] == want["bytes_sent"]
    # the command line, int8 model: a valid payload of the same model, answered
    (tmp_path / "token").write_text(TOKEN)
    capsys.readouterr()
    assert edge_main(["--runtime", "onnx", "--model", str(exported["int8"]), "--audio", *map(str, wavs),
                      "--src", "eng", "--tgt", "deu", "--server", srv.url, "--token-file", str(tmp_path / "token"),
                      "--threads", "1"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["audio"] for x in lines] == list(map(str, wavs)) and all("translation" in x for x in lines)


def test_onnx_edge_client_refuses_another_models_file(service, exported, tmp_path, capsys):
    srv, _, fp = service
    client = EdgeClient.from_onnx(exported["other"], server=srv.url, token=TOKEN)
    with pytest.raises(EdgeError, match=f"runs model {fp}"):
        client.check_service()
    wav = write_tone(tmp_path / "a.wav", 1.0, 200.0)
    (tmp_path / "token").write_text(TOKEN)
    args = ["--audio", str(wav), "--src", "eng", "--tgt", "deu", "--server", srv.url,
            "--token-file", str(tmp_path / "token")]
    with pytest.raises(SystemExit, match="use the edge half of the service's checkpoint"):
        edge_main(["--runtime", "onnx", "--model", str(exported["other"]), *args])
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(SystemExit, match="cannot load the ONNX model"):
        edge_main(["--runtime", "onnx", "--model", str(tmp_path / "junk.onnx"), *args])
    with pytest.raises(EdgeModelError, match="does not exist"):
        OnnxEdgeModel(tmp_path / "missing.onnx")
    import onnx

    h = onnx.helper  # a valid ONNX model, but not an exported edge half
    other = h.make_model(h.make_graph([h.make_node("Identity", ["mel"], ["features"])], "g",
                                      [h.make_tensor_value_info("mel", onnx.TensorProto.FLOAT, [1])],
                                      [h.make_tensor_value_info("features", onnx.TensorProto.FLOAT, [1])]),
                         opset_imports=[h.make_opsetid("", 17)])
    other.ir_version = 8
    onnx.save_model(other, str(tmp_path / "other.onnx"))
    with pytest.raises(EdgeModelError, match="not an esrt-jax edge model"):
        OnnxEdgeModel(tmp_path / "other.onnx")
    with pytest.raises(SystemExit):  # --runtime onnx takes --model, not --config/--checkpoint
        edge_main(["--runtime", "onnx", "--config", "x.yaml", "--checkpoint", "r", *args])


BLOCKED = """
import importlib.abc, runpy, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"jax", "jaxlib", "flax", "optax", "orbax", "torch", "transformers"}:
            raise ImportError(f"{name} is not installed on this device")
sys.meta_path.insert(0, Blocked())
sys.argv = ["esrt_jax.edge"] + sys.argv[1:]
runpy.run_module("esrt_jax.edge", run_name="__main__")
"""


def test_device_side_runs_without_jax(service, exported, tmp_path):
    """`python -m esrt_jax.edge --runtime onnx` in a process where JAX, Flax and torch cannot be
    imported: the same answer as the JAX client."""
    srv, tr, fp = service
    wav = write_tone(tmp_path / "a.wav", 1.3, 260.0, seed=4)
    (tmp_path / "token").write_text(TOKEN)
    want = EdgeClient(tr, fp, server=srv.url, token=TOKEN).translate(wav, "eng", "deu")
    r = subprocess.run([sys.executable, "-c", BLOCKED, "--runtime", "onnx", "--model", str(exported["fp32"]),
                        "--audio", str(wav), "--src", "eng", "--tgt", "deu", "--server", srv.url,
                        "--token-file", str(tmp_path / "token")],
                       cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert (got["transcription"], got["translation"]) == (want["transcription"], want["translation"])
