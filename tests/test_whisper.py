"""Whisper encoder: parity with transformers' WhisperEncoder (every layer, fp32), HF conversion
both ways (single file, sharded, WhisperModel / WhisperForConditionalGeneration / bare encoder),
scan == loop == remat, and the error messages of bad checkpoints."""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperModel
from transformers.models.whisper import modeling_whisper
from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

from esrt_jax.config import ConfigError
from esrt_jax.convert.hf_io import CheckpointError
from esrt_jax.convert.whisper import load_whisper_encoder, save_whisper_encoder, write_whisper_encoder_checkpoint
from esrt_jax.models.whisper import (
    WhisperEncoder, WhisperEncoderConfig, encoder_from_params, export_whisper_encoder, sinusoids)

TOL = 1e-4
torch.set_num_threads(1)


def hf_config(n_mels: int, positions: int = 16, d_model: int = 64, heads: int = 4, ffn: int = 128,
              layers: int = 2) -> WhisperConfig:
    return WhisperConfig(
        num_mel_bins=n_mels, d_model=d_model, encoder_layers=layers, encoder_attention_heads=heads,
        encoder_ffn_dim=ffn, max_source_positions=positions, decoder_layers=1,
        decoder_attention_heads=heads, decoder_ffn_dim=ffn, max_target_positions=32, vocab_size=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights everywhere (HF init has zero biases and unit LayerNorms)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_positions" not in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, mel):
    return nnx.merge(graphdef, state)(mel, return_hidden_states=True)


def ours(model: WhisperEncoder, mel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    graphdef, state = nnx.split(model)
    y, hs = _apply(graphdef, state, jnp.asarray(mel))
    return np.asarray(y), np.asarray(hs)


def theirs(encoder: torch.nn.Module, mel: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Final output and [embeddings, layer 0 out, ..., layer L-1 out] (hooks on each layer)."""
    outs = []
    hooks = [layer.register_forward_hook(lambda m, i, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for layer in encoder.layers]
    try:
        with torch.no_grad():
            r = encoder(torch.from_numpy(mel), output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    return r.last_hidden_state.numpy(), [r.hidden_states[0].numpy()] + [o.numpy() for o in outs]


def max_diffs(model, hf_encoder, mel) -> dict[str, float]:
    y, hs = ours(model, mel)
    ty, ths = theirs(hf_encoder, mel)
    assert hs.shape[0] == len(ths)
    d = {"embed": float(np.abs(hs[0] - ths[0]).max())}
    for i in range(1, len(ths)):
        d[f"layer{i - 1}"] = float(np.abs(hs[i] - ths[i]).max())
    d["final"] = float(np.abs(y - ty).max())
    return d


def mel_for(cfg: WhisperConfig, batch: int = 2, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, cfg.num_mel_bins, 2 * cfg.max_source_positions)).astype(np.float32)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """80 mels as WhisperModel, 128 mels as WhisperForConditionalGeneration (prefixes
    'encoder.' and 'model.encoder.'), saved with save_pretrained (safetensors)."""
    out = {}
    for n_mels, cls, seed in ((80, WhisperModel, 0), (128, WhisperForConditionalGeneration, 1)):
        torch.manual_seed(seed)
        cfg = hf_config(n_mels)
        m = cls(cfg).eval()
        randomize_(m, seed)
        d = tmp_path_factory.mktemp(f"whisper{n_mels}")
        m.save_pretrained(d, safe_serialization=True)
        enc = m.get_encoder() if hasattr(m, "get_encoder") else m.model.encoder
        out[n_mels] = (d, cfg, enc)
    return out


@pytest.mark.parametrize("n_mels", [80, 128])
def test_parity_every_layer(ckpts, n_mels):
    d, cfg, hf_enc = ckpts[n_mels]
    model = load_whisper_encoder(d)
    assert model.config == WhisperEncoderConfig.from_hf_config(cfg)
    diffs = max_diffs(model, hf_enc, mel_for(cfg))
    print(f"\nparity n_mels={n_mels}: max abs diff {diffs}")
    assert len(diffs) == 2 + cfg.encoder_layers
    assert max(diffs.values()) <= TOL, diffs


def test_parity_full_30s_input():
    """The real input length: 3000 frames -> 1500 positions (tiny width)."""
    torch.manual_seed(2)
    cfg = hf_config(80, positions=1500, d_model=32, heads=2, ffn=64)
    hf_enc = HFWhisperEncoder(cfg).eval()
    randomize_(hf_enc, 2)
    tensors = {k: v.numpy() for k, v in hf_enc.state_dict().items()}
    from esrt_jax.models.whisper import params_from_hf
    ecfg = WhisperEncoderConfig.from_hf_config(cfg)
    model = encoder_from_params(ecfg, params_from_hf(tensors, ecfg, prefix="", names=tensors))
    # HF stores the table (loaded as is); ours, for random init, is the same sinusoid up to
    # transformers' f32 rounding.
    np.testing.assert_allclose(sinusoids(1500, 32), tensors["embed_positions.weight"], atol=2e-4)
    mel = mel_for(cfg, batch=2)
    params = nnx.to_pure_dict(nnx.state(model))
    for attention in ("blocked", "xla"):  # blocked: 10 query blocks of 150 here
        m = encoder_from_params(dataclasses.replace(ecfg, attention=attention), params)
        diffs = max_diffs(m, hf_enc, mel)
        print(f"\nparity 3000 frames, {attention} attention: max abs diff {diffs}")
        assert max(diffs.values()) <= TOL, diffs


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_blocked_attention_matches_reference(dtype):
    from esrt_jax.models.whisper import _query_block, blocked_attention
    assert _query_block(1500, 8, 5 * 2**19) == 50
    assert _query_block(1500, 20, 5 * 2**19) == 20
    assert _query_block(16, 4, 5 * 2**19) == 16
    q, k, v = (jax.random.normal(key, (3, 60, 4, 8), dtype) for key in jax.random.split(jax.random.key(0), 3))
    ref = jax.nn.dot_product_attention(q, k, v, scale=1.0)
    got = blocked_attention(q, k, v, budget_bytes=4 * 12 * 60 * 4)  # blocks of 12 queries
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), atol=tol)


def perturbed(model: WhisperEncoder, seed: int) -> WhisperEncoder:
    """A copy of `model` with every parameter changed (positions included)."""
    graphdef, state = nnx.split(model)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + 0.03 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


@pytest.mark.parametrize("n_mels", [80, 128])
def test_round_trip_into_full_checkpoint(ckpts, tmp_path, n_mels):
    """ours -> HF tensors written into a copy of the full checkpoint -> transformers loads it and
    gives our outputs; the decoder is untouched."""
    d, cfg, _ = ckpts[n_mels]
    model = perturbed(load_whisper_encoder(d), seed=n_mels)
    out = tmp_path / "ckpt"
    write_whisper_encoder_checkpoint(model, model.config, d, out, max_shard_bytes=100_000)
    assert (out / "model.safetensors.index.json").is_file()
    assert (out / "config.json").is_file()
    cls = WhisperModel if n_mels == 80 else WhisperForConditionalGeneration
    hf = cls.from_pretrained(out).eval()
    hf_enc = hf.get_encoder() if hasattr(hf, "get_encoder") else hf.model.encoder
    diffs = max_diffs(model, hf_enc, mel_for(cfg, seed=5))
    print(f"\nround trip n_mels={n_mels}: max abs diff {diffs}")
    assert max(diffs.values()) <= TOL, diffs
    # decoder tensors are the source's, bit for bit
    src = load_file(str(d / "model.safetensors"))
    got = {k: v.numpy() for k, v in hf.state_dict().items()}
    dec = [k for k in src if ".decoder." in "." + k]
    assert dec
    for k in dec:
        np.testing.assert_array_equal(got[k], src[k], err_msg=k)
    # and our loader reads our own output back exactly
    again = load_whisper_encoder(out)
    np.testing.assert_array_equal(ours(again, mel_for(cfg))[0], ours(model, mel_for(cfg))[0])


def test_export_to_bare_hf_encoder(ckpts, tmp_path):
    d, cfg, _ = ckpts[80]
    model = perturbed(load_whisper_encoder(d), seed=7)
    tensors = export_whisper_encoder(model, model.config, prefix="")
    hf_enc = HFWhisperEncoder(cfg).eval()
    hf_enc.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)
    assert max(max_diffs(model, hf_enc, mel_for(cfg)).values()) <= TOL
    save_whisper_encoder(model, model.config, tmp_path / "enc")
    # config.json names the transformers class that loads the directory
    archs = json.loads((tmp_path / "enc" / "config.json").read_text())["architectures"]
    assert [getattr(modeling_whisper, a, None) for a in archs] == [HFWhisperEncoder], archs
    hf_enc2 = HFWhisperEncoder.from_pretrained(tmp_path / "enc").eval()
    diffs = max_diffs(model, hf_enc2, mel_for(cfg))
    assert max(diffs.values()) <= TOL, diffs
    # a bare-encoder directory loads back into ours too
    np.testing.assert_array_equal(ours(load_whisper_encoder(tmp_path / "enc"), mel_for(cfg))[0],
                                  ours(model, mel_for(cfg))[0])


def test_scan_loop_remat_identical(ckpts):
    d, cfg, _ = ckpts[80]
    base = load_whisper_encoder(d)
    params = nnx.to_pure_dict(nnx.state(base))
    mel = jnp.asarray(mel_for(cfg))
    results = {}
    for scan in (True, False):
        for remat in (False, True):
            c = dataclasses.replace(base.config, scan_layers=scan, remat=remat)
            y, hs = ours(encoder_from_params(c, params), np.asarray(mel))
            g = None
            if (scan, remat) in ((True, False), (False, True)):  # grad compiles are slow on CPU
                graphdef, state = nnx.split(encoder_from_params(c, params))

                def loss(state, graphdef=graphdef):
                    return jnp.sum(nnx.merge(graphdef, state)(mel) ** 2)

                g = nnx.to_pure_dict(jax.jit(jax.grad(loss))(state))
            results[(scan, remat)] = (y, hs, g)
    ref = results[(True, False)]
    for key, (y, hs, g) in results.items():
        np.testing.assert_array_equal(y, ref[0], err_msg=str(key))
        np.testing.assert_array_equal(hs, ref[1], err_msg=str(key))
    # scan vs loop and remat vs not, through the backward pass
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 results[(False, True)][2], ref[2])


def test_sharded_checkpoint_loads_same(ckpts, tmp_path):
    d, cfg, _ = ckpts[128]
    m = WhisperForConditionalGeneration.from_pretrained(d)
    m.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    a = nnx.to_pure_dict(nnx.state(load_whisper_encoder(tmp_path)))
    b = nnx.to_pure_dict(nnx.state(load_whisper_encoder(d)))
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_dtypes_and_logical_axes(ckpts):
    d, cfg, _ = ckpts[80]
    m = load_whisper_encoder(d, dtype="bfloat16", param_dtype="bfloat16")
    assert m.blocks.fc1.kernel[...].dtype == jnp.bfloat16
    y = ours(m, mel_for(cfg))[0]
    ref = ours(load_whisper_encoder(d), mel_for(cfg))[0]
    assert y.dtype == jnp.bfloat16
    assert np.abs(y.astype(np.float32) - ref).max() < 0.1
    state = nnx.state(load_whisper_encoder(d))
    assert state["blocks"]["self_attn"]["q_proj"]["kernel"].out_sharding == ("layers", "enc_embed", "heads")
    assert state["blocks"]["fc2"]["kernel"].out_sharding == ("layers", "mlp", "enc_embed")
    assert state["conv1"]["kernel"].out_sharding == ("conv_k", "conv_in", "enc_embed")
    assert state["blocks"]["fc1"]["kernel"].shape == (cfg.encoder_layers, 64, 128)
    # positions are a non-trainable buffer, not a Param
    assert not isinstance(state["embed_positions"], nnx.Param)
    assert "embed_positions" not in nnx.to_pure_dict(nnx.state(m, nnx.Param))


# ------------------------------------------------------------------------------------ errors

def _copy_with(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_missing_tensor_error(ckpts, tmp_path):
    d, _, _ = ckpts[80]
    bad = _copy_with(d, tmp_path / "bad", lambda t: t.pop("encoder.layers.1.fc2.bias"))
    with pytest.raises(CheckpointError, match=r"missing Whisper encoder tensor\(s\) \['encoder.layers.1.fc2.bias'\]"):
        load_whisper_encoder(bad)


def test_unexpected_tensor_error(ckpts, tmp_path):
    d, _, _ = ckpts[128]
    bad = _copy_with(d, tmp_path / "bad",
                     lambda t: t.__setitem__("model.encoder.layers.2.fc1.weight", np.zeros((128, 64), np.float32)))
    with pytest.raises(CheckpointError, match=r"unexpected Whisper encoder tensor\(s\) \['model.encoder.layers.2.fc1.weight'\]"):
        load_whisper_encoder(bad)


def test_shape_mismatch_error(ckpts, tmp_path):
    d, _, _ = ckpts[80]
    bad = _copy_with(d, tmp_path / "bad", lambda t: t.__setitem__(
        "encoder.conv1.weight", np.zeros((64, 128, 3), np.float32)))
    with pytest.raises(CheckpointError, match=r"tensor encoder.conv1.weight has shape \(64, 128, 3\), expected \(64, 80, 3\)"):
        load_whisper_encoder(bad)


def test_hub_id_and_bad_input_errors(ckpts, tmp_path):
    with pytest.raises(CheckpointError, match=r"(?s)openai/whisper-large-v3 is not a local directory.*hf download openai/whisper-large-v3"):
        load_whisper_encoder("openai/whisper-large-v3")
    d, cfg, _ = ckpts[80]
    with pytest.raises(CheckpointError, match="write into a new directory"):
        write_whisper_encoder_checkpoint(load_whisper_encoder(d), load_whisper_encoder(d).config, d, d)
    other = dataclasses.replace(WhisperEncoderConfig.from_hf_config(cfg), encoder_ffn_dim=256)
    with pytest.raises(CheckpointError, match=r"encoder config differs.*encoder_ffn_dim"):
        write_whisper_encoder_checkpoint(WhisperEncoder(other, rngs=nnx.Rngs(0)), other, d, tmp_path / "o")
    model = load_whisper_encoder(d)
    with pytest.raises(ValueError, match=r"expects mel of shape \(B, 80, 32\).*got \(1, 80, 3000\)"):
        model(jnp.zeros((1, 80, 3000)))
    with pytest.raises(ConfigError, match="encoder_attention_heads: d_model 64 is not divisible by 3 heads"):
        WhisperEncoderConfig(d_model=64, encoder_attention_heads=3)
    with pytest.raises(ConfigError, match="activation_function: unsupported activation 'tanhh'"):
        WhisperEncoderConfig(activation_function="tanhh")
    cfg_json = json.loads((d / "config.json").read_text())
    del cfg_json["d_model"]
    (tmp_path / "nod").mkdir()
    (tmp_path / "nod" / "config.json").write_text(json.dumps(cfg_json))
    with pytest.raises(CheckpointError, match=r"config.json: Whisper config lacks key\(s\) \['d_model'\]"):
        load_whisper_encoder(tmp_path / "nod")


def test_fp16_checkpoint_keeps_its_dtype(ckpts, tmp_path):
    """Real Whisper checkpoints are fp16: we load them into f32 params and write fp16 back."""
    d, cfg, _ = ckpts[80]
    WhisperModel.from_pretrained(d).half().save_pretrained(tmp_path / "fp16", safe_serialization=True)
    src = load_file(str(tmp_path / "fp16" / "model.safetensors"))
    assert src["encoder.layers.0.fc1.weight"].dtype == np.float16
    model = load_whisper_encoder(tmp_path / "fp16")
    k = model.blocks.fc1.kernel[...]
    assert k.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(k[0]), src["encoder.layers.0.fc1.weight"].astype(np.float32).T)
    write_whisper_encoder_checkpoint(model, model.config, tmp_path / "fp16", tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(out) == set(src)
    for name, arr in src.items():
        assert out[name].dtype == arr.dtype, name
        np.testing.assert_array_equal(out[name], arr, err_msg=name)
