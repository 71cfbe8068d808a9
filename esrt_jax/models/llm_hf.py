"""Hugging Face <-> ours tensor names for the decoder LLMs (pure: no file IO).

`hf_to_ours(cfg)` / `ours_to_hf(cfg)` yield one `ParamMap` per HF tensor (HF name, our path,
layer index into the stacked axis or None, the numpy transform and both shapes; the shared
`esrt_jax.models.hf_names.ParamMap`), so the converters in `esrt_jax.convert.llm` stream tensor
by tensor.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from flax import nnx

from esrt_jax.config import CheckpointError
from esrt_jax.models.hf_names import ParamMap, flat_params, fuse_rows, to_hf
from esrt_jax.models.llm_config import LLMConfig


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
    if cfg.HF_FUSED:
        out = fuse_rows(out, {f"{prefix}layers.{i}.{name}": tuple(f"{prefix}layers.{i}.{p}" for p in parts)
                              for i in range(cfg.num_hidden_layers) for name, parts in cfg.HF_FUSED.items()})
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
    raise CheckpointError(
        f"no embedding tensor found (looked for {[p + 'embed_tokens.weight' for p in HF_PREFIXES]}); "
        f"is this a decoder LLM checkpoint?")


def params_to_hf(params: nnx.State | Mapping, cfg: LLMConfig, prefix: str = "model."
                 ) -> Iterator[tuple[str, np.ndarray]]:
    """Stream our params as (HF name, numpy tensor in torch layout) (`hf_names.to_hf`). LoRA factors
    are not part of the base model: merge them first (`merge_lora`) or export them as an adapter."""
    yield from to_hf(ours_to_hf(cfg, prefix), flat_params(params))
