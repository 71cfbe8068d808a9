"""BLIP-2 Q-Former speech adapter (LLM-SRT / ESRT) with its Hugging Face name mapping.

    encoder output (B, T_enc, d_enc) [+ mask (B, T_enc)]
      -> learned queries (1, Q, H) -> Q-Former (transformers' `Blip2QFormerModel` with
         `query_embeds`/`encoder_hidden_states`)                       -> (B, Q, H)   [edge split]
      -> pooled variant only: mean over windows of k queries          -> (B, Q/k, H)
      -> projector MLP (chosen by llm_dim, see `QFormerConfig`) -> LayerNorm(eps 1e-5)
                                                                       -> (B, Q', llm_dim)

Parameter names follow LLM-SRT's `EncoderProjectorQFormer` (`query`, `qformer`, `linear` or
`linear1`/`linear2`, `norm`) so that `esrt_jax.convert.llm_srt` is a plain renaming
(`projector_maps`); inside the Q-Former the mapping to transformers' names is `hf_to_ours` /
`ours_to_hf` below (`hf_names.ParamMap`s, as for Whisper and the LLMs).

Dropout (hidden and attention probabilities, as in transformers) runs only when called with
`deterministic=False` and an explicit `rngs` (an `nnx.Rngs` or a PRNG key); the default is eval.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from esrt_jax.config import CheckpointError, ConfigError, check, setting
from esrt_jax.models import hf_names
from esrt_jax.models.hf_names import ParamMap, layout_maps
from esrt_jax.models.layers import Dense, LayerNorm, activation, dtype_from_name, param

# Hidden widths of LLM-SRT's projector MLP (fixed in the reference code, chosen by llm_dim).
_MID_WIDTH_SMALL = 1536
_MID_WIDTH_LARGE = 2560


@dataclass(frozen=True)
class QFormerConfig:
    """Q-Former + projector sizes. Defaults: LLM-SRT (8 layers, 768 wide, Whisper large-v3 input).

    Projector (exactly as LLM-SRT): pool_k None and llm_dim <= 1536: Linear(H, llm_dim);
    <= 2560: Linear(H, 1536)-ReLU-Linear(1536, llm_dim); else Linear(H, 2560)-ReLU-Linear(2560,
    llm_dim). pool_k = k: mean-pool the Q outputs in windows of k, then Linear(H, 2560)-ReLU-
    Linear(2560, llm_dim) whatever llm_dim. Always followed by LayerNorm(llm_dim, projector_eps).

    attend_padding: True (LLM-SRT, and every published adapter): the cross-attention attends over
    all encoder frames, the 30 s padding included. False: only over each example's real frames
    (`enc_frames`, the count of encoder frames covering its audio; `audio.encoder_frames`), so
    callers may also pass only a prefix of the frames (e.g. the batch's longest real length
    rounded up to a bucket) and skip the keys/values of the padding. A different model: an
    adapter trained one way should be run the same way.

    window_queries (needs attend_padding False): query i cross-attends only to the i-th of Q equal
    windows of each clip's real frames, widened by `window_overlap` frames on each side, so the
    outputs follow time in order (what a CTC alignment loss needs; ESRT-12B's windows, SALMONN's
    window-level Q-Former). Same shapes and weights as the plain Q-Former: only the mask differs.

    window_means = s > 0 (needs attend_padding False): no Q-Former at all. Output i is
    GELU(Dense(the means of s equal parts of the i-th of Q equal windows of the clip's real frames,
    concatenated)), (B, Q, hidden_size), then the same projector: a fixed number of outputs that
    follow time, frame-synchronous, without attention (it learned the CTC alignment on real speech
    where the windowed Q-Former stayed on the blank plateau: docs/experiments/2026-12-07-align.md).
    """

    num_hidden_layers: int = setting(8, help="Q-Former layers")
    hidden_size: int = setting(768, help="Q-Former width")
    num_attention_heads: int = setting(12, help="attention heads")
    intermediate_size: int = setting(3072, help="FFN width")
    cross_attention_frequency: int = setting(2, help="a cross-attention every N layers")
    layer_norm_eps: float = setting(1e-12, help="LayerNorm epsilon")
    hidden_act: str = setting("gelu", help="FFN activation")
    hidden_dropout_prob: float = setting(0.1, help="dropout on hidden states")
    attention_probs_dropout_prob: float = setting(0.1, help="dropout on attention weights")
    initializer_range: float = setting(0.02, help="std of the random init")
    encoder_hidden_size: int = setting(1280, help="width of the encoder output (filled in from the encoder)")
    num_queries: int = setting(80, help="learned queries (speech embeddings before pooling)")
    pool_k: int | None = setting(None, help="mean-pool the query outputs in windows of k (null: no pooling)")
    attend_padding: bool = setting(True,
                                 help="cross-attend over all encoder frames, the 30 s padding included (LLM-SRT)")
    window_queries: bool = setting(False,
                                   help="query i cross-attends only to the i-th of Q equal windows of the real "
                                        "frames, so outputs follow time (CTC alignment; needs attend_padding false)")
    window_overlap: int = setting(2, help="window_queries: frames each window is widened by on each side")
    window_means: int = setting(0, help="> 0: no Q-Former; output i is an MLP over the means of this many equal "
                                        "parts of the i-th of Q windows of the real frames (needs attend_padding false)")
    llm_dim: int = setting(2048, help="LLM width the projector maps to (filled in from the LLM)")
    projector_eps: float = setting(1e-5, help="projector LayerNorm epsilon")
    dtype: str = setting("float32", help="compute dtype")
    param_dtype: str = setting("float32", help="parameter dtype")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                    "cross_attention_frequency", "encoder_hidden_size", "num_queries", "llm_dim"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        check(self.hidden_size % self.num_attention_heads == 0, "num_attention_heads",
              f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads")
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            check(0.0 <= getattr(self, key) < 1.0, key, f"must be in [0, 1), got {getattr(self, key)}")
        check(self.layer_norm_eps > 0 and self.projector_eps > 0, "layer_norm_eps",
              "layer-norm epsilons must be > 0")
        try:
            activation(self.hidden_act)
        except ValueError as e:
            raise ConfigError(f"hidden_act: {e}") from None
        check(self.window_overlap >= 0, "window_overlap", f"must be >= 0, got {self.window_overlap}")
        check(not (self.window_queries and self.attend_padding), "window_queries",
              "windows are cut from each clip's real frames: set attend_padding: false too")
        check(self.window_means >= 0, "window_means", f"must be >= 0, got {self.window_means}")
        check(not (self.window_means and self.attend_padding), "window_means",
              "windows are cut from each clip's real frames: set attend_padding: false too")
        if self.pool_k is not None:
            check(self.pool_k >= 1, "pool_k", f"must be >= 1 or null, got {self.pool_k}")
            check(self.num_queries % self.pool_k == 0, "pool_k",
                  f"num_queries {self.num_queries} is not divisible by the pooling window "
                  f"pool_k {self.pool_k} (odd pooling length); use e.g. num_queries "
                  f"{self.num_queries - self.num_queries % self.pool_k or self.pool_k} or another pool_k")
        for key in ("dtype", "param_dtype"):
            try:
                dtype_from_name(getattr(self, key))
            except ValueError as e:
                raise ConfigError(f"{key}: {e}") from None

    # --- derived sizes -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_output_tokens(self) -> int:
        """Q' = Q, or Q / k for the pooled variant."""
        return self.num_queries // (self.pool_k or 1)

    @property
    def projector_mid(self) -> int | None:
        """Hidden width of the projector MLP, or None for the single Linear."""
        if self.pool_k is not None:
            return _MID_WIDTH_LARGE
        if self.llm_dim <= _MID_WIDTH_SMALL:
            return None
        if self.llm_dim <= _MID_WIDTH_LARGE:
            return _MID_WIDTH_SMALL
        return _MID_WIDTH_LARGE

    def has_cross_attention(self, layer_idx: int) -> bool:
        return layer_idx % self.cross_attention_frequency == 0

    # --- transformers' Blip2QFormerConfig ------------------------------------------------
    _HF_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                "cross_attention_frequency", "layer_norm_eps", "hidden_act", "hidden_dropout_prob",
                "attention_probs_dropout_prob", "initializer_range", "encoder_hidden_size")

    @classmethod
    def from_hf_config(cls, hf: Any, **adapter: Any) -> "QFormerConfig":
        """From a `Blip2QFormerConfig` (or its dict); `adapter` sets num_queries, pool_k, llm_dim, dtypes.

        Transformers' defaults fill keys the dict lacks (12 layers, encoder_hidden_size 1408), as
        `Blip2QFormerConfig(**d)` would.
        """
        d = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
        hf_defaults = dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
                           intermediate_size=3072, cross_attention_frequency=2, layer_norm_eps=1e-12,
                           hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                           initializer_range=0.02, encoder_hidden_size=1408)
        kwargs = {k: d.get(k, hf_defaults[k]) for k in cls._HF_KEYS}
        unknown = sorted(set(adapter) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown adapter key(s) {unknown}")
        kwargs.update(adapter)
        return cls(**kwargs)

    def to_hf_config(self) -> dict:
        """A dict that `transformers.Blip2QFormerConfig(**d)` accepts (the Q-Former part only)."""
        d = {k: getattr(self, k) for k in self._HF_KEYS}
        d.update(model_type="blip_2_qformer", architectures=["Blip2QFormerModel"],
                 use_qformer_text_input=False)
        return d


# ----------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------

def _dropout_key(rngs: nnx.Rngs | jax.Array | None, deterministic: bool) -> nnx.Rngs | None:
    """Explicit dropout rng for training; None in eval."""
    if deterministic:
        return None
    if rngs is None:
        raise ValueError("Q-Former dropout in training mode (deterministic=False) needs an explicit "
                         "rng: pass rngs=nnx.Rngs(dropout=key) or a PRNG key")
    if isinstance(rngs, nnx.Rngs):
        return rngs
    return nnx.Rngs(dropout=rngs)


class QFormerAttention(nnx.Module):
    """BERT attention block, post-LN: LN(x + W_o attn(x, kv)). x (B, L, H), kv (B, S, D_kv) -> (B, L, H).

    Self-attention when `kv` is x (D_kv = H); cross-attention to the encoder output (D_kv = d_enc).
    """

    def __init__(self, cfg: QFormerConfig, *, cross: bool, rngs: nnx.Rngs):
        H, dt, pdt = cfg.hidden_size, dtype_from_name(cfg.dtype), dtype_from_name(cfg.param_dtype)
        kv_dim = cfg.encoder_hidden_size if cross else H
        kv_axis = "enc_embed" if cross else "embed"
        init = nnx.initializers.normal(cfg.initializer_range)
        kw = dict(dtype=dt, param_dtype=pdt, kernel_init=init, rngs=rngs)
        self.num_heads, self.head_dim, self.dtype = cfg.num_attention_heads, cfg.head_dim, dt
        self.query = Dense(H, H, axes=("embed", "heads"), **kw)
        self.key = Dense(kv_dim, H, axes=(kv_axis, "heads"), **kw)
        self.value = Dense(kv_dim, H, axes=(kv_axis, "heads"), **kw)
        self.out = Dense(H, H, axes=("heads", "embed"), **kw)
        self.norm = LayerNorm(H, eps=cfg.layer_norm_eps, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.attn_dropout = nnx.Dropout(cfg.attention_probs_dropout_prob)
        self.dropout = nnx.Dropout(cfg.hidden_dropout_prob)

    def __call__(self, x: jax.Array, kv: jax.Array, kv_mask: jax.Array | None = None, *,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        B, L, _ = x.shape
        S = kv.shape[1]
        q = self.query(x).reshape(B, L, self.num_heads, self.head_dim)
        k = self.key(kv).reshape(B, S, self.num_heads, self.head_dim)
        v = self.value(kv).reshape(B, S, self.num_heads, self.head_dim)
        scores = jnp.einsum("blhd,bshd->bhls", q, k).astype(jnp.float32) * self.head_dim ** -0.5
        if kv_mask is not None:
            # Like transformers' additive finfo.min mask: a fully masked row attends uniformly.
            # (B, S) masks every query alike; (B, L, S) per query (window_queries).
            m = kv_mask[:, None, None, :] if kv_mask.ndim == 2 else kv_mask[:, None, :, :]
            scores = jnp.where(m, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        train = rngs is not None
        probs = self.attn_dropout(probs, deterministic=not train, rngs=rngs)
        ctx = jnp.einsum("bhls,bshd->blhd", probs, v).reshape(B, L, self.num_heads * self.head_dim)
        h = self.dropout(self.out(ctx), deterministic=not train, rngs=rngs)
        return self.norm(h + x)


class QFormerLayer(nnx.Module):
    """Self-attention, cross-attention (when layer_idx % frequency == 0), query FFN; (B, Q, H) -> (B, Q, H)."""

    def __init__(self, cfg: QFormerConfig, layer_idx: int, *, rngs: nnx.Rngs):
        H, dt, pdt = cfg.hidden_size, dtype_from_name(cfg.dtype), dtype_from_name(cfg.param_dtype)
        init = nnx.initializers.normal(cfg.initializer_range)
        kw = dict(dtype=dt, param_dtype=pdt, kernel_init=init, rngs=rngs)
        self.attention = QFormerAttention(cfg, cross=False, rngs=rngs)
        self.crossattention = (QFormerAttention(cfg, cross=True, rngs=rngs)
                               if cfg.has_cross_attention(layer_idx) else None)
        # The query branch of the feed-forward (`intermediate_query` / `output_query` in HF).
        self.ffn_in = Dense(H, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
        self.ffn_out = Dense(cfg.intermediate_size, H, axes=("mlp", "embed"), **kw)
        self.ffn_norm = LayerNorm(H, eps=cfg.layer_norm_eps, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.hidden_dropout_prob)
        self.hidden_act = cfg.hidden_act

    def __call__(self, x: jax.Array, enc: jax.Array, enc_mask: jax.Array | None, *,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        x = self.attention(x, x, None, rngs=rngs)
        if self.crossattention is not None:
            x = self.crossattention(x, enc, enc_mask, rngs=rngs)
        h = self.ffn_out(activation(self.hidden_act)(self.ffn_in(x)))
        h = self.dropout(h, deterministic=rngs is None, rngs=rngs)
        return self.ffn_norm(h + x)


class QFormer(nnx.Module):
    """transformers' `Blip2QFormerModel` (query path): LN + dropout on the queries, then the layers.

    queries (B, Q, H), enc (B, T_enc, d_enc), enc_mask (B, T_enc) bool/int or None -> (B, Q, H);
    `cross_mask` (B, Q, T_enc), when given, replaces enc_mask in the cross-attention (windows).
    """

    def __init__(self, cfg: QFormerConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        dt, pdt = dtype_from_name(cfg.dtype), dtype_from_name(cfg.param_dtype)
        self.layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dt, param_dtype=pdt,
                                   rngs=rngs)
        self.dropout = nnx.Dropout(cfg.hidden_dropout_prob)
        self.layers = nnx.List([QFormerLayer(cfg, i, rngs=rngs) for i in range(cfg.num_hidden_layers)])

    def __call__(self, queries: jax.Array, enc: jax.Array, enc_mask: jax.Array | None = None, *,
                 cross_mask: jax.Array | None = None, deterministic: bool = True,
                 rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
        check_encoder_input(self.config, enc, enc_mask)
        r = _dropout_key(rngs, deterministic)
        dt = dtype_from_name(self.config.dtype)
        x = self.dropout(self.layernorm(queries), deterministic=r is None, rngs=r)
        enc = enc.astype(dt)
        mask = cross_mask if cross_mask is not None else enc_mask
        mask = None if mask is None else mask.astype(bool)
        for layer in self.layers:
            x = layer(x, enc, mask, rngs=r)
        return x


def frames_mask(cfg: QFormerConfig, enc: Any, enc_mask: Any = None, enc_frames: Any = None) -> Any:
    """The encoder mask the cross-attention uses: `enc_mask` as given when `cfg.attend_padding`
    (LLM-SRT: the padding is attended to; `enc_frames` is ignored); otherwise frames
    < enc_frames (B,), combined with `enc_mask` when both are given. (B, T_enc) bool or None."""
    if cfg.attend_padding:
        return enc_mask
    if enc_frames is None:
        if enc_mask is None:
            raise ValueError("this adapter has attend_padding: false (cross-attention over the real "
                             "encoder frames only) and needs each example's real frame count: pass "
                             "enc_frames (B,) (esrt_jax.audio.encoder_frames) or an encoder mask")
        return enc_mask
    T = enc.shape[1]
    real = jnp.arange(T)[None, :] < jnp.asarray(enc_frames).reshape(-1, 1)
    return real if enc_mask is None else real & jnp.asarray(enc_mask).astype(bool)


def window_mask(num_queries: int, frames_mask: Any, overlap: int) -> Any:
    """Per-query windows over the real frames: frames_mask (B, T) (a prefix of real frames per row)
    -> (B, Q, T) bool; query i covers frames [i F / Q - overlap, (i + 1) F / Q + overlap) of the
    row's F real frames (floor / ceil, so every query has at least one frame)."""
    F = jnp.sum(frames_mask, axis=-1, dtype=jnp.int32)[:, None, None]  # (B, 1, 1)
    i = jnp.arange(num_queries, dtype=jnp.int32)[None, :, None]
    t = jnp.arange(frames_mask.shape[-1], dtype=jnp.int32)[None, None, :]
    start = (i * F) // num_queries - overlap
    end = -((-(i + 1) * F) // num_queries) + overlap
    return (t >= start) & (t < end) & frames_mask[:, None, :].astype(bool)


def window_means(enc: Any, frames_mask: Any, num_windows: int, parts: int) -> Any:
    """(B, T, d) + real-frame prefix mask (B, T) -> (B, num_windows, parts * d): the means of
    num_windows x parts equal windows of each row's real frames, `parts` consecutive ones side by side."""
    w = window_mask(num_windows * parts, frames_mask, 0).astype(jnp.float32)  # (B, N s, T)
    m = jnp.einsum("bnt,btd->bnd", w, enc.astype(jnp.float32)) / jnp.sum(w, -1, keepdims=True)
    return m.reshape(enc.shape[0], num_windows, parts * enc.shape[-1]).astype(enc.dtype)


def check_encoder_input(cfg: QFormerConfig, enc: Any, enc_mask: Any = None) -> None:
    """Shape checks (always) and an all-padding check (when the mask is concrete, i.e. not traced)."""
    shape = tuple(enc.shape)
    if len(shape) != 3:
        raise ValueError(f"Q-Former expects the encoder output as (B, T_enc, d_enc); got shape {shape}")
    B, T, D = shape
    if D != cfg.encoder_hidden_size:
        raise ValueError(f"encoder output last dim mismatch: expected encoder_hidden_size="
                         f"{cfg.encoder_hidden_size}, got {D} (shape {shape}); set "
                         f"encoder_hidden_size to the speech encoder's width (d_model)")
    if T < 1:
        raise ValueError(f"encoder output too short: T_enc={T} frames (shape {shape}); the Q-Former's "
                         f"cross-attention needs at least 1 encoder frame")
    if enc_mask is None:
        return
    if tuple(enc_mask.shape) != (B, T):
        raise ValueError(f"encoder mask shape {tuple(enc_mask.shape)} does not match the encoder "
                         f"output (B, T_enc) = {(B, T)}")
    if not isinstance(enc_mask, jax.core.Tracer):
        valid = np.asarray(enc_mask).astype(bool).sum(-1)
        empty = np.flatnonzero(valid == 0)
        if empty.size:
            raise ValueError(f"encoder output too short: the encoder mask has no valid frame for "
                             f"batch row(s) {empty.tolist()}; the Q-Former needs at least 1 frame")


class SpeechAdapter(nnx.Module):
    """LLM-SRT's `EncoderProjectorQFormer` (pool_k None) / `EncoderProjectorQFormerPool` (pool_k = k).

    enc (B, T_enc, d_enc), enc_mask (B, T_enc) or None -> (B, Q', llm_dim).
    Split for edge/cloud: `qformer_features` (B, Q, H) then `project` (B, Q', llm_dim).
    """

    def __init__(self, cfg: QFormerConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        dt, pdt = dtype_from_name(cfg.dtype), dtype_from_name(cfg.param_dtype)
        H = cfg.hidden_size
        # torch.nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (bias left at zero).
        kw = dict(dtype=dt, param_dtype=pdt, kernel_init=nnx.initializers.variance_scaling(
            1 / 3, "fan_in", "uniform"), rngs=rngs)
        if cfg.window_means:
            self.query = self.qformer = None
            self.window_in = Dense(cfg.window_means * cfg.encoder_hidden_size, H, axes=("mlp", "embed"), **kw)
        else:
            self.query = param(rngs, nnx.initializers.normal(1.0), (1, cfg.num_queries, H),
                               (None, "q_len", "embed"), pdt)
            self.qformer = QFormer(cfg, rngs=rngs)
            self.window_in = None
        mid = cfg.projector_mid
        if mid is None:
            self.linear = Dense(H, cfg.llm_dim, axes=("embed", "mlp"), **kw)
            self.linear1 = self.linear2 = None
        else:
            self.linear = None
            self.linear1 = Dense(H, mid, axes=("embed", "mlp"), **kw)
            self.linear2 = Dense(mid, cfg.llm_dim, axes=("mlp", "embed"), **kw)
        self.norm = LayerNorm(cfg.llm_dim, eps=cfg.projector_eps, dtype=dt, param_dtype=pdt, rngs=rngs)

    def qformer_features(self, enc: jax.Array, enc_mask: jax.Array | None = None, *,
                         enc_frames: jax.Array | None = None, deterministic: bool = True,
                         rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
        """(B, T_enc, d_enc) [+ (B, T_enc) mask] -> Q-Former outputs (B, Q, H).

        enc_frames (B,) int: real encoder frames per example; used (as a key-padding mask over
        frames >= enc_frames) only when `config.attend_padding` is False, where it (or an
        explicit enc_mask) is required. `enc` may then be a prefix of the frames."""
        cfg = self.config
        enc_mask = frames_mask(cfg, enc, enc_mask, enc_frames)
        check_encoder_input(cfg, enc, enc_mask)
        if cfg.window_means:
            means = window_means(enc, enc_mask, cfg.num_queries, cfg.window_means)
            return jax.nn.gelu(self.window_in(means.astype(dtype_from_name(cfg.dtype))))
        cross = window_mask(cfg.num_queries, enc_mask, cfg.window_overlap) if cfg.window_queries else None
        q = jnp.broadcast_to(self.query[...], (enc.shape[0], *self.query.shape[1:]))
        return self.qformer(q.astype(dtype_from_name(cfg.dtype)), enc, enc_mask, cross_mask=cross,
                            deterministic=deterministic, rngs=rngs)

    def pool(self, x: jax.Array) -> jax.Array:
        """Pooled variant: mean over consecutive windows of k queries, (B, Q, H) -> (B, Q/k, H); else identity."""
        k = self.config.pool_k
        if k is None:
            return x
        B, Q, H = x.shape
        if Q % k:
            raise ValueError(f"odd pooling length: {Q} Q-Former outputs are not divisible by pool_k {k}")
        return x.reshape(B, Q // k, k, H).astype(jnp.float32).mean(2).astype(x.dtype)

    def head(self, x: jax.Array) -> jax.Array:
        """Projector MLP + LayerNorm on (pooled) Q-Former outputs: (B, N, H) -> (B, N, llm_dim)."""
        if self.linear is not None:
            y = self.linear(x)
        else:
            y = self.linear2(jax.nn.relu(self.linear1(x)))
        return self.norm(y)

    def project(self, qformer_out: jax.Array) -> jax.Array:
        """Q-Former outputs (B, Q, H) -> speech embeddings (B, Q', llm_dim)."""
        if qformer_out.ndim != 3 or qformer_out.shape[1:] != (self.config.num_queries,
                                                               self.config.hidden_size):
            raise ValueError(f"project expects Q-Former outputs (B, {self.config.num_queries}, "
                             f"{self.config.hidden_size}); got shape {tuple(qformer_out.shape)}")
        return self.head(self.pool(qformer_out))

    def __call__(self, enc: jax.Array, enc_mask: jax.Array | None = None, *,
                 enc_frames: jax.Array | None = None, deterministic: bool = True,
                 rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
        """(B, T_enc, d_enc) [+ (B, T_enc) mask] -> (B, Q', llm_dim); enc_frames: `qformer_features`."""
        return self.project(self.qformer_features(enc, enc_mask, enc_frames=enc_frames,
                                                  deterministic=deterministic, rngs=rngs))


# ----------------------------------------------------------------------------------------
# Flat parameter access (dotted names) and the HF Blip2QFormerModel mapping
# ----------------------------------------------------------------------------------------

def flat_params(module_or_params: Any) -> dict[str, np.ndarray]:
    """All parameters as {'qformer.layers.0.attention.query.kernel': array}.

    Accepts a module, the params `nnx.State` from `nnx.split`, or the same tree as nested dicts
    (e.g. restored by Orbax): `hf_names.flat_params` with dotted names.
    """
    return {".".join(path): np.asarray(v) for path, v in hf_names.flat_params(module_or_params).items()}


def load_flat_params(module: nnx.Module, flat: Mapping[str, np.ndarray], *, source: str = "checkpoint"
                     ) -> None:
    """Set every parameter of `module` from `flat` (our dotted names); exact key set and shapes required.

    Values are cast to each parameter's storage dtype.
    """
    state = nnx.state(module, nnx.Param)
    current = {".".join(str(p) for p in path): (path, v) for path, v in nnx.to_flat_state(state)}
    missing = sorted(set(current) - set(flat))
    if missing:
        raise CheckpointError(f"{source}: missing parameter(s) {missing[:10]}"
                              + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
    unexpected = sorted(set(flat) - set(current))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected parameter(s) {unexpected[:10]}")
    new = {}
    for name, (path, var) in current.items():
        arr = np.asarray(flat[name])
        if tuple(arr.shape) != tuple(var.shape):
            raise CheckpointError(f"{source}: {name} has shape {tuple(arr.shape)}, "
                                  f"expected {tuple(var.shape)}")
        new[path] = jnp.asarray(arr, dtype=var[...].dtype)
    nnx.update(module, nnx.from_flat_state(new))


# HF suffix -> (our suffix, layout kind in `hf_names.LAYOUTS`) inside one attention block.
_ATTN_NAMES = {
    "attention.query.weight": ("query.kernel", "dense"), "attention.query.bias": ("query.bias", "none"),
    "attention.key.weight": ("key.kernel", "dense"), "attention.key.bias": ("key.bias", "none"),
    "attention.value.weight": ("value.kernel", "dense"), "attention.value.bias": ("value.bias", "none"),
    "output.dense.weight": ("out.kernel", "dense"), "output.dense.bias": ("out.bias", "none"),
    "output.LayerNorm.weight": ("norm.scale", "none"), "output.LayerNorm.bias": ("norm.bias", "none"),
}
_FFN_NAMES = {
    "intermediate_query.dense.weight": ("ffn_in.kernel", "dense"),
    "intermediate_query.dense.bias": ("ffn_in.bias", "none"),
    "output_query.dense.weight": ("ffn_out.kernel", "dense"),
    "output_query.dense.bias": ("ffn_out.bias", "none"),
    "output_query.LayerNorm.weight": ("ffn_norm.scale", "none"),
    "output_query.LayerNorm.bias": ("ffn_norm.bias", "none"),
}

# Older transformers versions built (and saved) the Q-Former's text branch although the speech
# adapter only ever feeds query embeddings: the word/position embeddings and each layer's
# non-query feed-forward (`intermediate.*`, `output.*`) never touch the query path, so they are
# skipped on import (and not written on export).
_IGNORED_HF = re.compile(r"^(embeddings\..*|encoder\.layer\.\d+\.(intermediate|output)\..*)$")


def _abstract_shapes(module_fn: Any) -> dict[str, tuple[int, ...]]:
    """Our dotted param name -> shape, from the abstract module (no shape is written down twice)."""
    abstract = nnx.state(nnx.eval_shape(module_fn), nnx.Param)
    return {".".join(map(str, p)): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(abstract)}


def _maps(cfg: QFormerConfig, direction: str) -> list[ParamMap]:
    names = [("layernorm.weight", "layernorm.scale", "none"), ("layernorm.bias", "layernorm.bias", "none")]
    for i in range(cfg.num_hidden_layers):
        hf, ours = f"encoder.layer.{i}.", f"layers.{i}."
        blocks = ["attention"] + (["crossattention"] if cfg.has_cross_attention(i) else [])
        for blk in blocks:
            names += [(f"{hf}{blk}.{k}", f"{ours}{blk}.{o}", kind) for k, (o, kind) in _ATTN_NAMES.items()]
        names += [(hf + k, ours + o, kind) for k, (o, kind) in _FFN_NAMES.items()]
    shapes = _abstract_shapes(lambda: QFormer(cfg, rngs=nnx.Rngs(0)))
    return layout_maps([(hf, tuple(o.split(".")), None, kind, shapes[o]) for hf, o, kind in names],
                       direction)


def hf_to_ours(cfg: QFormerConfig) -> list[ParamMap]:
    """HF `Blip2QFormerModel` tensor name -> our path relative to `QFormer`, transform to our layout."""
    return _maps(cfg, "hf_to_ours")


def ours_to_hf(cfg: QFormerConfig) -> list[ParamMap]:
    """Our path relative to `QFormer` -> HF `Blip2QFormerModel` tensor name, transform to torch layout."""
    return _maps(cfg, "ours_to_hf")


# LLM-SRT's names of the adapter's own tensors (outside its Q-Former) -> (ours, layout kind).
_PROJECTOR_NAMES = {
    "query": ("query", "none"),
    "linear.weight": ("linear.kernel", "dense"), "linear.bias": ("linear.bias", "none"),
    "linear1.weight": ("linear1.kernel", "dense"), "linear1.bias": ("linear1.bias", "none"),
    "linear2.weight": ("linear2.kernel", "dense"), "linear2.bias": ("linear2.bias", "none"),
    "norm.weight": ("norm.scale", "none"), "norm.bias": ("norm.bias", "none"),
}


def projector_maps(cfg: QFormerConfig, direction: str) -> list[ParamMap]:
    """LLM-SRT `encoder_projector.` names (no prefix) of the `SpeechAdapter`'s query, projector
    and norm <-> our paths relative to `SpeechAdapter` (its Q-Former: `hf_to_ours`)."""
    lin = ["linear.weight", "linear.bias"] if cfg.projector_mid is None else [
        "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"]
    shapes = _abstract_shapes(lambda: SpeechAdapter(cfg, rngs=nnx.Rngs(0)))
    entries = []
    for name in ["query", *lin, "norm.weight", "norm.bias"]:
        ours, kind = _PROJECTOR_NAMES[name]
        entries.append((name, tuple(ours.split(".")), None, kind, shapes[ours]))
    return layout_maps(entries, direction)


def qformer_from_hf(cfg: QFormerConfig, tensors: Mapping[str, np.ndarray], *, prefix: str = "",
                    source: str = "HF Blip2QFormerModel") -> dict[str, np.ndarray]:
    """HF tensors (names under `prefix`) -> our flat Q-Former params (names relative to `QFormer`).

    Unknown names under `prefix` (other than the ignored text branch), missing names and shape
    mismatches are `CheckpointError`s naming the tensor.
    """
    mapping = {m.hf_name: m for m in hf_to_ours(cfg)}
    for name in tensors:
        rel = name[len(prefix):]
        if name.startswith(prefix) and rel not in mapping and not _IGNORED_HF.match(rel):
            raise CheckpointError(f"{source}: unexpected tensor {name} (not part of a Q-Former with "
                                  f"{cfg.num_hidden_layers} layers, cross-attention every "
                                  f"{cfg.cross_attention_frequency})")
    out: dict[str, np.ndarray] = {}
    seen = set()
    for m, x in hf_names.from_hf(list(mapping.values()), tensors.items(), prefix=prefix, where=source):
        out[".".join(m.path)] = x
        seen.add(m.hf_name)
    missing = [prefix + k for k in mapping if k not in seen]
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {missing[:10]}"
                              + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
    return out


def qformer_to_hf(cfg: QFormerConfig, flat: Mapping[str, np.ndarray], *, prefix: str = ""
                  ) -> dict[str, np.ndarray]:
    """Our flat Q-Former params (relative to `QFormer`) -> HF `Blip2QFormerModel` tensors under `prefix`."""
    return dict(hf_names.to_hf(ours_to_hf(cfg), hf_names.flat_params({tuple(k.split(".")): v for k, v in flat.items()}),
                               prefix=prefix, where="our Q-Former params"))


def sub_params(flat: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Entries of `flat` under `prefix.` with the prefix stripped."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in flat.items() if k.startswith(p)}
