"""CTC over the adapter's time-ordered outputs: the LLM-free alignment loss (`--stage=align`).

The adapter (a Q-Former with `window_queries`) turns a clip into Q speech vectors in time order;
a CTC head reads them and is trained to emit the transcript's units (characters, or the LLM's
tokens) with blanks between them. No LLM layer runs: an alignment step costs the adapter only.

Head kinds (`CTCHeadConfig.kind`):
- "linear": Dense(in_dim -> units + 1); any unit set (characters, corpus tokens).
- "tied": logits = scale * <x, E[u]> for the LLM's input-embedding rows E of the units (frozen,
  passed in), plus a learned blank vector: the outputs are pulled onto the LLM's own embedding
  space (LegoSLM's CTC over the LLM vocabulary, arXiv 2505.11352).
`upsample` u > 1 lets each speech vector emit u CTC frames, for more units than Q per clip
(characters): "linear" reads u frames' logits straight off the vector (Dense(in_dim -> u * (units
+ 1))); "tied" gives sub-frame j the vector x + W_j x (W zero-initialised). An earlier hidden
expansion (Dense(in_dim -> u * in_dim) + GELU before the output layer: two small-init layers in
series) kept the adapter on the all-blank plateau (docs/experiments/2026-12-07-align.md).

Unit 0 is the blank in every unit set.

`soft_units` turns the head's logits into LLM input embeddings (the speech LLM's
`interface: ctc_chars`): each frame the best path keeps becomes its posterior-weighted sum of the
LLM's embeddings of the units (LegoSLM); the others become zero rows, which the LLM masks.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from esrt_jax.config import check, setting
from esrt_jax.models.layers import Dense, param

BLANK = 0


@dataclasses.dataclass(frozen=True)
class CTCHeadConfig:
    """CTC head over (B, N, in_dim) speech vectors -> (B, N * upsample, units + 1) logits."""
    in_dim: int = setting(help="width of the speech vectors the head reads")
    units: int = setting(help="label units, the blank excluded")
    kind: Literal["linear", "tied"] = setting("linear", help="linear: a learned projection; tied: scaled dot "
                                                             "products with the LLM's embeddings of the units")
    upsample: int = setting(1, help="CTC frames per speech vector")

    def __post_init__(self):
        check(self.in_dim >= 1, "in_dim", f"must be >= 1, got {self.in_dim}")
        check(self.units >= 1, "units", f"must be >= 1, got {self.units}")
        check(self.kind in ("linear", "tied"), "kind", f"must be 'linear' or 'tied', got {self.kind!r}")
        check(self.upsample >= 1, "upsample", f"must be >= 1, got {self.upsample}")


class CTCHead(nnx.Module):
    """x (B, N, in_dim) [, unit_embeds (units, in_dim) for "tied"] -> logits (B, N * u, units + 1)."""

    def __init__(self, cfg: CTCHeadConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        D, u = cfg.in_dim, cfg.upsample
        if cfg.kind == "linear":
            self.expand = None
            self.out = Dense(D, u * (cfg.units + 1), axes=("embed", "vocab"), rngs=rngs)
        else:
            self.expand = (Dense(D, u * D, axes=("embed", "mlp"), kernel_init=nnx.initializers.zeros,
                                 rngs=rngs) if u > 1 else None)
            self.out = None
            self.blank = param(rngs, nnx.initializers.zeros, (D,), ("embed",), jnp.float32)
            self.log_scale = param(rngs, nnx.initializers.zeros, (), (), jnp.float32)

    def __call__(self, x: jax.Array, unit_embeds: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        B, N, D = x.shape
        x = x.astype(jnp.float32)
        if self.out is not None:
            return self.out(x).astype(jnp.float32).reshape(B, N * cfg.upsample, cfg.units + 1)
        if self.expand is not None:
            x = (x[:, :, None, :] + self.expand(x).reshape(B, N, cfg.upsample, D)).reshape(B, N * cfg.upsample, D)
        if unit_embeds is None or unit_embeds.shape != (cfg.units, D):
            raise ValueError(f"a tied CTC head needs the units' embeddings ({cfg.units}, {D}); got "
                             f"{None if unit_embeds is None else tuple(unit_embeds.shape)}")
        table = jnp.concatenate([self.blank[...][None], unit_embeds.astype(jnp.float32)], 0)
        # cosine-style logits: both sides normalised, a learned temperature
        xn = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
        tn = table * jax.lax.rsqrt(jnp.mean(table * table, -1, keepdims=True) + 1e-6)
        return jnp.einsum("bnd,kd->bnk", xn, tn) / D * jnp.exp(self.log_scale[...]) * 10.0


def frame_paddings(num_frames: jax.Array, length: int) -> jax.Array:
    """(B,) valid CTC frames -> (B, length) float paddings (1.0 = padding), optax's convention."""
    return (jnp.arange(length)[None, :] >= num_frames[:, None]).astype(jnp.float32)


