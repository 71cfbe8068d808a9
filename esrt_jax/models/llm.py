"""Decoder-only LLMs (Llama, Qwen2/2.5, Qwen3, Gemma-3 text) in Flax NNX: one implementation.

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
    tokens = greedy_generate(model, ids, mask, max_new_tokens, eos_token_id=..., pad_token_id=...)

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
path, layer index into the stacked axis or None, and the numpy transform), so converters can
stream tensor by tensor. `load_params_from_hf_dir` and `load_causal_lm` use them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from esrt_jax.config import ConfigError, check
from esrt_jax.convert import hf_io
from esrt_jax.models.layers import (Embed, GatedMLP, Linear, LoraParam, RMSNorm, RopeSpec,
                                    apply_rope, attend, attention_mask, rope_cos_sin)

LAYER_TYPES = ("full_attention", "sliding_attention")


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraConfig:
    """LoRA on the LLM projections. targets: any of q_proj k_proj v_proj o_proj gate_proj up_proj
    down_proj. scale = alpha / rank. Dropout acts on the LoRA input only, only with a dropout rng."""
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05

    TARGETS: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "o_proj",
                                          "gate_proj", "up_proj", "down_proj")

    def validate(self):
        check(self.rank > 0, "rank", f"must be > 0, got {self.rank}")
        check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.targets if t not in self.TARGETS]
        check(not bad, "targets", f"unknown LoRA target(s) {bad}; choose from {list(self.TARGETS)}")
        check(len(self.targets) > 0, "targets", "at least one target is needed")

    def __post_init__(self):
        self.validate()


@dataclass(frozen=True)
class LLMConfig:
    """Architecture of a decoder LLM, family-independent (hashable: static under jit).

    Families subclass it (`QwenConfig`, `Gemma3TextConfig`, `LlamaConfig`) and add
    `from_hf_config` / `to_hf_config` plus their HF tensor names.
    """
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    norm_plus_one: bool = False            # Gemma: norm(x) * (1 + w)
    rope_theta: float = 10000.0
    rope_type: str = "default"             # default | linear | llama3 | dynamic | yarn (global layers)
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int | None = None
    rope_attention_factor: float = 1.0     # yarn (from attention_factor or mscale)
    rope_beta_fast: float = 32.0           # yarn
    rope_beta_slow: float = 1.0            # yarn
    rope_truncate: bool = True             # yarn
    local_rope_theta: float | None = None  # Gemma-3 sliding layers (default rope, this base)
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False                  # Qwen3, Gemma-3: RMSNorm over head_dim on q and k
    sandwich_norm: bool = False            # Gemma: post-attn / pre-ffn / post-ffn norms
    embed_scale: bool = False              # Gemma: embeddings * sqrt(hidden_size)
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (else head_dim)
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()      # per layer: full_attention | sliding_attention
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    # Family registry hooks (class-level).
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full_attention",) * self.num_hidden_layers)
        self.validate()

    def validate(self):
        check(self.hidden_size > 0 and self.num_hidden_layers > 0, "hidden_size",
              "hidden_size and num_hidden_layers must be positive")
        check(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
              f"{self.num_key_value_heads} must divide num_attention_heads={self.num_attention_heads}")
        check(self.head_dim % 2 == 0, "head_dim", f"must be even for rotary embeddings, got {self.head_dim}")
        check(len(self.layer_types) == self.num_hidden_layers, "layer_types",
              f"has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        check(not bad, "layer_types", f"unsupported layer type(s) {bad}; supported: {list(LAYER_TYPES)}")
        check(self.sliding_window is not None or "sliding_attention" not in self.layer_types,
              "sliding_window", "sliding_attention layers need a sliding_window")
        check(self.rope_type in RopeSpec.SUPPORTED, "rope_type",
              f"unsupported rope type {self.rope_type!r}; supported: {list(RopeSpec.SUPPORTED)}")

    # -- derived --------------------------------------------------------------------------
    @property
    def is_sliding(self) -> tuple[bool, ...]:
        return tuple(t == "sliding_attention" for t in self.layer_types)

    @property
    def attn_scale(self) -> float:
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def rope_spec(self, local: bool = False) -> RopeSpec:
        if local and self.local_rope_theta is not None:
            return RopeSpec(head_dim=self.head_dim, theta=self.local_rope_theta)
        return RopeSpec(head_dim=self.head_dim, theta=self.rope_theta, rope_type=self.rope_type,
                        factor=self.rope_factor, low_freq_factor=self.rope_low_freq_factor,
                        high_freq_factor=self.rope_high_freq_factor,
                        original_max_position_embeddings=self.rope_original_max_position_embeddings,
                        max_position_embeddings=self.max_position_embeddings,
                        attention_factor=self.rope_attention_factor, beta_fast=self.rope_beta_fast,
                        beta_slow=self.rope_beta_slow, truncate=self.rope_truncate)

    def rope_parameters_hf(self) -> dict:
        """The global rope settings in HF's `rope_parameters` form."""
        d: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type in ("linear", "dynamic", "llama3", "yarn"):
            d["factor"] = self.rope_factor
        if self.rope_type == "yarn":
            d.update(original_max_position_embeddings=self.rope_original_max_position_embeddings,
                     attention_factor=self.rope_attention_factor, beta_fast=self.rope_beta_fast,
                     beta_slow=self.rope_beta_slow, truncate=self.rope_truncate)
        if self.rope_type == "llama3":
            d.update(low_freq_factor=self.rope_low_freq_factor, high_freq_factor=self.rope_high_freq_factor,
                     original_max_position_embeddings=self.rope_original_max_position_embeddings)
        return d

    # -- HF conversion: implemented per family ---------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: Any) -> "LLMConfig":
        raise NotImplementedError(f"{cls.__name__} is the family-independent base; use config_from_hf")

    def to_hf_config(self) -> dict:
        raise NotImplementedError(f"{type(self).__name__} has no HF form; use a family config")

    def _hf_common(self, model_type: str, architecture: str) -> dict:
        """The HF config keys every family shares; families add their own on top."""
        eos = self.eos_token_id
        return {
            "model_type": model_type, "architectures": [architecture],
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id, "pad_token_id": self.pad_token_id,
            "eos_token_id": list(eos) if len(eos) > 1 else (eos[0] if eos else None),
        }

    def hf_layer_names(self) -> list[tuple[str, tuple[str, ...], str]]:
        """(HF suffix under `layers.{i}.`, our path under `layers`, kind) for one layer."""
        names = [("input_layernorm.weight", ("input_layernorm", "scale"), "vector")]
        for p in ("q", "k", "v"):
            names.append((f"self_attn.{p}_proj.weight", ("self_attn", f"{p}_proj", "kernel"), f"{p}_in"))
            if self.qkv_bias:
                names.append((f"self_attn.{p}_proj.bias", ("self_attn", f"{p}_proj", "bias"), f"{p}_bias"))
        names.append(("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), "o_in"))
        if self.o_bias:
            names.append(("self_attn.o_proj.bias", ("self_attn", "o_proj", "bias"), "vector"))
        if self.qk_norm:
            names += [("self_attn.q_norm.weight", ("self_attn", "q_norm", "scale"), "vector"),
                      ("self_attn.k_norm.weight", ("self_attn", "k_norm", "scale"), "vector")]
        names.append(("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), "vector"))
        if self.sandwich_norm:
            names += [("pre_feedforward_layernorm.weight", ("pre_feedforward_layernorm", "scale"), "vector"),
                      ("post_feedforward_layernorm.weight", ("post_feedforward_layernorm", "scale"), "vector")]
        for p in ("gate", "up", "down"):
            names.append((f"mlp.{p}_proj.weight", ("mlp", f"{p}_proj", "kernel"), "linear"))
            if self.mlp_bias:
                names.append((f"mlp.{p}_proj.bias", ("mlp", f"{p}_proj", "bias"), "vector"))
        return names


def _hf_dict(hf: Any) -> dict:
    """A transformers config object or a plain config.json dict -> dict."""
    if isinstance(hf, Mapping):
        return dict(hf)
    if hasattr(hf, "to_dict"):
        return hf.to_dict()
    raise ConfigError(f"expected a Hugging Face config (object or dict), got {type(hf).__name__}")


def _families() -> dict[str, type[LLMConfig]]:
    # Imported lazily: the family modules import this one.
    from esrt_jax.models import gemma3, llama, qwen
    out: dict[str, type[LLMConfig]] = {}
    for cls in (qwen.QwenConfig, gemma3.Gemma3TextConfig, llama.LlamaConfig):
        for mt in cls.MODEL_TYPES:
            out[mt] = cls
    return out


def supported_model_types() -> list[str]:
    return sorted(_families())


def config_from_hf(hf: Any) -> LLMConfig:
    """HF config (transformers object or config.json dict) -> our frozen family config."""
    d = _hf_dict(hf)
    mt = d.get("model_type")
    fams = _families()
    if mt not in fams:
        raise ConfigError(f"model_type {mt!r} is not supported by esrt_jax.models.llm; "
                          f"supported model types: {', '.join(sorted(fams))}")
    return fams[mt].from_hf_config(d)


def rope_from_hf(d: Mapping, key: str | None = None, default_theta: float = 10000.0) -> dict:
    """Normalise HF rope settings (5.x `rope_parameters`, or 4.x `rope_theta` + `rope_scaling`)
    into our config fields. `key` picks a per-layer-type entry (Gemma-3)."""
    rp = d.get("rope_parameters")
    if rp and key is not None and key in rp:
        rp = rp[key]
    elif rp and key is not None and isinstance(next(iter(rp.values()), None), Mapping):
        rp = None
    if not rp:
        rp = dict(d.get("rope_scaling") or {})
        rp.setdefault("rope_theta", d.get("rope_theta", default_theta))
    rt = rp.get("rope_type", rp.get("type", "default")) or "default"
    if rt not in RopeSpec.SUPPORTED:
        raise ConfigError(f"rope type {rt!r} is not supported; supported: {list(RopeSpec.SUPPORTED)}")
    out = {"rope_theta": float(rp.get("rope_theta", default_theta)), "rope_type": rt}
    if "factor" in rp and rp["factor"] is not None:
        out["rope_factor"] = float(rp["factor"])
    if rt == "llama3":
        out["rope_low_freq_factor"] = float(rp["low_freq_factor"])
        out["rope_high_freq_factor"] = float(rp["high_freq_factor"])
        out["rope_original_max_position_embeddings"] = int(rp["original_max_position_embeddings"])
    if rt == "yarn":
        orig = int(rp["original_max_position_embeddings"])
        factor = rp.get("factor")
        if factor is None:
            factor = d.get("max_position_embeddings", orig) / orig
        factor = float(factor)

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        af = rp.get("attention_factor")
        if af is None:
            ms, msa = rp.get("mscale"), rp.get("mscale_all_dim")
            af = mscale(factor, ms) / mscale(factor, msa) if ms and msa else mscale(factor)
        out.update(rope_factor=factor, rope_original_max_position_embeddings=orig,
                   rope_attention_factor=float(af),
                   rope_beta_fast=float(rp.get("beta_fast") or 32.0),
                   rope_beta_slow=float(rp.get("beta_slow") or 1.0),
                   rope_truncate=bool(rp.get("truncate", True)))
    return out


def eos_tuple(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, (list, tuple)):
        return tuple(int(x) for x in v)
    return (int(v),)


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


def _stack_layers(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
    """Build `n` layers with independent init and stack their params on a leading `layers` axis."""
    keys = jax.random.split(rngs.params(), n)
    graphdef = None

    def init(key):
        nonlocal graphdef
        g, st = nnx.split(make(nnx.Rngs(key)))
        graphdef = g
        return st

    state = jax.vmap(init)(keys)

    def add_axis(v):
        if isinstance(v, nnx.Variable) and v.has_metadata("out_sharding"):
            axes = v.get_metadata("out_sharding")
            if axes is not None:
                v.set_metadata("out_sharding", ("layers",) + tuple(axes))
        return v

    state = jax.tree.map(add_axis, state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    return nnx.merge(graphdef, state)


class CausalLM(nnx.Module):
    """Decoder LLM with LM head. See the module docstring for the call contract and param tree."""

    def __init__(self, cfg: LLMConfig, *, lora: LoraConfig | None = None,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 scan_layers: bool = True, remat: bool = False, rngs: nnx.Rngs):
        self.cfg, self.lora = cfg, lora
        self.dtype, self.param_dtype = dtype, param_dtype
        self.scan_layers, self.remat = scan_layers, remat
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
        self.layers = _stack_layers(
            lambda r: DecoderLayer(cfg, lora=lora, dtype=dtype, param_dtype=param_dtype, rngs=r),
            cfg.num_hidden_layers, rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, plus_one=cfg.norm_plus_one,
                            dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        Linear((cfg.hidden_size,), (cfg.vocab_size,), in_axes=("embed",),
                               out_axes=("vocab",), dtype=dtype, param_dtype=param_dtype, rngs=rngs))

    # -- inputs ---------------------------------------------------------------------------
    def embed(self, ids: jax.Array) -> jax.Array:
        """ids (B, T) int -> (B, T, D) in compute dtype (Gemma: times sqrt(D), rounded to dtype as HF)."""
        x = self.embed_tokens(ids)
        if self.cfg.embed_scale:
            x = x * jnp.asarray(self.cfg.hidden_size ** 0.5, dtype=self.dtype)
        return x

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> dict:
        """Empty KV cache: k/v (L, B, S, KV, Dh), mask (B, S) bool, index () int32."""
        c = self.cfg
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
        cfg = self.cfg
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
        if self.cfg.final_logit_softcapping is not None:
            cap = self.cfg.final_logit_softcapping
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


# ---------------------------------------------------------------------------------------------
# HF <-> ours name mapping
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParamMap:
    """One HF tensor <-> one slice of our params.

    hf_name: e.g. 'model.layers.3.self_attn.q_proj.weight'; path: our nnx path, e.g.
    ('layers', 'self_attn', 'q_proj', 'kernel'); layer: index into the leading stacked `layers`
    axis (None for unstacked params); transform: numpy function HF tensor -> our slice
    (`hf_to_ours`) or our slice -> HF tensor (`ours_to_hf`); shape: the output shape of transform;
    hf_shape: the HF tensor's shape (torch layout).
    """
    hf_name: str
    path: tuple[str, ...]
    layer: int | None
    transform: Callable[[np.ndarray], np.ndarray]
    shape: tuple[int, ...]
    hf_shape: tuple[int, ...]


def _maps(cfg: LLMConfig, prefix: str, direction: str) -> list[ParamMap]:
    d, h, kv, dh, v, f = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                          cfg.head_dim, cfg.vocab_size, cfg.intermediate_size)
    heads = {"q": h, "k": kv, "v": kv}
    to_ours = direction == "hf_to_ours"

    def lin(in_dim, out_shape):
        # torch Linear weight (out, in) <-> ours (in, *out_shape)
        ours = (in_dim,) + tuple(out_shape)
        hf = (int(np.prod(out_shape)), in_dim)
        if to_ours:
            return (lambda w: np.ascontiguousarray(w.T).reshape(ours)), ours, hf
        return (lambda w: np.ascontiguousarray(w.reshape(in_dim, -1).T)), hf, hf

    def o_lin():
        ours, hf = (h, dh, d), (d, h * dh)
        if to_ours:
            return (lambda w: np.ascontiguousarray(w.T).reshape(ours)), ours, hf
        return (lambda w: np.ascontiguousarray(w.reshape(h * dh, d).T)), hf, hf

    def vec(shape_ours, shape_hf):
        shape_ours, shape_hf = tuple(shape_ours), tuple(shape_hf)
        if to_ours:
            return (lambda w: np.asarray(w).reshape(shape_ours)), shape_ours, shape_hf
        return (lambda w: np.asarray(w).reshape(shape_hf)), shape_hf, shape_hf

    out = [ParamMap(f"{prefix}embed_tokens.weight", ("embed_tokens", "embedding"), None,
                    *vec((v, d), (v, d))),
           ParamMap(f"{prefix}norm.weight", ("norm", "scale"), None, *vec((d,), (d,)))]
    for i in range(cfg.num_hidden_layers):
        for suffix, sub, kind in cfg.hf_layer_names():
            name = f"{prefix}layers.{i}.{suffix}"
            path = ("layers",) + sub
            if kind in ("q_in", "k_in", "v_in"):
                t = lin(d, (heads[kind[0]], dh))
            elif kind == "o_in":
                t = o_lin()
            elif kind in ("q_bias", "k_bias", "v_bias"):
                n = heads[kind[0]]
                t = vec((n, dh), (n * dh,))
            elif kind == "linear":
                t = lin(d, (f,)) if sub[1] != "down_proj" else lin(f, (d,))
            else:  # vector: norms, biases of o / mlp
                size = {"q_norm": dh, "k_norm": dh, "gate_proj": f, "up_proj": f}.get(sub[-2], d)
                t = vec((size,), (size,))
            out.append(ParamMap(name, path, i, *t))
    if not cfg.tie_word_embeddings:
        out.append(ParamMap("lm_head.weight", ("lm_head", "kernel"), None, *lin(d, (v,))))
    return out


HF_PREFIXES = ("model.", "model.language_model.", "language_model.model.")


def hf_to_ours(cfg: LLMConfig, prefix: str = "model.") -> list[ParamMap]:
    """HF tensor name -> (our path, stacked layer index, numpy transform to our layout).

    `prefix` is where the text model lives in the checkpoint: 'model.' for *ForCausalLM,
    'model.language_model.' / 'language_model.model.' for Gemma-3 multimodal checkpoints.
    """
    return _maps(cfg, prefix, "hf_to_ours")


def ours_to_hf(cfg: LLMConfig, prefix: str = "model.") -> list[ParamMap]:
    """Our (path, layer) -> HF tensor name with the numpy transform back to torch layout."""
    return _maps(cfg, prefix, "ours_to_hf")


def detect_hf_prefix(names: Sequence[str] | Mapping[str, Any]) -> str:
    """Which of HF_PREFIXES holds `embed_tokens.weight` in this checkpoint."""
    for p in HF_PREFIXES:
        if f"{p}embed_tokens.weight" in names:
            return p
    raise hf_io.CheckpointError(
        f"no embedding tensor found (looked for {[p + 'embed_tokens.weight' for p in HF_PREFIXES]}); "
        f"is this a decoder LLM checkpoint?")


def flatten_params(params: Any) -> dict[tuple[str, ...], Any]:
    """nnx.State, nested dict of arrays, or {path tuple: array} -> {path tuple: Variable or array}."""
    if isinstance(params, nnx.State):
        return {tuple(map(str, k)): v for k, v in nnx.to_flat_state(params)}
    if isinstance(params, Mapping) and params and all(isinstance(k, tuple) for k in params):
        return dict(params)
    return {tuple(map(str, k)): v for k, v in traverse_util.flatten_dict(params).items()}


def params_to_hf(params: nnx.State | Mapping, cfg: LLMConfig, prefix: str = "model."
                 ) -> Iterator[tuple[str, np.ndarray]]:
    """Stream our params as (HF name, numpy tensor in torch layout). LoRA factors are not part of
    the base model: merge them first (`merge_lora`) or export them as an adapter."""
    flat = flatten_params(params)
    for m in ours_to_hf(cfg, prefix):
        var = flat[m.path]
        arr = var[...] if isinstance(var, nnx.Variable) else var
        arr = np.asarray(jax.device_get(arr if m.layer is None else arr[m.layer]))
        yield m.hf_name, m.transform(arr)


def _abstract_model(cfg: LLMConfig, lora: LoraConfig | None, dtype, param_dtype, scan_layers, remat):
    return nnx.eval_shape(lambda: CausalLM(cfg, lora=lora, dtype=dtype, param_dtype=param_dtype,
                                           scan_layers=scan_layers, remat=remat, rngs=nnx.Rngs(0)))


def load_params_from_hf_dir(model_dir: str, cfg: LLMConfig, *, param_dtype: Any = jnp.float32,
                            place: Callable[[tuple[str, ...], np.ndarray], jax.Array] | None = None
                            ) -> dict[tuple[str, ...], jax.Array]:
    """Read a local HF directory into {our path: array} (base params only, no LoRA).

    Streams tensor by tensor (one shard open at a time); stacked layer params are filled slice by
    slice into one host buffer per path, so host memory peaks at about one copy of the model.
    `place(path, host_array)` (default `jnp.asarray`) puts each finished array on device(s).
    Errors name the directory and the missing / mis-shaped tensors.
    """
    files = hf_io.weight_files(model_dir)
    prefix = detect_hf_prefix(files)
    maps = hf_to_ours(cfg, prefix)
    missing = [m.hf_name for m in maps if m.hf_name not in files]
    if missing:
        raise hf_io.CheckpointError(
            f"{model_dir}: missing tensor(s) for {cfg.model_type} with {cfg.num_hidden_layers} layers: "
            f"{missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)} missing)")
    np_dtype = np.dtype(jnp.dtype(param_dtype))
    by_name = {m.hf_name: m for m in maps}
    L = cfg.num_hidden_layers
    buffers: dict[tuple[str, ...], np.ndarray] = {}
    filled: dict[tuple[str, ...], int] = {}
    out: dict[tuple[str, ...], jax.Array] = {}
    place = place or (lambda path, a: jnp.asarray(a))
    for name, arr in hf_io.iter_tensors(model_dir, list(by_name)):
        m = by_name[name]
        if tuple(arr.shape) != m.hf_shape:
            raise hf_io.CheckpointError(
                f"{model_dir}: tensor {name} has shape {tuple(arr.shape)}, expected {m.hf_shape} "
                f"for {'/'.join(m.path)} of this config (check config.json)")
        x = m.transform(np.asarray(arr))
        x = x.astype(np_dtype)
        if m.layer is None:
            out[m.path] = place(m.path, x)
            continue
        buf = buffers.get(m.path)
        if buf is None:
            buf = buffers[m.path] = np.empty((L,) + m.shape, np_dtype)
            filled[m.path] = 0
        buf[m.layer] = x
        filled[m.path] += 1
        if filled[m.path] == L:
            out[m.path] = place(m.path, buffers.pop(m.path))
    return out


def load_causal_lm(model_dir: str, cfg: LLMConfig | None = None, *, lora: LoraConfig | None = None,
                   dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, scan_layers: bool = True,
                   remat: bool = False, rngs: nnx.Rngs | None = None) -> CausalLM:
    """Build a `CausalLM` from a local HF directory (config.json + safetensors) without a random
    init of the base weights. LoRA factors (if any) get their fresh init (B = 0)."""
    if cfg is None:
        cfg = config_from_hf(hf_io.read_config(model_dir))
    loaded = load_params_from_hf_dir(model_dir, cfg, param_dtype=param_dtype)
    abstract = _abstract_model(cfg, lora, dtype, param_dtype, scan_layers, remat)
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    lora_init = None
    if lora is not None:
        # LoRA factors are not in HF checkpoints: take them from a real init. Under jit only the
        # LoRA outputs are live, so XLA drops the (large) base-weight init.
        seed_rngs = rngs or nnx.Rngs(0)

        @jax.jit
        def init_lora(key):
            m = CausalLM(cfg, lora=lora, dtype=dtype, param_dtype=param_dtype,
                         scan_layers=scan_layers, remat=remat, rngs=nnx.Rngs(key))
            return nnx.state(m, LoraParam)

        lora_init = dict(nnx.to_flat_state(init_lora(seed_rngs.params())))
    new = {}
    for path, var in flat.items():
        if path in loaded:
            new[path] = var.replace(loaded[path])
        elif lora_init is not None and path in lora_init:
            new[path] = var.replace(lora_init[path][...])
        else:
            raise hf_io.CheckpointError(f"{model_dir}: no tensor maps to parameter {'/'.join(path)}")
    return nnx.merge(graphdef, nnx.from_flat_state(new))


def greedy_generate(model: CausalLM, input_ids: jax.Array | None, attention_mask: jax.Array,
                    max_new_tokens: int, *, inputs_embeds: jax.Array | None = None,
                    eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0) -> jax.Array:
    """Greedy decoding with the KV cache: one prefill, then one fused step per token inside a
    `lax.while_loop` (stops early when every row emitted EOS; finished rows get `pad_token_id`).

    input_ids (B, T) int32 LEFT-padded (or inputs_embeds (B, T, D)), attention_mask (B, T) bool
    -> (B, max_new_tokens) int32 new tokens.
    """
    from esrt_jax.infer import generate as gen  # the one decoding implementation

    if inputs_embeds is None:
        inputs_embeds = model.embed(jnp.asarray(input_ids, jnp.int32))
    cfg = gen.GenerateConfig(max_new_tokens=int(max_new_tokens), no_repeat_ngram_size=0,
                             eos_ids=eos_tuple(eos_token_id), pad_id=int(pad_token_id))
    graphdef, state = nnx.split(model)
    return gen.generate(graphdef, state, inputs_embeds, jnp.asarray(attention_mask, bool), cfg)
