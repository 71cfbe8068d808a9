"""Shared building blocks for every model family.

Conventions (see DESIGN.md):
- Modules are built as `Module(..., *, rngs)`; `param_dtype` (storage, f32 by default) and
  `dtype` (compute; bf16 on TPU/GPU, f32 in parity tests) are separate.
- Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, `vocab`, `q_len`,
  `layers`, ...) in its `out_sharding` metadata; `esrt_jax.train.sharding` maps them to mesh
  axes. Variables are created without eager sharding so that modules build without a mesh.
- Dense kernels are stored (in_features, out_features), i.e. the transpose of torch's Linear.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
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