def ctc_loss(logits: jax.Array, logit_paddings: jax.Array, labels: jax.Array,
             label_paddings: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean CTC loss per label unit over the rows that can be aligned.

    logits (B, T, K), logit_paddings (B, T), labels (B, L) int, label_paddings (B, L) (1.0 =
    padding) -> (loss, aligned rows). A row whose labels (plus the blanks repeats need) do not fit
    its frames is dropped from the mean instead of giving an infinite loss."""
    per_row = optax.ctc_loss(logits, logit_paddings, labels, label_paddings, blank_id=BLANK)
    n_lab = jnp.sum(1.0 - label_paddings, -1)
    repeats = jnp.sum((labels[:, 1:] == labels[:, :-1]) * (1.0 - label_paddings[:, 1:]), -1)
    fits = (n_lab + repeats <= jnp.sum(1.0 - logit_paddings, -1)) & (n_lab > 0) & jnp.isfinite(per_row)
    w = fits.astype(jnp.float32)
    loss = jnp.sum(jnp.where(fits, per_row, 0.0)) / jnp.maximum(jnp.sum(w * n_lab), 1.0)
    return loss, jnp.sum(w)


def greedy_decode(logits: np.ndarray, num_frames: np.ndarray) -> list[list[int]]:
    """Best path: argmax per frame, repeats collapsed, blanks dropped. (B, T, K), (B,) -> unit ids."""
    best = np.asarray(logits).argmax(-1)
    out = []
    for row, n in zip(best, np.asarray(num_frames)):
        row = row[:int(n)]
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        out.append([int(u) for u in row[keep] if u != BLANK])
    return out


def soft_units(logits: jax.Array, unit_embeds: jax.Array) -> jax.Array:
    """CTC logits (B, T, K + 1), the LLM's embeddings of the K units (K, D) -> (B, T, D).

    The frames the best path keeps (argmax not the blank and not a repeat of the frame before,
    as `greedy_decode`) become sum_k p(k | frame, not blank) * E[k]; they are moved, in order, to
    the end of the row, and the dropped frames are zero rows in front of them (the speech LLM
    masks zero rows: `SpeechLLM.llm_inputs`), so the LLM reads the spelled transcript right before
    the prompt."""
    best = jnp.argmax(logits, -1)
    prev = jnp.concatenate([jnp.full_like(best[:, :1], -1), best[:, :-1]], 1)
    keep = (best != BLANK) & (best != prev)
    p = jax.nn.softmax(logits.astype(jnp.float32)[..., 1:], -1)  # renormalised over the units
    emb = jnp.einsum("btk,kd->btd", p, unit_embeds.astype(jnp.float32)) * keep[..., None]
    order = jnp.argsort(keep, axis=1, stable=True)  # dropped frames first, kept ones in time order
    return jnp.take_along_axis(emb, order[..., None], axis=1)
