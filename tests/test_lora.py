"""LoRA on the decoder LLM: separate `LoraParam` subtree, B = 0 init, dropout only with an rng,
merge into base kernels equals the unmerged forward."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from esrt_jax.config import ConfigError, from_dict
from esrt_jax.models import llm
from esrt_jax.models.layers import LoraParam

HF = dict(model_type="qwen2", vocab_size=128, hidden_size=32, intermediate_size=64,
          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@functools.partial(jax.jit, static_argnums=0)
def _fwd(graphdef, state, ids, rng):
    m = nnx.merge(graphdef, state)
    mask = jnp.ones(ids.shape, bool)
    return m(m.embed(ids), llm.positions_from_mask(mask), mask, dropout_rng=rng)[0]


def fwd(model, ids, rng=None):
    g, s = nnx.split(model)
    return np.asarray(_fwd(g, s, ids, rng))


@pytest.fixture(scope="module")
def setup():
    cfg = llm.config_from_hf(HF)
    lora = llm.LoraConfig(targets=ALL, rank=4, alpha=8.0, dropout=0.3)
    model = llm.CausalLM(cfg, lora=lora, rngs=nnx.Rngs(0))
    plain = llm.CausalLM(cfg, rngs=nnx.Rngs(5))  # same architecture without LoRA
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 8)), jnp.int32)
    return cfg, lora, model, ids, plain


def _randomize_lora(model, seed=1):
    lstate = nnx.state(model, LoraParam)
    leaves, tree = jax.tree.flatten(lstate)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(tree, [0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))


def test_lora_subtree_and_zero_init(setup):
    cfg, lora, model, ids, plain = setup
    g, lstate, rest = nnx.split(model, LoraParam, nnx.Param)
    lflat = {"/".join(k): v for k, v in nnx.to_flat_state(lstate)}
    assert len(lflat) == 2 * len(ALL)
    assert lflat["layers/self_attn/q_proj/lora_a"][...].shape == (2, 32, 4)
    assert lflat["layers/self_attn/q_proj/lora_b"][...].shape == (2, 4, 4, 8)
    assert lflat["layers/self_attn/o_proj/lora_a"][...].shape == (2, 4, 8, 4)
    assert lflat["layers/self_attn/q_proj/lora_a"].get_metadata("out_sharding") == ("layers", "embed", None)
    assert all(not np.any(np.asarray(v[...])) for k, v in lflat.items() if k.endswith("lora_b"))
    assert all(np.any(np.asarray(v[...])) for k, v in lflat.items() if k.endswith("lora_a"))
    assert not any("lora" in "/".join(k) for k, _ in nnx.to_flat_state(rest))
    # B = 0: same forward as the model without LoRA holding the same base weights.
    nnx.update(plain, rest)
    np.testing.assert_allclose(fwd(model, ids), fwd(plain, ids), atol=1e-6)
    # Default config = the papers' setting.
    d = llm.LoraConfig()
    assert (d.targets, d.rank, d.alpha, d.dropout) == (("q_proj", "v_proj"), 16, 32.0, 0.05)
    m2 = nnx.eval_shape(lambda: llm.CausalLM(cfg, lora=d, rngs=nnx.Rngs(0)))
    names = {"/".join(k) for k, _ in nnx.to_flat_state(nnx.state(m2, LoraParam))}
    assert names == {f"layers/self_attn/{p}/lora_{x}" for p in ("q_proj", "v_proj") for x in "ab"}


def test_merge_equals_unmerged_and_dropout(setup):
    cfg, lora, model, ids, plain = setup
    before = fwd(model, ids)  # lora_b = 0
    _randomize_lora(model)
    unmerged = fwd(model, ids)
    assert np.abs(unmerged - before).max() > 1e-3
    graphdef, state = nnx.split(model)
    merged_state = llm.merge_lora(state, lora)
    kern = ("layers", "self_attn", "o_proj", "kernel")
    assert np.abs(np.asarray(dict(nnx.to_flat_state(merged_state))[kern][...])
                  - np.asarray(dict(nnx.to_flat_state(state))[kern][...])).max() > 0
    diff = np.abs(fwd(nnx.merge(graphdef, merged_state), ids) - unmerged).max()
    assert diff <= 1e-4, diff
    # The merged base kernels alone (no LoRA module at all) give the same forward: export path.
    nnx.update(plain, nnx.filter_state(merged_state, nnx.Not(LoraParam)))
    assert np.abs(fwd(plain, ids) - unmerged).max() <= 1e-4
    # Dropout only with an rng; reproducible for a given rng.
    r = jax.random.key(7)
    d1, d2 = fwd(model, ids, r), fwd(model, ids, r)
    np.testing.assert_array_equal(d1, d2)
    assert np.abs(d1 - unmerged).max() > 1e-4
    np.testing.assert_array_equal(fwd(model, ids), unmerged)


def test_grad_only_lora(setup):
    cfg, lora, model, ids, plain = setup
    g, lstate, rest = nnx.split(model, LoraParam, nnx.Param)

    def loss(ls):
        m = nnx.merge(g, ls, rest)
        mask = jnp.ones(ids.shape, bool)
        return jnp.mean(m(m.embed(ids), llm.positions_from_mask(mask), mask)[0] ** 2)

    grads = jax.grad(loss)(lstate)
    flat = {"/".join(k): v for k, v in nnx.to_flat_state(grads)}
    assert set(flat) == {"/".join(k) for k, _ in nnx.to_flat_state(lstate)}
    assert np.abs(np.asarray(flat["layers/self_attn/q_proj/lora_b"][...])).max() > 0


def test_lora_config_errors():
    with pytest.raises(ConfigError, match=r"unknown LoRA target\(s\) \['qkv'\]"):
        llm.LoraConfig(targets=("qkv",))
    with pytest.raises(ConfigError, match="rank: must be > 0"):
        from_dict(llm.LoraConfig, {"rank": 0})
    assert from_dict(llm.LoraConfig, {"targets": ["q_proj", "o_proj"], "rank": 8}).targets == ("q_proj", "o_proj")


def test_run_config_lora_block_is_the_model_lora_config():
    """The run config's `lora:` block reuses the model's LoraConfig: same defaults, same checks."""
    from esrt_jax.train.config import RunLoraConfig, load_run_config

    off = RunLoraConfig()
    assert off.model_lora() is None
    on = load_run_config(None, ["lora.enabled=true", "lora.rank=4"]).lora
    assert on.model_lora() == llm.LoraConfig(rank=4) and type(on.model_lora()) is llm.LoraConfig
    assert {k: getattr(off, k) for k in ("targets", "rank", "alpha", "dropout")} == \
        {k: getattr(llm.LoraConfig(), k) for k in ("targets", "rank", "alpha", "dropout")}
    with pytest.raises(ConfigError, match=r"lora.targets: unknown LoRA target"):
        load_run_config(None, ["lora.targets=[qkv]"])
