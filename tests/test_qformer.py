"""Q-Former adapter: parity with transformers' Blip2QFormerModel and an LLM-SRT-style PyTorch
projector, conversion both ways (HF directory, LLM-SRT `encoder_projector.*` state dict), errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from esrt_jax.config import ConfigError, from_dict
from esrt_jax.convert import llm_srt
from esrt_jax.convert.hf_io import CheckpointError
from esrt_jax.convert.qformer import load_hf_qformer, save_hf_qformer
from esrt_jax.models.qformer import QFormerConfig, SpeechAdapter, flat_params
from tests.reference.qformer import numpy_state_dict, torch_reference

D_ENC, T_ENC, B = 24, 50, 2
TINY = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, encoder_hidden_size=D_ENC)


def tiny_cfg(**kw) -> QFormerConfig:
    base = dict(num_hidden_layers=2, cross_attention_frequency=2, num_queries=10, llm_dim=48, **TINY)
    base.update(kw)
    return QFormerConfig(**base)


def hf_model(cfg: QFormerConfig, seed: int = 0) -> Blip2QFormerModel:
    torch.manual_seed(seed)
    m = Blip2QFormerModel(Blip2QFormerConfig(**cfg.to_hf_config(), attn_implementation="eager")).eval()
    # Non-trivial LayerNorm/bias values so that a mapping mistake cannot hide behind ones/zeros.
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m


def encoder_input(seed: int = 0, masked: bool = False):
    rs = np.random.RandomState(seed)
    enc = rs.randn(B, T_ENC, D_ENC).astype(np.float32)
    mask = None
    if masked:
        mask = np.ones((B, T_ENC), np.int64)
        mask[1, 31:] = 0
        mask[0, :3] = 0
    return enc, mask


def t(x):
    return None if x is None else torch.from_numpy(np.array(x))


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


# ------------------------------------------------------------------------------------------
# Parity with transformers' Blip2QFormerModel
# ------------------------------------------------------------------------------------------

PARITY_CASES = [(2, 1, False), (2, 1, True), (3, 2, True), (4, 2, False)]


@pytest.mark.parametrize("layers,freq,masked", PARITY_CASES)
def test_qformer_parity_with_hf(layers, freq, masked):
    cfg = tiny_cfg(num_hidden_layers=layers, cross_attention_frequency=freq)
    hf = hf_model(cfg, seed=layers)
    adapter = SpeechAdapter(cfg, rngs=nnx.Rngs(1))
    load_hf_qformer(adapter.qformer, numpy_state_dict(hf))
    enc, mask = encoder_input(seed=layers, masked=masked)
    query = np.asarray(adapter.query[...])
    with torch.no_grad():
        ref = hf(query_embeds=t(query).expand(B, -1, -1), encoder_hidden_states=t(enc),
                 encoder_attention_mask=t(mask)).last_hidden_state.numpy()
    ours = adapter.qformer_features(jnp.asarray(enc), None if mask is None else jnp.asarray(mask))
    assert ours.shape == (B, cfg.num_queries, cfg.hidden_size)
    diff = max_diff(ours, ref)
    print(f"Q-Former parity layers={layers} freq={freq} mask={masked}: max abs diff {diff:.2e}")
    assert diff <= 1e-5
    if masked:
        # The mask matters: attending to padded frames gives a different answer.
        assert max_diff(adapter.qformer_features(jnp.asarray(enc)), ref) > 1e-3


def test_jitted_functional_matches_eager():
    cfg = tiny_cfg(num_hidden_layers=2, cross_attention_frequency=1)
    adapter = SpeechAdapter(cfg, rngs=nnx.Rngs(3))
    graphdef, params = nnx.split(adapter)
    enc, mask = encoder_input(seed=5, masked=True)

    @jax.jit
    def encode(params, enc, mask):
        return nnx.merge(graphdef, params)(enc, mask)

    eager = adapter(jnp.asarray(enc), jnp.asarray(mask))
    jitted = encode(params, jnp.asarray(enc), jnp.asarray(mask))
    assert jitted.shape == (B, cfg.num_queries, cfg.llm_dim)
    assert max_diff(jitted, eager) <= 1e-6


# ------------------------------------------------------------------------------------------
# Parity with the LLM-SRT-style projector, both directions of the state-dict conversion
# ------------------------------------------------------------------------------------------

PROJECTOR_CASES = [
    dict(llm_dim=48),                        # Linear(H, llm_dim)
    dict(llm_dim=2048),                      # Linear(H, 1536)-ReLU-Linear(1536, llm_dim)
    dict(llm_dim=2600),                      # Linear(H, 2560)-ReLU-Linear(2560, llm_dim)
    dict(llm_dim=40, num_queries=15, pool_k=5),   # pooled: 15 -> 3 tokens, 2560-wide MLP
]


@pytest.fixture(scope="module", params=PROJECTOR_CASES, ids=["linear", "mlp1536", "mlp2560", "pooled"])
def projector_case(request):
    cfg = tiny_cfg(num_hidden_layers=2, **request.param)
    ref = torch_reference(cfg, seed=cfg.llm_dim)
    enc, mask = encoder_input(seed=7, masked=True)
    with torch.no_grad():
        expected = ref.encoder_projector(t(enc), t(mask)).numpy()
    return cfg, ref, enc, mask, expected


def test_llm_srt_import_parity(projector_case):
    cfg, ref, enc, mask, expected = projector_case
    adapter = SpeechAdapter(cfg, rngs=nnx.Rngs(0))
    llm_srt.load_llm_srt_into(adapter, numpy_state_dict(ref))
    out = adapter(jnp.asarray(enc), jnp.asarray(mask))
    assert out.shape == (B, cfg.num_output_tokens, cfg.llm_dim) == expected.shape
    diff = max_diff(out, expected)
    print(f"projector parity llm_dim={cfg.llm_dim} pool_k={cfg.pool_k}: max abs diff {diff:.2e}")
    assert diff <= 1e-5
    # The edge/cloud split gives the same answer as the whole adapter.
    feats = adapter.qformer_features(jnp.asarray(enc), jnp.asarray(mask))
    assert feats.shape == (B, cfg.num_queries, cfg.hidden_size)
    assert max_diff(adapter.project(feats), out) == 0.0


def test_llm_srt_export_loads_strict_and_round_trips(projector_case):
    cfg, _, enc, mask, _ = projector_case
    ours = SpeechAdapter(cfg, rngs=nnx.Rngs(11))
    sd = llm_srt.adapter_to_llm_srt(ours)
    assert all(k.startswith("encoder_projector.") for k in sd)
    # Ours -> LLM-SRT layout: loads with strict=True into the PyTorch reference and matches.
    ref = torch_reference(cfg, seed=99)
    ref.load_state_dict({k: t(v) for k, v in sd.items()}, strict=True)
    with torch.no_grad():
        expected = ref.encoder_projector(t(enc), t(mask)).numpy()
    assert max_diff(ours(jnp.asarray(enc), jnp.asarray(mask)), expected) <= 1e-5
    # The pure params tree (nnx.split, or nested dicts as Orbax restores them) exports the same.
    _, params = nnx.split(ours)
    for tree in (params, nnx.to_pure_dict(params)):
        sd2 = llm_srt.adapter_to_llm_srt(tree, cfg)
        assert sd2.keys() == sd.keys() and all(np.array_equal(sd2[k], sd[k]) for k in sd)
    # The sizes can be read back off the tensors (heads are not in the weights: tiny model has 4).
    assert llm_srt.infer_config(sd, pool_k=cfg.pool_k, num_attention_heads=4) == cfg
    # Ours -> LLM-SRT -> ours is exact.
    back = SpeechAdapter(cfg, rngs=nnx.Rngs(12))
    llm_srt.load_llm_srt_into(back, sd)
    a, b = flat_params(ours), flat_params(back)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_llm_srt_files_and_inferred_config(tmp_path, suffix):
    cfg = tiny_cfg(num_hidden_layers=3, cross_attention_frequency=2, llm_dim=40, num_queries=15, pool_k=5)
    ours = SpeechAdapter(cfg, rngs=nnx.Rngs(4))
    lora = {"llm.base_model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((2, 3), np.float32)}
    path = llm_srt.save_llm_srt_adapter(ours, tmp_path / f"model{suffix}", extra=lora)
    sd = llm_srt.read_state_dict(path)
    assert set(lora) <= set(sd)
    # Plain and pooled projectors with a 2560-wide linear1 and llm_dim <= 2560 differ only in
    # pooling, which the tensors cannot tell: the message says to pass pool_k.
    with pytest.raises(CheckpointError, match="pass pool_k"):
        llm_srt.infer_config(sd, source=str(path), num_attention_heads=4)
    # Head count is not in the weights (LLM-SRT uses 12); the tiny model has 4.
    back = llm_srt.load_llm_srt_adapter(path, pool_k=5, num_attention_heads=4)
    assert back.config == cfg
    for k, v in flat_params(ours).items():
        np.testing.assert_array_equal(flat_params(back)[k], v, err_msg=k)


def test_llm_srt_import_errors_name_the_key():
    cfg = tiny_cfg()
    sd = llm_srt.adapter_to_llm_srt(SpeechAdapter(cfg, rngs=nnx.Rngs(0)))
    adapter = SpeechAdapter(cfg, rngs=nnx.Rngs(1))

    missing = dict(sd)
    del missing["encoder_projector.qformer.encoder.layer.1.output_query.dense.bias"]
    with pytest.raises(CheckpointError, match=r"missing.*encoder_projector\.qformer\.encoder\.layer\.1\.output_query\.dense\.bias"):
        llm_srt.load_llm_srt_into(adapter, missing)

    missing = dict(sd)
    del missing["encoder_projector.norm.weight"]
    with pytest.raises(CheckpointError, match=r"missing.*encoder_projector\.norm\.weight"):
        llm_srt.load_llm_srt_into(adapter, missing)

    bad = dict(sd)
    bad["encoder_projector.query"] = np.zeros((1, 11, 32), np.float32)
    with pytest.raises(CheckpointError, match=r"query has shape \(1, 11, 32\), expected \(1, 10, 32\)"):
        llm_srt.load_llm_srt_into(adapter, bad)

    bad = dict(sd)
    bad["encoder_projector.qformer.encoder.layer.0.crossattention.attention.key.weight"] = np.zeros(
        (32, 20), np.float32)
    with pytest.raises(CheckpointError, match=r"layer\.0\.crossattention\.attention\.key\.weight has shape \(32, 20\)"):
        llm_srt.load_llm_srt_into(adapter, bad)

    wrong_proj = dict(sd)
    wrong_proj["encoder_projector.linear1.weight"] = np.zeros((1536, 32), np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected tensor encoder_projector\.linear1\.weight"):
        llm_srt.load_llm_srt_into(adapter, wrong_proj)

    with pytest.raises(CheckpointError, match="no tensors under 'encoder_projector.'"):
        llm_srt.infer_config({"llm.x": np.zeros(1)})


def test_torch_missing_gives_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *a, **kw):
        if name == "torch":
            raise ImportError("no torch")
        return real_import(name, *a, **kw)

    f = tmp_path / "model.pt"
    f.write_bytes(b"x")
    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(CheckpointError, match=r"needs PyTorch.*\.safetensors"):
        llm_srt.read_state_dict(f)


# ------------------------------------------------------------------------------------------
# HF Blip2QFormerModel: export reloads and matches; older checkpoints' text branch is ignored
# ------------------------------------------------------------------------------------------

def test_hf_export_reloads_and_matches(tmp_path):
    cfg = tiny_cfg(num_hidden_layers=3, cross_attention_frequency=2)
    adapter = SpeechAdapter(cfg, rngs=nnx.Rngs(21))
    save_hf_qformer(adapter.qformer, tmp_path / "qformer")
    hf = Blip2QFormerModel.from_pretrained(tmp_path / "qformer", attn_implementation="eager").eval()
    assert hf.config.num_hidden_layers == 3 and hf.config.encoder_hidden_size == D_ENC
    enc, mask = encoder_input(seed=2, masked=True)
    with torch.no_grad():
        ref = hf(query_embeds=t(adapter.query[...]).expand(B, -1, -1), encoder_hidden_states=t(enc),
                 encoder_attention_mask=t(mask)).last_hidden_state.numpy()
    assert max_diff(adapter.qformer_features(jnp.asarray(enc), jnp.asarray(mask)), ref) <= 1e-5
    # ... and the directory loads back into ours exactly.
    back = SpeechAdapter(cfg, rngs=nnx.Rngs(22))
    load_hf_qformer(back.qformer, tmp_path / "qformer")
    for k, v in flat_params(adapter.qformer).items():
        np.testing.assert_array_equal(flat_params(back.qformer)[k], v, err_msg=k)


def test_hf_import_ignores_old_text_branch_and_rejects_unknown():
    cfg = tiny_cfg()
    hf = hf_model(cfg)
    sd = numpy_state_dict(hf)
    old = dict(sd)
    old["embeddings.word_embeddings.weight"] = np.zeros((30522, 32), np.float32)
    old["embeddings.position_embeddings.weight"] = np.zeros((512, 32), np.float32)
    for i in range(cfg.num_hidden_layers):
        old[f"encoder.layer.{i}.intermediate.dense.weight"] = np.zeros((64, 32), np.float32)
        old[f"encoder.layer.{i}.output.dense.weight"] = np.zeros((32, 64), np.float32)
        old[f"encoder.layer.{i}.output.LayerNorm.weight"] = np.zeros((32,), np.float32)
    a = SpeechAdapter(cfg, rngs=nnx.Rngs(0))
    load_hf_qformer(a.qformer, old)
    b = SpeechAdapter(cfg, rngs=nnx.Rngs(0))
    load_hf_qformer(b.qformer, sd)
    for k, v in flat_params(a).items():
        np.testing.assert_array_equal(flat_params(b)[k], v, err_msg=k)
    # A full BLIP-2 checkpoint keeps the Q-Former under 'qformer.'.
    c = SpeechAdapter(cfg, rngs=nnx.Rngs(5))
    load_hf_qformer(c.qformer, {"qformer." + k: v for k, v in sd.items()})
    np.testing.assert_array_equal(flat_params(c.qformer)["layernorm.scale"], sd["layernorm.weight"])

    unknown = dict(sd)
    unknown["encoder.layer.1.crossattention.attention.query.weight"] = np.zeros((32, 32), np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected tensor encoder\.layer\.1\.crossattention"):
        load_hf_qformer(a.qformer, unknown)
    missing = dict(sd)
    del missing["encoder.layer.0.attention.output.LayerNorm.bias"]
    with pytest.raises(CheckpointError, match=r"missing.*encoder\.layer\.0\.attention\.output\.LayerNorm\.bias"):
        load_hf_qformer(a.qformer, missing)


# ------------------------------------------------------------------------------------------
# Config, errors, dropout, dtypes, logical axes
# ------------------------------------------------------------------------------------------

def test_config_defaults_and_hf_round_trip():
    d = QFormerConfig()
    assert (d.num_hidden_layers, d.hidden_size, d.num_attention_heads, d.intermediate_size,
            d.cross_attention_frequency, d.layer_norm_eps, d.num_queries, d.pool_k) == (
        8, 768, 12, 3072, 2, 1e-12, 80, None)
    assert d.projector_mid == 1536 and d.num_output_tokens == 80            # llm_dim 2048 (Qwen2.5-3B)
    assert QFormerConfig(llm_dim=1536).projector_mid is None
    assert QFormerConfig(llm_dim=2560).projector_mid == 1536
    assert QFormerConfig(llm_dim=3584).projector_mid == 2560
    pooled = QFormerConfig(num_queries=150, pool_k=5, llm_dim=2048)
    assert pooled.projector_mid == 2560 and pooled.num_output_tokens == 30
    hf = Blip2QFormerConfig(**d.to_hf_config())
    assert QFormerConfig.from_hf_config(hf, num_queries=80, llm_dim=2048) == d
    assert QFormerConfig.from_hf_config(hf.to_dict(), llm_dim=2048) == d
    # transformers' own defaults fill what a dict lacks (12 layers, encoder width 1408).
    assert QFormerConfig.from_hf_config({}).num_hidden_layers == 12
    with pytest.raises(ConfigError, match="unknown adapter key"):
        QFormerConfig.from_hf_config(hf, num_query=3)
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(QFormerConfig, {"num_layers": 8})
    assert from_dict(QFormerConfig, {"pool_k": 5, "num_queries": 150}).num_output_tokens == 30


def test_errors_short_input_wrong_width_odd_pooling():
    cfg = tiny_cfg()
    adapter = SpeechAdapter(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"expected encoder_hidden_size=24, got 20"):
        adapter(jnp.zeros((B, T_ENC, 20)))
    with pytest.raises(ValueError, match=r"too short: T_enc=0"):
        adapter(jnp.zeros((B, 0, D_ENC)))
    mask = np.ones((B, T_ENC), np.int32)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"too short: the encoder mask has no valid frame for batch row\(s\) \[1\]"):
        adapter(jnp.zeros((B, T_ENC, D_ENC)), jnp.asarray(mask))
    with pytest.raises(ValueError, match=r"mask shape \(2, 49\) does not match"):
        adapter(jnp.zeros((B, T_ENC, D_ENC)), jnp.ones((B, T_ENC - 1)))
    with pytest.raises(ValueError, match=r"\(B, T_enc, d_enc\)"):
        adapter(jnp.zeros((T_ENC, D_ENC)))
    with pytest.raises(ConfigError, match=r"pool_k: num_queries 12 is not divisible by the pooling window pool_k 5"):
        tiny_cfg(num_queries=12, pool_k=5)
    with pytest.raises(ConfigError, match=r"pool_k: num_queries 152"):
        from_dict(QFormerConfig, {"num_queries": 152, "pool_k": 5})
    with pytest.raises(ConfigError, match="not divisible by 5 heads"):
        tiny_cfg(num_attention_heads=5)
    pooled = SpeechAdapter(tiny_cfg(num_queries=15, pool_k=5), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"project expects Q-Former outputs \(B, 15, 32\); got shape \(2, 12, 32\)"):
        pooled.project(jnp.zeros((B, 12, 32)))


def test_dropout_only_in_training_with_explicit_rng():
    cfg = tiny_cfg(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    adapter = SpeechAdapter(cfg, rngs=nnx.Rngs(0))
    enc = jnp.asarray(encoder_input(seed=1)[0])
    eval_a, eval_b = adapter(enc), adapter(enc, deterministic=True, rngs=jax.random.key(0))
    assert max_diff(eval_a, eval_b) == 0.0
    with pytest.raises(ValueError, match="needs an explicit rng"):
        adapter(enc, deterministic=False)
    train_1 = adapter(enc, deterministic=False, rngs=jax.random.key(1))
    train_1b = adapter(enc, deterministic=False, rngs=nnx.Rngs(dropout=jax.random.key(1)))
    train_2 = adapter(enc, deterministic=False, rngs=jax.random.key(2))
    assert max_diff(train_1, eval_a) > 1e-3 and max_diff(train_1, train_2) > 1e-3
    assert max_diff(train_1, train_1b) == 0.0


def test_bf16_compute_and_logical_axes():
    cfg = tiny_cfg(dtype="bfloat16")
    adapter = SpeechAdapter(cfg, rngs=nnx.Rngs(0))
    ref = SpeechAdapter(dataclasses.replace(cfg, dtype="float32"), rngs=nnx.Rngs(0))
    enc = jnp.asarray(encoder_input(seed=3)[0])
    out = adapter(enc)
    assert out.dtype == jnp.bfloat16
    assert all(v.dtype == np.float32 for v in flat_params(adapter).values())   # f32 storage
    assert max_diff(out, ref(enc)) < 0.1
    for path, var in nnx.to_flat_state(nnx.state(adapter, nnx.Param)):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == var[...].ndim, path
    assert adapter.query.get_metadata()["out_sharding"] == (None, "q_len", "embed")
    key_axes = adapter.qformer.layers[0].crossattention.key.kernel.get_metadata()["out_sharding"]
    assert key_axes == ("enc_embed", "heads")


# ------------------------------------------------------------------------------------------
# attend_padding: false (cross-attention over the real encoder frames only)
# ------------------------------------------------------------------------------------------

def test_attend_padding_false_equals_key_padding_mask_over_all_frames():
    """Off (default, LLM-SRT): enc_frames is ignored. On: a bucketed prefix of the frames with
    enc_frames == all frames with an explicit key-padding mask == the LLM-SRT-style PyTorch
    projector given that mask as `atts`, <= 1e-5; and a frame count is required."""
    from esrt_jax.audio import encoder_frames

    frames = np.array([encoder_frames(13 * 320 + 5, T_ENC), encoder_frames(29 * 320, T_ENC)])  # 14, 29
    assert frames.tolist() == [14, 29] and encoder_frames(10**9, T_ENC) == T_ENC and encoder_frames(0) == 1
    enc, _ = encoder_input(seed=4)
    mask = (np.arange(T_ENC)[None] < frames[:, None]).astype(np.int64)
    ref_model = torch_reference(tiny_cfg(num_hidden_layers=3, cross_attention_frequency=1), seed=6)
    sd = numpy_state_dict(ref_model)
    with torch.no_grad():
        ref = ref_model.encoder_projector(t(enc), t(mask)).numpy()
        ref_all = ref_model.encoder_projector(t(enc)).numpy()

    def adapter(**kw):
        a = SpeechAdapter(tiny_cfg(num_hidden_layers=3, cross_attention_frequency=1, **kw), rngs=nnx.Rngs(0))
        llm_srt.load_llm_srt_into(a, sd)
        return a

    default = adapter()
    assert max_diff(default(jnp.asarray(enc), enc_frames=jnp.asarray(frames)), ref_all) <= 1e-5
    real = adapter(attend_padding=False)
    full_masked = real(jnp.asarray(enc), jnp.asarray(mask))
    P = 32  # the batch's longest real length (29) rounded up to a bucket of 16 frames
    trimmed = jax.jit(lambda e, f: real(e, enc_frames=f))(jnp.asarray(enc[:, :P]), jnp.asarray(frames))
    assert max_diff(full_masked, ref) <= 1e-5 and max_diff(trimmed, ref) <= 1e-5
    assert max_diff(trimmed, ref_all) > 1e-3  # the padding mattered
    with pytest.raises(ValueError, match="attend_padding: false.*enc_frames"):
        real(jnp.asarray(enc))
    with pytest.raises(ValueError, match="no valid frame"):
        real(jnp.asarray(enc), enc_frames=jnp.asarray([0, 3]))
