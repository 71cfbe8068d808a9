"""Decoder-only LLMs (Llama, Qwen2/2.5, Qwen3, Gemma-3 text) in Flax NNX: one implementation.

Files: this module holds the modules, `config_from_hf`, `abstract_model` and `merge_lora`; the
configs and HF rope parsing are in `llm_config.py`, the HF tensor-name maps in `llm_hf.py` (both
re-exported here); loading / exporting HF directories is `esrt_jax.convert.llm`.

API (other modules code against this):

    cfg   = config_from_hf(hf_config_or_dict)         # family picked by `model_type`
    model = CausalLM(cfg, lora=LoraConfig() | None, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                     scan_layers=True, remat=False, rngs=nnx.Rngs(0))
    x     = model.embed(ids)                          # ids (B, T) int32 -> (B, T, D) compute dtype,
                                                      #   Gemma's sqrt(D) scale included
    logits, cache = model(x, positions, attention_mask, cache=None,
                          dropout_rng=None, last_logits_only=False)
        x (B, T, D); positions (B, T) int32 (pass cumsum(mask)-1 clipped at 0 so that left padding
        never shifts rotary positions); attention_mask (B, T) bool, True = real token.
        -> logits (B, T, V) f32 ((B, 1, V) with last_logits_only), new cache or None.
        hidden_only=True returns the pre-norm last hidden states (B, T, D) instead of logits;
        model.head(h) (..., D) -> (..., V) f32 applies norm, LM head and soft-capping.
    cache = model.init_cache(batch, max_len, dtype)
        {"k": (L, B, S, KV, Dh), "v": (L, B, S, KV, Dh), "mask": (B, S) bool, "index": () int32}
        With a cache the T new tokens are written at slots [index, index + T), their mask bits set
        from attention_mask; every query attends to the valid slots <= its own slot (sliding
        windows are measured in slots, as in HF); index += T. Shapes are static and index is an
        array, so decoding never recompiles per step. The caller keeps index + T <= S (jax
        clamps out-of-range dynamic slices silently).

Parameter tree (`nnx.state(model)`; every leaf an `nnx.Param` with logical axes, LoRA factors
`LoraParam`). Decoder layers are STACKED: one module whose params have a leading `layers` axis
(L, ...), run with `jax.lax.scan` (or a python loop over slices; identical results):

    embed_tokens/embedding                        (V, D)          (vocab, embed)
    layers/input_layernorm/scale                  (L, D)          (layers, embed)
    layers/self_attn/q_proj/kernel                (L, D, H, Dh)   (layers, embed, heads, head_dim)
    layers/self_attn/q_proj/bias                  (L, H, Dh)      [Qwen2; Llama attention_bias]
    layers/self_attn/k_proj/kernel, v_proj/kernel (L, D, KV, Dh)  (layers, embed, kv_heads, head_dim)
    layers/self_attn/o_proj/kernel                (L, H, Dh, D)   (layers, heads, head_dim, embed)
    layers/self_attn/q_norm/scale, k_norm/scale   (L, Dh)         [Qwen3, Gemma-3]
    layers/post_attention_layernorm/scale         (L, D)
    layers/pre_feedforward_layernorm/scale        (L, D)          [Gemma-3]
    layers/post_feedforward_layernorm/scale       (L, D)          [Gemma-3]
    layers/mlp/{gate_proj,up_proj}/kernel         (L, D, F)       (layers, embed, mlp)
    layers/mlp/down_proj/kernel                   (L, F, D)       (layers, mlp, embed)
    norm/scale                                    (D,)
    lm_head/kernel                                (D, V)          (embed, vocab)  [untied only]
    LoRA on target t: layers/.../t/lora_a (L, *in, r), layers/.../t/lora_b (L, r, *out)

Names mirror HF's (`model.layers.{i}.self_attn.q_proj.weight` -> `layers/self_attn/q_proj/kernel`
slice i). `hf_to_ours(cfg)` / `ours_to_hf(cfg)` yield one `ParamMap` per HF tensor (hf_name, our
path, layer index into the stacked axis or None, and the numpy transform; a row range of it where
the family's checkpoints fuse projections, `LLMConfig.HF_FUSED`, e.g. Phi-3), so converters can
stream tensor by tensor (`esrt_jax.convert.llm.load_hf_model`, the one loader).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from esrt_jax.config import ConfigError, check_field_types, hf_dict
from esrt_jax.models import gemma3, llama, phi3, qwen
from esrt_jax.models.layers import (Embed, GatedMLP, Linear, RMSNorm, apply_rope, attend,
                                    attention_mask, rope_cos_sin)
# The config and the HF name maps live in their own modules; they are part of this module's API.
from esrt_jax.models.llm_config import LAYER_TYPES, LLMConfig, LoraConfig, eos_tuple, rope_from_hf  # noqa: F401
from esrt_jax.models.llm_hf import (HF_PREFIXES, ParamMap, detect_hf_prefix,  # noqa: F401
                                    hf_to_ours, ours_to_hf, params_to_hf)

# Family configs by HF `model_type`.
FAMILIES: dict[str, type[LLMConfig]] = {
    mt: cls for cls in (qwen.QwenConfig, gemma3.Gemma3TextConfig, llama.LlamaConfig, phi3.Phi3Config)
    for mt in cls.MODEL_TYPES}


def config_from_hf(hf: Any) -> LLMConfig:
    """HF config (transformers object or config.json dict) -> our frozen family config."""
    d = hf_dict(hf)
    mt = d.get("model_type")
    if mt not in FAMILIES:
        raise ConfigError(f"model_type {mt!r} is not supported by esrt_jax.models.llm; "
                          f"supported model types: {', '.join(sorted(FAMILIES))}")
    check_field_types(FAMILIES[mt], d, "llm_config")  # 'hidden_size: big' is a ConfigError, not a traceback
    return FAMILIES[mt].from_hf_config(d)


def abstract_model(cfg: LLMConfig, *, lora: LoraConfig | None = None, dtype: Any = jnp.float32,
                   param_dtype: Any = jnp.float32, scan_layers: bool = True,
                   remat: bool = False) -> "CausalLM":
    """A `CausalLM` of ShapeDtypeStructs (no memory, no init compute), with logical axes."""
    return nnx.eval_shape(lambda: CausalLM(cfg, lora=lora, dtype=dtype, param_dtype=param_dtype,
                                           scan_layers=scan_layers, remat=remat, rngs=nnx.Rngs(0)))


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

def _lora_kwargs(lora: LoraConfig | None, name: str) -> dict:
    if lora is None or name not in lora.targets:
        return {}
    return {"lora_rank": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout}


class Attention(nnx.Module):
    """Projections (+ QK-norm) of one attention layer; the math is `layers.attend`."""

    def __init__(self, cfg: LLMConfig, *, lora: LoraConfig | None, dtype, param_dtype, rngs):
        d, h, kv, dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear((d,), (h, dh), in_axes=("embed",), out_axes=("heads", "head_dim"),
                             use_bias=cfg.qkv_bias, **kw, **_lora_kwargs(lora, "q_proj"))
        self.k_proj = Linear((d,), (kv, dh), in_axes=("embed",), out_axes=("kv_heads", "head_dim"),
                             use_bias=cfg.qkv_bias, **kw, **_lora_kwargs(lora, "k_proj"))
        self.v_proj = Linear((d,), (kv, dh), in_axes=("embed",), out_axes=("kv_heads", "head_dim"),
                             use_bias=cfg.qkv_bias, **kw, **_lora_kwargs(lora, "v_proj"))
        self.o_proj = Linear((h, dh), (d,), in_axes=("heads", "head_dim"), out_axes=("embed",),
                             use_bias=cfg.o_bias, **kw, **_lora_kwargs(lora, "o_proj"))
        if cfg.qk_norm:
            nkw = dict(eps=cfg.rms_norm_eps, plus_one=cfg.norm_plus_one, axes=("head_dim",), **kw)
            self.q_norm = RMSNorm(dh, **nkw)
            self.k_norm = RMSNorm(dh, **nkw)
        else:
            self.q_norm = self.k_norm = None

    def qkv(self, x, cos, sin, rng=None):
        """x (B, T, D) -> q (B, T, H, Dh), k, v (B, T, KV, Dh); rotary applied to q and k."""
        r = (lambda i: None) if rng is None else (lambda i: jax.random.fold_in(rng, i))
        q, k, v = self.q_proj(x, r(0)), self.k_proj(x, r(1)), self.v_proj(x, r(2))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class DecoderLayer(nnx.Module):
    """One pre-norm decoder block (Gemma: sandwich norms). Built stacked by `CausalLM`."""

    def __init__(self, cfg: LLMConfig, *, lora: LoraConfig | None, dtype, param_dtype, rngs):
        d = cfg.hidden_size
        nkw = dict(eps=cfg.rms_norm_eps, plus_one=cfg.norm_plus_one, dtype=dtype,
                   param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(d, **nkw)
        self.self_attn = Attention(cfg, lora=lora, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(d, **nkw)
        if cfg.sandwich_norm:
            self.pre_feedforward_layernorm = RMSNorm(d, **nkw)
            self.post_feedforward_layernorm = RMSNorm(d, **nkw)
        else:
            self.pre_feedforward_layernorm = self.post_feedforward_layernorm = None
        mlp_lora = {n: _lora_kwargs(lora, n) for n in ("gate_proj", "up_proj", "down_proj")}
        self.mlp = GatedMLP(d, cfg.intermediate_size, act=cfg.hidden_act, use_bias=cfg.mlp_bias,
                            dtype=dtype, param_dtype=param_dtype, lora=mlp_lora, rngs=rngs)
        self.sandwich = cfg.sandwich_norm
        self.scale = cfg.attn_scale
        self.softcap = cfg.attn_logit_softcapping

    def __call__(self, x, cos, sin, mask, kv_fn, rng=None):
        """x (B, T, D); cos/sin (B, T, Dh); mask (B, T, S); kv_fn(k, v) -> keys, values (B, S, KV, Dh)
        (identity without a cache, cache write + read with one)."""
        r = (lambda i: None) if rng is None else (lambda i: jax.random.fold_in(rng, i))
        h = self.input_layernorm(x)
        q, k, v = self.self_attn.qkv(h, cos, sin, r(0))
        keys, values = kv_fn(k, v)
        a = attend(q, keys, values, mask, scale=self.scale, softcap=self.softcap)
        a = self.self_attn.o_proj(a, r(1))
        if self.sandwich:
            x = x + self.post_attention_layernorm(a)
            m = self.mlp(self.pre_feedforward_layernorm(x), r(2))
            return x + self.post_feedforward_layernorm(m)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x), r(2))


class CausalLM(nnx.Module):
    """Decoder LLM with LM head. See the module docstring for the call contract and param tree."""

    def __init__(self, cfg: LLMConfig, *, lora: LoraConfig | None = None,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 scan_layers: bool = True, remat: bool = False, rngs: nnx.Rngs):
        self.config, self.lora = cfg, lora
        self.dtype, self.param_dtype = dtype, param_dtype
        self.scan_layers, self.remat = scan_layers, remat
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
        # Stacked layers (leading `layers` axis on every param and its logical axes), as Whisper.
        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(r: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(cfg, lora=lora, dtype=dtype, param_dtype=param_dtype, rngs=r)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, plus_one=cfg.norm_plus_one,
                            dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        Linear((cfg.hidden_size,), (cfg.vocab_size,), in_axes=("embed",),
                               out_axes=("vocab",), dtype=dtype, param_dtype=param_dtype, rngs=rngs))

    # -- inputs ---------------------------------------------------------------------------
    def embed(self, ids: jax.Array) -> jax.Array:
        """ids (B, T) int -> (B, T, D) in compute dtype (Gemma: times sqrt(D), rounded to dtype as HF)."""
        x = self.embed_tokens(ids)
        if self.config.embed_scale:
            x = x * jnp.asarray(self.config.hidden_size ** 0.5, dtype=self.dtype)
        return x

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> dict:
        """Empty KV cache: k/v (L, B, S, KV, Dh), mask (B, S) bool, index () int32."""
        c = self.config
        shape = (c.num_hidden_layers, batch, max_len, c.num_key_value_heads, c.head_dim)
        dt = dtype or self.dtype
        return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt),
                "mask": jnp.zeros((batch, max_len), bool), "index": jnp.zeros((), jnp.int32)}

    # -- forward --------------------------------------------------------------------------
    def __call__(self, inputs_embeds: jax.Array, positions: jax.Array, attention_mask: jax.Array,
                 cache: dict | None = None, *, dropout_rng: jax.Array | None = None,
                 last_logits_only: bool = False, hidden_only: bool = False) -> tuple[jax.Array, dict | None]:
        """inputs_embeds (B, T, D), positions (B, T) int32, attention_mask (B, T) bool
        -> (logits (B, T, V) f32, new cache or None).

        `hidden_only` returns the last layer's hidden states (B, T, D) before the final norm
        instead of logits, for losses that apply `head` only where they need it."""
        cfg = self.config
        b, t, _ = inputs_embeds.shape
        x = inputs_embeds.astype(self.dtype)
        attention_mask = attention_mask.astype(bool)
        positions = positions.astype(jnp.int32)

        if cache is None:
            kv_valid = attention_mask
            q_slots = jnp.arange(t, dtype=jnp.int32)
            index = None
        else:
            index = cache["index"].astype(jnp.int32)
            kv_valid = jax.lax.dynamic_update_slice(cache["mask"], attention_mask, (0, index))
            q_slots = index + jnp.arange(t, dtype=jnp.int32)

        any_sliding = any(cfg.is_sliding)
        cos_g, sin_g = rope_cos_sin(positions, cfg.rope_spec(local=False))
        mask_g = _mask_fn(q_slots, kv_valid, None)
        if any_sliding:
            cos_l, sin_l = rope_cos_sin(positions, cfg.rope_spec(local=True))
            mask_l = _mask_fn(q_slots, kv_valid, cfg.sliding_window)
        else:
            cos_l, sin_l, mask_l = cos_g, sin_g, mask_g

        graphdef, state = nnx.split(self.layers)
        sliding = jnp.asarray(cfg.is_sliding, bool)
        layer_ids = jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32)

        def body(carry, xs):
            h, k_all, v_all = carry
            st, i, is_sl = xs
            layer = nnx.merge(graphdef, st)
            if any_sliding:
                cos = jnp.where(is_sl, cos_l, cos_g)
                sin = jnp.where(is_sl, sin_l, sin_g)
                mask = jnp.where(is_sl, mask_l, mask_g)
            else:
                cos, sin, mask = cos_g, sin_g, mask_g
            new_kv = {}

            def kv_fn(k, v):
                if k_all is None:
                    return k, v
                zero = jnp.zeros((), jnp.int32)
                ka = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), (i, zero, index, zero, zero))
                va = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), (i, zero, index, zero, zero))
                new_kv["k"], new_kv["v"] = ka, va
                return (jax.lax.dynamic_index_in_dim(ka, i, 0, keepdims=False),
                        jax.lax.dynamic_index_in_dim(va, i, 0, keepdims=False))

            rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
            h = layer(h, cos, sin, mask, kv_fn, rng)
            if k_all is not None:
                k_all, v_all = new_kv["k"], new_kv["v"]
            return (h, k_all, v_all), None

        if self.remat:
            body = jax.checkpoint(body, prevent_cse=not self.scan_layers)
        carry = (x, None if cache is None else cache["k"], None if cache is None else cache["v"])
        if self.scan_layers:
            carry, _ = jax.lax.scan(body, carry, (state, layer_ids, sliding))
        else:
            for li in range(cfg.num_hidden_layers):
                st_i = jax.tree.map(lambda a: a[li], state)
                carry, _ = body(carry, (st_i, layer_ids[li], sliding[li]))
        h, k_all, v_all = carry

        new_cache = None
        if cache is not None:
            new_cache = {"k": k_all, "v": v_all, "mask": kv_valid, "index": index + t}
        if hidden_only:
            return h, new_cache
        if last_logits_only:
            h = h[:, -1:]
        return self.head(h), new_cache

    def head(self, h: jax.Array) -> jax.Array:
        """Last-layer hidden states (..., D) -> logits (..., V) f32: final norm, LM head (tied or
        not), Gemma's final soft-capping."""
        h = self.norm(h)
        if self.lm_head is None:
            logits = self.embed_tokens.attend(h)
        else:
            logits = self.lm_head(h)
        logits = logits.astype(jnp.float32)
        if self.config.final_logit_softcapping is not None:
            cap = self.config.final_logit_softcapping
            logits = jnp.tanh(logits / cap) * cap
        return logits


