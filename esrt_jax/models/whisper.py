"""Whisper encoder (Flax NNX) and its Hugging Face mapping, both directions.

    mel (B, n_mels, 2 * P) -> conv1 (k3, pad 1) + GELU -> conv2 (k3, stride 2, pad 1) + GELU
      -> + positions (P, D) -> L pre-LN blocks (self-attention, fc1/act/fc2) -> LayerNorm
      -> (B, P, D)                       P = max_source_positions (1500 for real Whisper)

Layer parameters are always stored stacked with a leading `layers` axis (L, ...), so one
parameter layout serves both execution paths: `jax.lax.scan` over layers (`scan_layers=True`,
one compiled block, fast compiles for 32-layer large-v3) or a Python loop over slices; both run
the same block function and give identical outputs. `remat=True` wraps the block in
`jax.checkpoint`. The sinusoidal position table is loaded from the checkpoint (HF stores it as
`embed_positions.weight`) into a non-trainable `Buffer` and written back on export.

HF names: `hf_to_ours(cfg)` / `ours_to_hf(cfg)` derive every HF tensor name (one
`hf_names.ParamMap` each, as for the LLMs and the Q-Former) from the abstract model;
`params_from_hf` turns a stream of HF tensors into our pure params and `export_whisper_encoder`
gives HF-named numpy tensors back. The directory IO (reading a local
HF Whisper checkpoint, writing one) is in `esrt_jax.convert.whisper`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from esrt_jax.config import CheckpointError, ConfigError, check, setting
from esrt_jax.models.hf_names import ParamMap, flat_params, from_hf, layout_maps, to_hf
from esrt_jax.models.layers import Dense, LayerNorm, activation, dtype_from_name, param

# Keys of transformers' WhisperConfig that define the encoder.
HF_ENCODER_KEYS = ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads",
                   "encoder_ffn_dim", "max_source_positions", "activation_function")
# Tensor-name prefixes of the encoder inside the HF model classes, most specific first.
HF_PREFIXES = ("model.encoder.", "encoder.", "")


@dataclasses.dataclass(frozen=True)
class WhisperEncoderConfig:
    """Whisper encoder shape (HF `WhisperConfig` names) plus runtime settings.

    Defaults are whisper-base. `layer_norm_eps` is fixed at 1e-5 in HF (torch's default) and not
    part of `WhisperConfig`; `dtype`, `param_dtype`, `remat`, `scan_layers`, `attention` are ours
    only.
    """

    num_mel_bins: int = setting(80, help="mel bins of the input (80 or 128)")
    d_model: int = setting(512, help="encoder width")
    encoder_layers: int = setting(6, help="encoder layers")
    encoder_attention_heads: int = setting(8, help="attention heads")
    encoder_ffn_dim: int = setting(2048, help="FFN width")
    max_source_positions: int = setting(1500, help="encoder frames (1500: 30 s)")
    activation_function: str = setting("gelu", help="FFN activation")
    layer_norm_eps: float = setting(1e-5, help="LayerNorm epsilon (1e-5 in HF)")
    # runtime settings (not exported to HF)
    dtype: str = setting("float32", help="compute dtype")
    param_dtype: str = setting("float32", help="storage dtype")
    remat: bool = setting(False, help="jax.checkpoint around each block")
    scan_layers: bool = setting(True, help="jax.lax.scan over the stacked layers (else a Python loop)")
    # "blocked": query blocks in cache (fastest on CPU); "xla": jax.nn.dot_product_attention
    # (TPU/GPU); "auto": blocked on the CPU backend, xla elsewhere.
    attention: str = setting("auto",
                           help="blocked (query blocks, fastest on CPU) | xla (jax.nn.dot_product_attention) | auto")

    def validate(self) -> None:
        for k in ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads",
                  "encoder_ffn_dim", "max_source_positions"):
            check(getattr(self, k) > 0, k, f"must be positive, got {getattr(self, k)}")
        check(self.d_model % self.encoder_attention_heads == 0, "encoder_attention_heads",
              f"d_model {self.d_model} is not divisible by {self.encoder_attention_heads} heads")
        check(self.d_model % 2 == 0, "d_model", "must be even (sinusoidal positions)")
        check(self.layer_norm_eps > 0, "layer_norm_eps", "must be positive")
        check(self.attention in ("auto", "blocked", "xla"), "attention",
              f"must be 'auto', 'blocked' or 'xla', got {self.attention!r}")
        try:
            activation(self.activation_function)
        except ValueError as e:
            raise ConfigError(f"activation_function: {e}") from None
        for k in ("dtype", "param_dtype"):
            try:
                dtype_from_name(getattr(self, k))
            except ValueError as e:
                raise ConfigError(f"{k}: {e}") from None

    def __post_init__(self):
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def num_frames(self) -> int:
        """Mel frames the encoder expects (3000 for real Whisper)."""
        return 2 * self.max_source_positions

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any] | Any, **runtime: Any) -> "WhisperEncoderConfig":
        """From a `WhisperConfig` (or its dict / config.json); `runtime` sets dtype, remat, ..."""
        data = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
        missing = [k for k in HF_ENCODER_KEYS if k not in data]
        if missing:
            raise ConfigError(f"Whisper config lacks key(s) {missing}")
        unknown = sorted(set(runtime) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown WhisperEncoderConfig setting(s) {unknown}")
        return cls(**{k: data[k] for k in HF_ENCODER_KEYS}, **runtime)

    def to_hf_config(self) -> dict[str, Any]:
        """The HF `WhisperConfig` keys that define this encoder (`WhisperConfig(**d)` works)."""
        return {"model_type": "whisper", **{k: getattr(self, k) for k in HF_ENCODER_KEYS}}


class Buffer(nnx.Variable):
    """A non-trainable array that belongs to the checkpoint (not an optimizer target)."""


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's position table (length, channels) as f32: [sin | cos] of t / 10000^(i / (C/2 - 1)).

    Computed in f64, so it differs from transformers' f32 table by up to ~1e-4 at t ~ 1500 (f32
    rounding of its exp and t * inv). Only random init uses it: converted models carry the
    checkpoint's own table.
    """
    inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(-inc * np.arange(channels // 2, dtype=np.float64))
    t = np.arange(length, dtype=np.float64)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


class Conv1d(nnx.Module):
    """1-D convolution, kernel (K, in, out). x (B, T, in) or, with `channels_first`, (B, in, T)
    -> (B, T', out) with T' = (T + 2 * padding - K) // stride + 1."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, *, stride: int = 1,
                 padding: int = 0, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.stride, self.padding, self.dtype = stride, padding, dtype
        fan_in = in_ch * kernel_size
        self.kernel = param(rngs, nnx.initializers.normal(1.0 / math.sqrt(fan_in)),
                            (kernel_size, in_ch, out_ch), ("conv_k", "conv_in", "enc_embed"), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (out_ch,), ("enc_embed",), param_dtype)

    def __call__(self, x: jax.Array, *, channels_first: bool = False) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype),
            window_strides=(self.stride,), padding=((self.padding, self.padding),),
            # channels-first input straight from the mel (no transpose), time-major output
            dimension_numbers=("NCW" if channels_first else "NWC", "WIO", "NWC"))
        return y + self.bias[...].astype(self.dtype)


class WhisperAttention(nnx.Module):
    """Bidirectional multi-head self-attention as HF's: k_proj has no bias; q is scaled after
    its bias. x (B, T, D) -> (B, T, D)."""

    def __init__(self, cfg: WhisperEncoderConfig, *, rngs: nnx.Rngs):
        D = cfg.d_model
        kw = dict(dtype=dtype_from_name(cfg.dtype), param_dtype=dtype_from_name(cfg.param_dtype),
                  rngs=rngs)
        self.num_heads, self.head_dim = cfg.encoder_attention_heads, cfg.head_dim
        self.attention = cfg.attention
        self.q_proj = Dense(D, D, axes=("enc_embed", "heads"), **kw)
        self.k_proj = Dense(D, D, axes=("enc_embed", "heads"), use_bias=False, **kw)
        self.v_proj = Dense(D, D, axes=("enc_embed", "heads"), **kw)
        self.out_proj = Dense(D, D, axes=("heads", "enc_embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        B, T, _ = x.shape
        shape = (B, T, self.num_heads, self.head_dim)
        # Same operation order as HF (scale after the bias) for bit-level closeness.
        q = (self.q_proj(x) * self.head_dim ** -0.5).reshape(shape)
        k = self.k_proj(x).reshape(shape)
        v = self.v_proj(x).reshape(shape)
        impl = self.attention
        if impl == "auto":
            impl = "blocked" if jax.default_backend() == "cpu" else "xla"
        if impl == "blocked":
            o = blocked_attention(q, k, v)
        else:  # fused/XLA attention; softmax in f32
            o = jax.nn.dot_product_attention(q, k, v, scale=1.0)
        return self.out_proj(o.reshape(B, T, -1))


def _query_block(t: int, heads: int, budget_bytes: int) -> int:
    """Largest divisor of `t` whose f32 logits block (heads, block, t) fits `budget_bytes`."""
    best = 1
    for bs in range(1, t + 1):
        if t % bs == 0 and heads * bs * t * 4 <= budget_bytes:
            best = bs
    return best


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                      budget_bytes: int = 8 * 2**20) -> jax.Array:
    """Unscaled, unmasked softmax attention, one example and one block of queries at a time.

    q, k, v (B, T, N, H) -> (B, T, N, H). On CPU the (N, T, T) logits of a 30 s clip are 72 MB
    per example for whisper-base; computing them in blocks of at most 8 MB (best of 0.6-40 MB on a quiet 2-core
    machine: 185 ms vs 230 ms at 2.5 MB per whisper-base layer at batch 4) is ~2x
    faster than XLA's dot_product_attention there (bench/bench_whisper.py). Logits, exp and the
    row sums are f32; the softmax is normalised after the value product (one pass fewer).
    Meant for the CPU backend ("auto" picks it there only): the loop over examples would
    serialise a batch sharded across accelerators.
    """
    B, T, N, H = q.shape
    S = k.shape[1]
    bs = _query_block(T, N, budget_bytes) if S == T else T
    q = q.transpose(0, 2, 1, 3).reshape(B, N, T // bs, bs, H).transpose(0, 2, 1, 3, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, N, S, H)

    def one_example(args):
        qb, kb, vb = args  # (nb, N, bs, H), (N, S, H), (N, S, H)

        def one_block(qi):
            s = jnp.einsum("nqh,nkh->nqk", qi, kb, preferred_element_type=jnp.float32)
            e = jnp.exp(s - s.max(-1, keepdims=True))
            o = jnp.einsum("nqk,nkh->nqh", e.astype(vb.dtype), vb,
                           preferred_element_type=jnp.float32)
            return (o / e.sum(-1, keepdims=True)).astype(vb.dtype)

        return jax.lax.map(one_block, qb)  # (nb, N, bs, H)

    o = jax.lax.map(one_example, (q, k, v))  # (B, nb, N, bs, H)
    return o.transpose(0, 1, 3, 2, 4).reshape(B, T, N, H)


class WhisperEncoderBlock(nnx.Module):
    """Pre-LN transformer block. x (B, T, D) -> (B, T, D)."""

    def __init__(self, cfg: WhisperEncoderConfig, *, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.encoder_ffn_dim
        kw = dict(dtype=dtype_from_name(cfg.dtype), param_dtype=dtype_from_name(cfg.param_dtype),
                  rngs=rngs)
        self.self_attn_layer_norm = LayerNorm(D, eps=cfg.layer_norm_eps, axes=("enc_embed",), **kw)
        self.self_attn = WhisperAttention(cfg, rngs=rngs)
        self.final_layer_norm = LayerNorm(D, eps=cfg.layer_norm_eps, axes=("enc_embed",), **kw)
        self.fc1 = Dense(D, F, axes=("enc_embed", "mlp"), **kw)
        self.fc2 = Dense(F, D, axes=("mlp", "enc_embed"), **kw)
        self.act = activation(cfg.activation_function)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class WhisperEncoder(nnx.Module):
    """Whisper audio encoder. mel (B, n_mels, 2T) -> (B, T, D) (T = P: the 30 s window; or shorter).

    Parameters (logical axes): conv1/conv2 kernel (K, in, D) ("conv_k", "conv_in", "enc_embed"),
    embed_positions (P, D) Buffer, blocks.* stacked (L, ...) with a leading "layers" axis,
    layer_norm (D,).
    """

    def __init__(self, config: WhisperEncoderConfig, *, rngs: nnx.Rngs):
        cfg = self.config = config
        D = cfg.d_model
        kw = dict(dtype=dtype_from_name(cfg.dtype), param_dtype=dtype_from_name(cfg.param_dtype),
                  rngs=rngs)
        self.conv1 = Conv1d(cfg.num_mel_bins, D, 3, padding=1, **kw)
        self.conv2 = Conv1d(D, D, 3, stride=2, padding=1, **kw)
        self.embed_positions = Buffer(
            jnp.asarray(sinusoids(cfg.max_source_positions, D), dtype_from_name(cfg.param_dtype)),
            out_sharding=(None, "enc_embed"), eager_sharding=False)

        @nnx.split_rngs(splits=cfg.encoder_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> WhisperEncoderBlock:
            return WhisperEncoderBlock(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.layer_norm = LayerNorm(D, eps=cfg.layer_norm_eps, axes=("enc_embed",), **kw)

    def embed(self, mel: jax.Array) -> jax.Array:
        """Conv stem + positions. mel (B, n_mels, 2T) -> (B, T, D), T <= P.

        2T = `num_frames` is Whisper's 30 s window (what HF accepts); a shorter even window (a
        clip's real length, rounded up to a bucket) gets the first T positions: the encoder then
        attends over the speech only, ~P/T times cheaper (`audio.encoder_frames` gives T)."""
        cfg = self.config
        if (mel.ndim != 3 or mel.shape[1] != cfg.num_mel_bins or mel.shape[2] > cfg.num_frames
                or mel.shape[2] % 2 or mel.shape[2] < 2):
            raise ValueError(f"Whisper encoder expects mel of shape (B, {cfg.num_mel_bins}, "
                             f"{cfg.num_frames}) (100 frames per second: pad/trim the audio to "
                             f"{cfg.num_frames / 100:g} s) or a shorter even number of frames, "
                             f"got {tuple(mel.shape)}")
        gelu = activation("gelu")  # HF hard-codes exact GELU in the stem
        x = gelu(self.conv1(mel, channels_first=True))
        x = gelu(self.conv2(x))
        return x + self.embed_positions[...][:x.shape[1]].astype(x.dtype)

    def __call__(self, mel: jax.Array, *, return_hidden_states: bool = False
                 ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """mel (B, n_mels, 2P) -> (B, P, D); with `return_hidden_states` also (L + 1, B, P, D):
        [0] the embeddings (stem + positions), [i + 1] block i's output before the final norm."""
        cfg = self.config
        x = emb = self.embed(mel)
        graphdef, state = nnx.split(self.blocks)

        def block(h, layer_state):
            h = nnx.merge(graphdef, layer_state)(h)
            return h, (h if return_hidden_states else None)

        if cfg.remat:
            block = jax.checkpoint(block, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            x, hs = jax.lax.scan(block, x, state)
        else:
            outs = []
            for i in range(cfg.encoder_layers):
                x, h = block(x, jax.tree.map(lambda a: a[i], state))
                outs.append(h)
            hs = jnp.stack(outs) if return_hidden_states else None
        out = self.layer_norm(x)
        if not return_hidden_states:
            return out
        return out, jnp.concatenate([emb[None], hs], axis=0)


# ----------------------------------------------------------------------------------------------
# Hugging Face mapping
# ----------------------------------------------------------------------------------------------

def _abstract_encoder(cfg: WhisperEncoderConfig) -> WhisperEncoder:
    """The encoder with shapes only (no random init, so large-v3 builds instantly)."""
    return nnx.eval_shape(lambda: WhisperEncoder(cfg, rngs=nnx.Rngs(0)))


def _hf_leaf(path: tuple) -> tuple[str, str]:
    """Our param path (without 'blocks') -> (HF dotted name, layout kind in `hf_names.LAYOUTS`)."""
    *mods, leaf = path
    if not mods:  # embed_positions
        return f"{leaf}.weight", "none"
    kind = {"kernel": "conv" if mods[0] in ("conv1", "conv2") else "dense"}.get(leaf, "none")
    hf_leaf = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
    return ".".join([*mods, hf_leaf]), kind


def _maps(cfg: WhisperEncoderConfig, direction: str) -> list[ParamMap]:
    """Every HF encoder tensor name (no prefix) derived from the abstract model."""
    abstract = nnx.to_pure_dict(nnx.state(_abstract_encoder(cfg)))
    entries = []
    for path, leaf in flatten_dict(abstract).items():
        if path[0] == "blocks":
            name, kind = _hf_leaf(path[1:])
            entries += [(f"layers.{i}.{name}", path, i, kind, leaf.shape[1:])
                        for i in range(cfg.encoder_layers)]
        else:
            name, kind = _hf_leaf(path)
            entries.append((name, path, None, kind, leaf.shape))
    return layout_maps(entries, direction)


def hf_to_ours(cfg: WhisperEncoderConfig) -> list[ParamMap]:
    """HF encoder tensor name (no prefix) -> our path, stacked layer index, transform to our layout."""
    return _maps(cfg, "hf_to_ours")


def ours_to_hf(cfg: WhisperEncoderConfig) -> list[ParamMap]:
    """Our (path, layer) -> HF encoder tensor name (no prefix), transform back to torch layout."""
    return _maps(cfg, "ours_to_hf")


def detect_prefix(names: Iterable[str], where: str = "checkpoint") -> str:
    """'model.encoder.' (WhisperForConditionalGeneration), 'encoder.' (WhisperModel) or ''
    (a bare WhisperEncoder), from the tensor names."""
    names = set(names)
    for prefix in HF_PREFIXES:
        if f"{prefix}conv1.weight" in names:
            return prefix
    raise CheckpointError(f"{where}: no Whisper encoder tensors found (looked for "
                          f"{[p + 'conv1.weight' for p in HF_PREFIXES]})")


def encoder_names(names: Iterable[str], prefix: str) -> list[str]:
    if prefix:
        return [n for n in names if n.startswith(prefix)]
    # bare encoder checkpoint: everything is the encoder's
    return list(names)


def params_from_hf(tensors: Iterable[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
                   cfg: WhisperEncoderConfig, *, prefix: str, names: Iterable[str],
                   where: str = "checkpoint") -> dict:
    """HF tensors -> our pure param dict (nested, numpy, `cfg.param_dtype`).

    `names` are all tensor names of the source (to report missing/unexpected ones before any
    tensor is read); `tensors` yields (full name, array) for the encoder tensors, streamed.
    """
    mapping = {m.hf_name: m for m in hf_to_ours(cfg)}
    enc = encoder_names(names, prefix)
    unexpected = sorted(n for n in enc if n[len(prefix):] not in mapping)
    if unexpected:
        raise CheckpointError(f"{where}: unexpected Whisper encoder tensor(s) {unexpected[:10]}")
    present = {n[len(prefix):] for n in enc}
    missing = sorted(prefix + n for n in mapping if n not in present)
    if missing:
        raise CheckpointError(f"{where}: missing Whisper encoder tensor(s) {missing[:10]}")
    pdtype = np.dtype(dtype_from_name(cfg.param_dtype))
    abstract = flatten_dict(nnx.to_pure_dict(nnx.state(_abstract_encoder(cfg))))
    out = {path: np.empty(leaf.shape, pdtype) for path, leaf in abstract.items()}
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    seen = set()
    for m, value in from_hf(list(mapping.values()), items, prefix=prefix, where=where):
        if m.layer is None:
            out[m.path][...] = value.astype(pdtype)
        else:
            out[m.path][m.layer] = value.astype(pdtype)
        seen.add(m.hf_name)
    not_read = sorted(prefix + n for n in mapping if n not in seen)
    if not_read:
        raise CheckpointError(f"{where}: missing Whisper encoder tensor(s) {not_read[:10]}")
    return unflatten_dict(out)


def encoder_from_params(cfg: WhisperEncoderConfig, params: Mapping) -> WhisperEncoder:
    """Build the module around a pure param dict (no random init)."""
    abstract = _abstract_encoder(cfg)
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, dict(params)))
    return nnx.merge(graphdef, state)


def export_whisper_encoder(model_or_params: WhisperEncoder | Any, cfg: WhisperEncoderConfig,
                           *, prefix: str = "model.encoder.", dtype: Any = np.float32
                           ) -> dict[str, np.ndarray]:
    """Our encoder (module, nnx.State or pure dict) -> {HF name: numpy array}.

    `prefix`: 'model.encoder.' for WhisperForConditionalGeneration, 'encoder.' for WhisperModel,
    '' for a bare WhisperEncoder. `dtype=None` keeps the stored dtype.
    """
    return {name: a if dtype is None else a.astype(dtype)
            for name, a in to_hf(ours_to_hf(cfg), flat_params(model_or_params, (nnx.Param, Buffer)), prefix=prefix)}
