"""Shared building blocks for every model family.

Conventions (see docs/design.md):
- Modules are built as `Module(..., *, rngs)`; `param_dtype` (storage, f32 by default) and
  `dtype` (compute; bf16 on TPU/GPU, f32 in parity tests) are separate.
- Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, `vocab`, `q_len`,
  `layers`, ...) in its `out_sharding` metadata; `esrt_jax.sharding` maps them to mesh
  axes. Variables are created without eager sharding so that modules build without a mesh.
- Dense kernels are stored (in_features, out_features), i.e. the transpose of torch's Linear.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Dtype = Any
Axes = tuple[str | None, ...]
Initializer = Callable[..., jax.Array]

default_kernel_init = nnx.initializers.normal(0.02)


def param(rngs: nnx.Rngs | None, init: Initializer, shape: Sequence[int], axes: Axes,
          dtype: Dtype = jnp.float32) -> nnx.Param:
    """A parameter with logical axis names `axes` (one per dim of `shape`)."""
    assert len(axes) == len(shape), (shape, axes)
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(init(key, tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False)


class Dense(nnx.Module):
    """y = x @ W + b with W (in, out) named by `axes`. x (..., in) -> (..., out)."""

    def __init__(self, in_features: int, out_features: int, *, axes: Axes = ("embed", "mlp"),
                 use_bias: bool = True, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 kernel_init: Initializer = default_kernel_init, rngs: nnx.Rngs):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.kernel = param(rngs, kernel_init, (in_features, out_features), axes, param_dtype)
        self.bias = (param(rngs, nnx.initializers.zeros, (out_features,), axes[-1:], param_dtype)
                     if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, statistics in f32. x (..., D) -> (..., D)."""

    def __init__(self, dim: int, *, eps: float = 1e-5, axes: Axes = ("embed",),
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.eps, self.dtype = eps, dtype
        self.scale = param(rngs, nnx.initializers.ones, (dim,), axes, param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (dim,), axes, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class Embed(nnx.Module):
    """Token embedding table (vocab, embed). ids (...) -> (..., D); `attend` gives tied logits."""

    def __init__(self, num_embeddings: int, features: int, *, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, init: Initializer = default_kernel_init,
                 rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = param(rngs, init, (num_embeddings, features), ("vocab", "embed"), param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """(..., D) -> (..., vocab) with the transposed table (tied output head)."""
        return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """HF activation names -> jax functions (exact GELU unless the name says tanh)."""
    table = {
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
        "relu": jax.nn.relu,
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
    }
    if name not in table:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(table)}")
    return table[name]


def dtype_from_name(name: str | Any) -> Any:
    """'float32' / 'bfloat16' / 'float16' (or a dtype) -> jnp dtype."""
    if not isinstance(name, str):
        return name
    table = {"float32": jnp.float32, "f32": jnp.float32, "bfloat16": jnp.bfloat16,
             "bf16": jnp.bfloat16, "float16": jnp.float16, "f16": jnp.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(table)}")
    return table[name]


# ---------------------------------------------------------------------------------------------
# Decoder-LLM building blocks (Llama / Qwen2 / Qwen3 / Gemma-3). Pure-array helpers first, then
# small NNX modules. Attention math lives in `attention_weights`/`attend` so that the same code
# serves full-sequence training and KV-cache decoding.
# ---------------------------------------------------------------------------------------------

class LoraParam(nnx.Param):
    """A LoRA factor. Subclass of `nnx.Param` so generic code (checkpoints, sharding) sees it,
    yet filterable on its own: `nnx.split(model, LoraParam, nnx.Param)` or
    `nnx.Optimizer(model, tx, wrt=LoraParam)` to train LoRA only."""


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, statistics in f32. x (..., D) -> (..., D).

    `plus_one=False` (Llama/Qwen): `w * norm(x)` with the product taken in the compute dtype, as
    HF does. `plus_one=True` (Gemma): `norm(x) * (1 + w)` in f32, weight initialised to zero.
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, plus_one: bool = False,
                 axes: Axes = ("embed",), dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None = None):
        self.eps, self.plus_one, self.dtype = eps, plus_one, dtype
        init = nnx.initializers.zeros if plus_one else nnx.initializers.ones
        self.scale = param(rngs, init, (dim,), axes, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.eps)
        if self.plus_one:
            return (y * (1.0 + self.scale[...].astype(jnp.float32))).astype(self.dtype)
        return self.scale[...].astype(self.dtype) * y.astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding settings of one layer kind (hashable, static under jit).

    rope_type: 'default' | 'linear' | 'llama3' | 'dynamic' | 'yarn' (HF names); `factor`,
    `low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings`, `beta_fast`,
    `beta_slow`, `truncate` as in HF's `rope_parameters`; `attention_factor` scales cos/sin
    (yarn); `max_position_embeddings` is used by 'dynamic' (NTK) scaling.
    """
    head_dim: int
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    max_position_embeddings: int = 2048
    attention_factor: float = 1.0   # yarn: cos/sin multiplier
    beta_fast: float = 32.0         # yarn
    beta_slow: float = 1.0          # yarn
    truncate: bool = True           # yarn

    SUPPORTED = ("default", "linear", "llama3", "dynamic", "yarn")

    def __post_init__(self):
        if self.rope_type not in self.SUPPORTED:
            raise ValueError(f"unsupported rope_type {self.rope_type!r}; supported: {list(self.SUPPORTED)}")

    def inv_freq(self) -> np.ndarray:
        """(head_dim/2,) f32 inverse frequencies, computed as HF does (f32 powers)."""
        dim = self.head_dim
        exps = (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim))
        inv = (np.float32(1.0) / (np.float32(self.theta) ** exps)).astype(np.float32)
        if self.rope_type == "linear":
            inv = inv / np.float32(self.factor)
        elif self.rope_type == "llama3":
            old = float(self.original_max_position_embeddings or self.max_position_embeddings)
            low_wl, high_wl = old / self.low_freq_factor, old / self.high_freq_factor
            wl = 2 * math.pi / inv
            scaled = np.where(wl > low_wl, inv / self.factor, inv)
            smooth = (old / wl - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = ~(wl < high_wl) & ~(wl > low_wl)
            inv = np.where(medium, smoothed, scaled).astype(np.float32)
        elif self.rope_type == "yarn":
            old = float(self.original_max_position_embeddings or self.max_position_embeddings)
            base = float(self.theta)

            def corr_dim(rot):
                return (dim * math.log(old / (rot * 2 * math.pi))) / (2 * math.log(base))

            low, high = corr_dim(self.beta_fast), corr_dim(self.beta_slow)
            if self.truncate:
                low, high = math.floor(low), math.ceil(high)
            low, high = max(low, 0), min(high, dim - 1)
            if low == high:
                high += 0.001
            ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
            extra = (1 - ramp).astype(np.float32)
            pos_freqs = np.float32(base) ** exps
            inv = ((1.0 / (self.factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra)
            inv = inv.astype(np.float32)
        return inv


def rope_cos_sin(positions: jax.Array, spec: RopeSpec) -> tuple[jax.Array, jax.Array]:
    """positions (B, T) int -> cos, sin (B, T, head_dim) f32 in HF's half-split layout."""
    if spec.rope_type == "dynamic":
        # NTK-aware base growth once the sequence exceeds max_position_embeddings (HF's
        # dynamic_rope_update uses max(position)+1 of the current call).
        dim = spec.head_dim
        seq = jnp.maximum(jnp.max(positions) + 1, spec.max_position_embeddings).astype(jnp.float32)
        base = spec.theta * ((spec.factor * seq / spec.max_position_embeddings)
                             - (spec.factor - 1)) ** (dim / (dim - 2))
        exps = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
        inv = 1.0 / (base ** exps)
    else:
        inv = jnp.asarray(spec.inv_freq())
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    if spec.attention_factor != 1.0:
        return jnp.cos(emb) * spec.attention_factor, jnp.sin(emb) * spec.attention_factor
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (B, T, N, Dh), cos/sin (B, T, Dh) -> rotated x (rotate-half convention, x's dtype)."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rot * sin


def attention_mask(q_slots: jax.Array, kv_valid: jax.Array, window: int | None = None) -> jax.Array:
    """Boolean attention mask (B, T, S): key slot valid, causal (slot <= own slot) and, with a
    sliding `window`, within `window` slots (own - key < window, HF's convention).

    q_slots (B, T) or (T,) int: the cache slot of each query; kv_valid (B, S) bool.
    """
    if q_slots.ndim == 1:
        q_slots = q_slots[None]
    s = jnp.arange(kv_valid.shape[1], dtype=jnp.int32)
    q = q_slots[:, :, None]
    m = (s[None, None, :] <= q) & kv_valid[:, None, :]
    if window is not None:
        m = m & (q - s[None, None, :] < window)
    return m


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float,
           softcap: float | None = None) -> jax.Array:
    """Grouped-query attention without repeating K/V.

    q (B, T, H, Dh), k/v (B, S, KV, Dh), mask (B, T, S) bool -> (B, T, H, Dh) in q's dtype.
    Scores and softmax in f32; masked scores use the dtype minimum (rows with no valid key,
    i.e. padding queries, become uniform instead of NaN).
    """
    b, t, h, dh = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, t, kvh, h // kvh, dh)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(q.dtype),
                   preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        s = jnp.tanh(s / softcap) * softcap
    s = jnp.where(mask[:, None, None, :, :], s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(q.dtype), preferred_element_type=jnp.float32)
    return o.reshape(b, t, h, dh).astype(q.dtype)


class Linear(nnx.Module):
    """Linear map over multi-axis features, with optional LoRA.

    kernel (*in_shape, *out_shape) named `in_axes + out_axes` (the transpose of torch's Linear,
    heads split out: q_proj is (D, H, Dh)); bias (*out_shape). x (..., *in_shape) -> (..., *out_shape).
    With `lora_rank > 0`: `lora_a` (*in_shape, r) and `lora_b` (r, *out_shape), both `LoraParam`,
    B initialised to zero, y += (alpha / r) * dropout(x) @ A @ B. Dropout only when a
    `dropout_rng` is passed (training); inference passes none.
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], *, in_axes: Axes,
                 out_axes: Axes, use_bias: bool = False, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, kernel_init: Initializer = default_kernel_init,
                 lora_rank: int = 0, lora_alpha: float = 32.0, lora_dropout: float = 0.0,
                 rngs: nnx.Rngs | None = None):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.dtype = dtype
        self.kernel = param(rngs, kernel_init, self.in_shape + self.out_shape,
                            tuple(in_axes) + tuple(out_axes), param_dtype)
        self.bias = (param(rngs, nnx.initializers.zeros, self.out_shape, tuple(out_axes), param_dtype)
                     if use_bias else None)
        self.lora_rank = lora_rank
        self.lora_scale = (lora_alpha / lora_rank) if lora_rank else 0.0
        self.lora_dropout = lora_dropout
        if lora_rank:
            n_in = int(np.prod(self.in_shape))
            bound = 1.0 / math.sqrt(n_in)  # PEFT's kaiming_uniform(a=sqrt(5)) bound
            a_init = nnx.initializers.uniform(2 * bound)
            key = rngs.params() if rngs is not None else jax.random.key(0)
            a = a_init(key, self.in_shape + (lora_rank,), param_dtype) - jnp.asarray(bound, param_dtype)
            self.lora_a = LoraParam(a, out_sharding=tuple(in_axes) + (None,), eager_sharding=False)
            self.lora_b = LoraParam(jnp.zeros((lora_rank,) + self.out_shape, param_dtype),
                                    out_sharding=(None,) + tuple(out_axes), eager_sharding=False)
        else:
            self.lora_a = self.lora_b = None

    def __call__(self, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        n_in = len(self.in_shape)
        lead = x.shape[:x.ndim - n_in]
        x2 = x.reshape(*lead, -1).astype(self.dtype)
        k2 = self.kernel[...].reshape(x2.shape[-1], -1).astype(self.dtype)
        y = jnp.dot(x2, k2)
        if self.lora_a is not None:
            xl = x2
            if dropout_rng is not None and self.lora_dropout > 0:
                keep = jax.random.bernoulli(dropout_rng, 1.0 - self.lora_dropout, xl.shape)
                xl = jnp.where(keep, xl / (1.0 - self.lora_dropout), 0).astype(self.dtype)
            a = self.lora_a[...].reshape(x2.shape[-1], self.lora_rank).astype(self.dtype)
            b = self.lora_b[...].reshape(self.lora_rank, -1).astype(self.dtype)
            y = y + jnp.dot(jnp.dot(xl, a), b) * jnp.asarray(self.lora_scale, self.dtype)
        y = y.reshape(*lead, *self.out_shape)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)); x (..., D) -> (..., D). Projections named gate_proj/up_proj/down_proj."""

    def __init__(self, dim: int, hidden: int, *, act: str = "silu", use_bias: bool = False,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 lora: dict[str, dict] | None = None, rngs: nnx.Rngs | None = None):
        lora = lora or {}
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear((dim,), (hidden,), in_axes=("embed",), out_axes=("mlp",),
                                **kw, **lora.get("gate_proj", {}))
        self.up_proj = Linear((dim,), (hidden,), in_axes=("embed",), out_axes=("mlp",),
                              **kw, **lora.get("up_proj", {}))
        self.down_proj = Linear((hidden,), (dim,), in_axes=("mlp",), out_axes=("embed",),
                                **kw, **lora.get("down_proj", {}))
        activation(act)  # validate the name now; the function is looked up per call (hashable graphdef)
        self.act_name = act

    def __call__(self, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        r = (lambda i: None) if dropout_rng is None else (lambda i: jax.random.fold_in(dropout_rng, i))
        return self.down_proj(activation(self.act_name)(self.gate_proj(x, r(0))) * self.up_proj(x, r(1)), r(2))