def _mask_fn(q_slots, kv_valid, window):
    # `attention_mask` is shadowed by the argument of the same name inside CausalLM.__call__.
    return attention_mask(q_slots, kv_valid, window)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """(B, T) bool -> (B, T) int32 rotary positions, cumsum(mask) - 1 clipped at 0 (left padding safe)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


# ---------------------------------------------------------------------------------------------
# LoRA merge
# ---------------------------------------------------------------------------------------------

def merge_lora(params: nnx.State, lora: LoraConfig) -> nnx.State:
    """Fold W + (alpha / r) * A @ B into every base kernel that has LoRA factors; the returned
    state has the merged kernels and zeroed `lora_b` (same tree, same forward, export-ready).

    params: `nnx.state(model)` (or the full state from `nnx.split`).
    """
    flat = dict(nnx.to_flat_state(params))
    scale = lora.alpha / lora.rank
    out = {}
    for path, var in flat.items():
        out[path] = var
    for path, var in flat.items():
        if path[-1] != "lora_a":
            continue
        base = path[:-1]
        a, b = flat[path][...], flat[base + ("lora_b",)][...]
        kvar = flat[base + ("kernel",)]
        kern = kvar[...]
        stacked = path[0] == "layers"
        if stacked:
            L, r = a.shape[0], a.shape[-1]
            delta = jnp.einsum("lir,lro->lio", a.reshape(L, -1, r).astype(jnp.float32),
                               b.reshape(L, r, -1).astype(jnp.float32))
        else:
            r = a.shape[-1]
            delta = a.reshape(-1, r).astype(jnp.float32) @ b.reshape(r, -1).astype(jnp.float32)
        new_k = (kern.astype(jnp.float32) + scale * delta.reshape(kern.shape)).astype(kern.dtype)
        out[base + ("kernel",)] = kvar.replace(new_k)
        out[base + ("lora_b",)] = flat[base + ("lora_b",)].replace(jnp.zeros_like(b))
    return nnx.from_flat_state(out)


