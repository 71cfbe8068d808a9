"""Decoder LLMs (Qwen2, Qwen3, Llama, Gemma-3 text): parity with transformers, KV cache, layouts.

Each family is built as a tiny random transformers model (2-3 layers, hidden 64, 4 heads, 2 KV
heads, vocab 256), saved with save_pretrained, loaded with our loader, and compared on a
LEFT-padded batch: logits (fp32) and 20 greedy tokens with our KV cache vs transformers.generate.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from esrt_jax.config import ConfigError  # noqa: E402
from esrt_jax.convert import hf_io  # noqa: E402
from esrt_jax.convert.llm import load_hf_model  # noqa: E402
from helpers_llm import left_padded_batch, tiny_hf_pair  # noqa: E402
from esrt_jax.infer import generate as gen  # noqa: E402
from esrt_jax.models import llm  # noqa: E402

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)


def _hf_configs():
    return {
        "qwen2": (transformers.Qwen2Config(**COMMON, num_hidden_layers=2, tie_word_embeddings=False),
                  transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config(
            **COMMON, num_hidden_layers=2, head_dim=16, tie_word_embeddings=True,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 32}),
                  transformers.Qwen3ForCausalLM),
        "llama": (transformers.LlamaConfig(
            **COMMON, num_hidden_layers=2, tie_word_embeddings=False, attention_bias=True,
            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16}),
            transformers.LlamaForCausalLM),
        # Dynamic NTK rope: max_position_embeddings 8 < sequence 16, so the base really grows.
        "llama_dynamic": (transformers.LlamaConfig(
            **{**COMMON, "max_position_embeddings": 8}, num_hidden_layers=2,
            rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
            transformers.LlamaForCausalLM),
        # Window 4 < sequence 16; sliding + global layers with different rope bases; final softcap.
        "gemma3": (transformers.Gemma3TextConfig(
            **COMMON, num_hidden_layers=3, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            final_logit_softcapping=5.0, tie_word_embeddings=True,
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}),
            transformers.Gemma3ForCausalLM),
    }


FAMILIES = ["qwen2", "qwen3", "llama", "gemma3"]
B, T = 3, 16


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    out = {}
    for name, (hc, cls) in _hf_configs().items():
        out[name] = tiny_hf_pair(cls, hc, tmp_path_factory.mktemp(name))
    return out


def greedy_generate(model, ids, mask, max_new_tokens, eos_token_id=None, pad_token_id=0):
    """The one decoding implementation (`infer.generate`), greedy, on a bare LLM."""
    cfg = gen.GenerateConfig(max_new_tokens=max_new_tokens, no_repeat_ngram_size=0,
                             eos_ids=llm.eos_tuple(eos_token_id), pad_id=pad_token_id)
    g, s = nnx.split(model)
    return gen.generate(g, s, model.embed(jnp.asarray(ids, jnp.int32)), jnp.asarray(mask, bool), cfg)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, pos, mask):
    m = nnx.merge(graphdef, state)
    return m(m.embed(ids), pos, mask)[0]


def forward(model, ids, pos, mask):
    g, s = nnx.split(model)
    return np.asarray(_forward(g, s, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask)))


def _torch_logits(tm, ids, mask, pos):
    with torch.no_grad():
        return tm(input_ids=torch.tensor(ids, dtype=torch.long),
                  attention_mask=torch.tensor(mask.astype(np.int64)),
                  position_ids=torch.tensor(pos, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("fam", FAMILIES + ["llama_dynamic"])
def test_logits_parity_left_padded(families, fam):
    tm, _, cfg, model = families[fam]
    ids, mask, pos = left_padded_batch(B, T)
    ref = _torch_logits(tm, ids, mask, pos)
    ours = forward(model, ids, pos, mask)
    assert ours.shape == (B, T, cfg.vocab_size) and ours.dtype == np.float32
    diff = np.abs(ours - ref)[mask].max()
    print(f"{fam}: logits max abs diff {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("fam", FAMILIES)
def test_greedy_generation_matches_transformers(families, fam):
    tm, _, cfg, model = families[fam]
    ids, mask, _ = left_padded_batch(B, T)
    ours = np.asarray(greedy_generate(model, ids, mask, 20, eos_token_id=None, pad_token_id=0))
    with torch.no_grad():
        ref = tm.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                          attention_mask=torch.tensor(mask.astype(np.int64)), max_new_tokens=20,
                          min_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref = ref[:, T:].numpy()
    assert ours.shape == (B, 20)
    np.testing.assert_array_equal(ours, ref)


def test_greedy_stops_at_eos_and_pads(families):
    _, _, _, model = families["qwen2"]
    ids, mask, _ = left_padded_batch(B, T)
    free = np.asarray(greedy_generate(model, ids, mask, 8, eos_token_id=None))
    eos = int(free[0, 2])  # row 0 emits this at step 2 -> it must stop there
    out = np.asarray(greedy_generate(model, ids, mask, 8, eos_token_id=eos, pad_token_id=255))
    for r in range(B):
        hit = np.flatnonzero(free[r] == eos)
        if len(hit):
            np.testing.assert_array_equal(out[r, :hit[0] + 1], free[r, :hit[0] + 1])
            assert (out[r, hit[0] + 1:] == 255).all()
        else:
            np.testing.assert_array_equal(out[r], free[r])


def test_cache_chunks_equal_full_forward(families):
    """Prefill 10 tokens, then 3 + 1 + 1 + 1 with the cache == one full forward (gemma3: sliding)."""
    _, _, _, model = families["gemma3"]
    ids, mask, pos = left_padded_batch(B, T)
    full = forward(model, ids, pos, mask)
    cache = model.init_cache(B, 24, jnp.float32)
    step = jax.jit(lambda g, s, x, p, m, c: nnx.merge(g, s)(x, p, m, c), static_argnums=0)
    g, s = nnx.split(model)
    outs = []
    for a, b in [(0, 10), (10, 13), (13, 14), (14, 15), (15, 16)]:
        x = model.embed(jnp.asarray(ids[:, a:b]))
        lg, cache = step(g, s, x, jnp.asarray(pos[:, a:b]), jnp.asarray(mask[:, a:b]), cache)
        outs.append(np.asarray(lg))
    assert int(cache["index"]) == 16 and cache["k"].shape == (3, B, 24, 2, 16)
    np.testing.assert_array_equal(np.asarray(cache["mask"])[:, :16], mask)
    got = np.concatenate(outs, axis=1)
    assert np.abs(got - full)[mask].max() <= 1e-5


def test_scan_loop_remat_identical(families):
    _, d, cfg, base = families["gemma3"]
    ids, mask, pos = left_padded_batch(B, T)
    state = nnx.state(base)
    variants = {}
    for scan, remat in [(True, False), (False, False), (True, True), (False, True)]:
        m = llm.CausalLM(cfg, scan_layers=scan, remat=remat, rngs=nnx.Rngs(1))
        nnx.update(m, state)
        variants[scan, remat] = m
    ref = forward(base, ids, pos, mask)
    for key in [(False, False), (True, True)]:
        np.testing.assert_allclose(forward(variants[key], ids, pos, mask), ref, rtol=0, atol=1e-6)

    def grad_q(m):
        g, s = nnx.split(m)

        def loss(s):
            mm = nnx.merge(g, s)
            return jnp.mean(mm(mm.embed(jnp.asarray(ids)), jnp.asarray(pos), jnp.asarray(mask))[0] ** 2)

        return np.asarray(jax.jit(jax.grad(loss))(s)["layers"]["self_attn"]["q_proj"]["kernel"][...])

    g0 = grad_q(variants[True, False])
    assert np.abs(g0).max() > 0
    np.testing.assert_allclose(grad_q(variants[False, True]), g0, rtol=1e-4, atol=1e-8)


def test_param_tree_layout_and_axes(families):
    _, _, cfg, model = families["qwen2"]
    flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.state(model))}
    L, D, H, KV, Dh, F, V = 2, 64, 4, 2, 16, 128, 256
    expect = {
        "embed_tokens/embedding": ((V, D), ("vocab", "embed")),
        "layers/input_layernorm/scale": ((L, D), ("layers", "embed")),
        "layers/self_attn/q_proj/kernel": ((L, D, H, Dh), ("layers", "embed", "heads", "head_dim")),
        "layers/self_attn/q_proj/bias": ((L, H, Dh), ("layers", "heads", "head_dim")),
        "layers/self_attn/k_proj/kernel": ((L, D, KV, Dh), ("layers", "embed", "kv_heads", "head_dim")),
        "layers/self_attn/o_proj/kernel": ((L, H, Dh, D), ("layers", "heads", "head_dim", "embed")),
        "layers/mlp/gate_proj/kernel": ((L, D, F), ("layers", "embed", "mlp")),
        "layers/mlp/down_proj/kernel": ((L, F, D), ("layers", "mlp", "embed")),
        "norm/scale": ((D,), ("embed",)),
        "lm_head/kernel": ((D, V), ("embed", "vocab")),
    }
    for path, (shape, axes) in expect.items():
        assert flat[path][...].shape == shape, path
        assert tuple(flat[path].get_metadata("out_sharding")) == axes, path
    # Every param is covered by exactly one HF tensor (or a stacked slice of it).
    maps = llm.hf_to_ours(cfg)
    covered = {"/".join(m.path) for m in maps}
    assert covered == set(flat)
    # ours -> HF reproduces the transformers state dict exactly.
    tm = families["qwen2"][0]
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    names = set()
    for name, arr in llm.params_to_hf(nnx.state(model), cfg):
        np.testing.assert_array_equal(arr, sd[name], err_msg=name)
        names.add(name)
    assert names == set(sd)


@pytest.mark.parametrize("fam", FAMILIES)
def test_hf_config_round_trip(families, fam):
    tm, _, cfg, _ = families[fam]
    hf = cfg.to_hf_config()
    assert llm.config_from_hf(hf) == cfg
    # transformers accepts it and builds the same architecture
    hc = transformers.AutoConfig.for_model(**hf)
    assert llm.config_from_hf(hc) == cfg
    assert llm.config_from_hf(json.loads(json.dumps(hf))) == cfg


def test_gemma3_legacy_and_multimodal_configs():
    # Older config.json style (rope_theta / rope_local_base_freq / sliding_window_pattern).
    legacy = dict(model_type="gemma3_text", vocab_size=256, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  rope_theta=1e6, rope_local_base_freq=1e4, sliding_window_pattern=3,
                  rope_scaling={"rope_type": "linear", "factor": 8.0}, sliding_window=512)
    cfg = llm.config_from_hf(legacy)
    assert cfg.layer_types == ("sliding_attention", "sliding_attention", "full_attention") * 2
    assert (cfg.rope_theta, cfg.local_rope_theta, cfg.rope_type, cfg.rope_factor) == (1e6, 1e4, "linear", 8.0)
    assert cfg.attn_scale == 256 ** -0.5 and cfg.tie_word_embeddings and cfg.embed_scale
    mm = llm.config_from_hf({"model_type": "gemma3", "text_config": legacy})
    assert mm == cfg


def test_unsupported_model_type_error():
    with pytest.raises(ConfigError, match=r"model_type 'mamba' is not supported.*gemma3_text.*llama.*qwen2.*qwen3"):
        llm.config_from_hf({"model_type": "mamba", "hidden_size": 8})
    with pytest.raises(ConfigError, match="rope type 'longrope' is not supported"):
        llm.config_from_hf(dict(model_type="llama", **COMMON, num_hidden_layers=2,
                                rope_scaling={"rope_type": "longrope", "factor": 4.0}))


def test_missing_and_misshaped_tensor_errors(families, tmp_path):
    from safetensors.numpy import load_file, save_file
    _, d, cfg, _ = families["qwen2"]
    tensors = load_file(str(d / "model.safetensors"))
    bad = dict(tensors)
    del bad["model.layers.1.self_attn.k_proj.weight"]
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(hf_io.CheckpointError, match=r"missing tensor\(s\).*model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_hf_model(tmp_path, cfg=cfg)
    bad = dict(tensors)
    bad["model.norm.weight"] = np.ones(32, np.float32)
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(hf_io.CheckpointError, match=r"model\.norm\.weight has shape \(32,\)"):
        load_hf_model(tmp_path, cfg=cfg)


def test_bf16_checkpoint_loads(families, tmp_path):
    tm, _, cfg, model = families["llama"]
    tm.to(torch.bfloat16).save_pretrained(tmp_path)
    tm.to(torch.float32)
    m16 = load_hf_model(tmp_path, cfg=cfg)
    a = nnx.state(model)["layers"]["mlp"]["up_proj"]["kernel"][...]
    b = nnx.state(m16)["layers"]["mlp"]["up_proj"]["kernel"][...]
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-2)


def test_gemma3_multimodal_checkpoint_text_part(tmp_path):
    """ESRT starts from multimodal gemma-3 checkpoints: we load only the text decoder from them."""
    tc = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
              query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"])
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              image_size=28, patch_size=14)
    hc = transformers.Gemma3Config(text_config=tc, vision_config=vc, mm_tokens_per_image=4,
                                   image_token_index=299, boi_token_index=297, eoi_token_index=298)
    hc._attn_implementation = "eager"
    torch.manual_seed(0)
    tm = transformers.Gemma3ForConditionalGeneration(hc).eval()
    tm.save_pretrained(tmp_path)
    prefix = llm.detect_hf_prefix(hf_io.weight_files(tmp_path))
    assert prefix in ("language_model.model.", "model.language_model.")
    m = load_hf_model(tmp_path)  # config.json model_type 'gemma3' -> text_config
    assert m.config.model_type == "gemma3_text" and m.config.vocab_size == 300
    ids, mask, pos = left_padded_batch(B, T)
    ref = _torch_logits(tm, ids, mask, pos)
    assert np.abs(forward(m, ids, pos, mask) - ref)[mask].max() <= 1e-4
