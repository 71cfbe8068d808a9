"""LLM-SRT adapter checkpoints (`encoder_projector.*` state dicts) <-> our `SpeechAdapter`.

LLM-SRT (a SLAM-LLM fork) saves the trainable parameters of the whole model as one PyTorch state
dict (`model.pt`); the adapter lives under `encoder_projector.`:

    encoder_projector.query                      (1, Q, H)        learned queries
    encoder_projector.qformer.<Blip2QFormerModel tensor names>
    encoder_projector.linear.{weight,bias}       llm_dim <= 1536 (plain variant)
    encoder_projector.linear1 / linear2.{weight,bias}   otherwise, and the pooled variant
    encoder_projector.norm.{weight,bias}         LayerNorm(llm_dim, eps 1e-5)

Other prefixes in the same file (e.g. the LLM's LoRA tensors) are left alone here. Torch `.pt`
files need PyTorch (imported lazily, only for that); `.safetensors` files with the same keys
need only numpy.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from esrt_jax.convert.hf_io import CheckpointError
from esrt_jax.models.hf_names import from_hf, to_hf
from esrt_jax.models.qformer import (
    QFormerConfig,
    SpeechAdapter,
    flat_params,
    load_flat_params,
    projector_maps,
    qformer_from_hf,
    qformer_to_hf,
    sub_params,
)

PREFIX = "encoder_projector."
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

def require_qformer(cfg: QFormerConfig, source: str) -> None:
    """LLM-SRT's format is its `EncoderProjectorQFormer`: refuse the window-means adapter (no Q-Former)."""
    if cfg.window_means:
        raise CheckpointError(f"{source}: LLM-SRT's adapter format holds a Q-Former; this adapter is window "
                              f"means (adapter.window_means: {cfg.window_means}), which it cannot hold (our "
                              f"layout, esrt_jax.models.qformer.flat_params, does: the HF export writes it)")


def llm_srt_to_flat(cfg: QFormerConfig, state_dict: Mapping[str, np.ndarray], *, prefix: str = PREFIX,
                    source: str = "LLM-SRT state dict") -> dict[str, np.ndarray]:
    """LLM-SRT tensors under `prefix` -> our flat `SpeechAdapter` params (shapes checked by the loader)."""
    require_qformer(cfg, source)
    wanted = {m.hf_name: m for m in projector_maps(cfg, "hf_to_ours")}
    for name in state_dict:
        rel = name[len(prefix):]
        if name.startswith(prefix) and not rel.startswith("qformer.") and rel not in wanted:
            raise CheckpointError(f"{source}: unexpected tensor {name} for a projector with "
                                  f"llm_dim {cfg.llm_dim}, pool_k {cfg.pool_k} (expects "
                                  f"{[prefix + w for w in wanted if w != 'query']})")
    out = {".".join(m.path): x for m, x in from_hf(list(wanted.values()), state_dict.items(), prefix=prefix,
                                                    where=source)}
    missing = [prefix + w for w, m in wanted.items() if ".".join(m.path) not in out]
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {missing}")
    q = qformer_from_hf(cfg, state_dict, prefix=prefix + "qformer.", source=source)
    out.update({f"qformer.{k}": v for k, v in q.items()})
    return out


def flat_to_llm_srt(cfg: QFormerConfig, flat: Mapping[str, np.ndarray], *, prefix: str = PREFIX
                    ) -> dict[str, np.ndarray]:
    """Our flat `SpeechAdapter` params -> LLM-SRT state-dict tensors (numpy) under `prefix`."""
    require_qformer(cfg, "the LLM-SRT export")
    out = dict(to_hf(projector_maps(cfg, "ours_to_hf"), {tuple(k.split(".")): v for k, v in flat.items()},
                     prefix=prefix, where="our adapter params"))
    out.update(qformer_to_hf(cfg, sub_params(flat, "qformer"), prefix=prefix + "qformer."))
    return out


def adapter_to_llm_srt(adapter: Any, cfg: QFormerConfig | None = None, *, prefix: str = PREFIX
                       ) -> dict[str, np.ndarray]:
    """`SpeechAdapter` (or its params tree + `cfg`) -> {'encoder_projector.query': ..., ...}
    loadable by LLM-SRT's model."""
    if cfg is None:
        if not isinstance(adapter, SpeechAdapter):
            raise TypeError("adapter_to_llm_srt: pass cfg when giving a params tree, not a SpeechAdapter")
        cfg = adapter.config
    return flat_to_llm_srt(cfg, flat_params(adapter), prefix=prefix)


def load_llm_srt_into(adapter: SpeechAdapter, state_dict: Mapping[str, np.ndarray], *,
                      prefix: str = PREFIX, source: str = "LLM-SRT state dict") -> None:
    """Set all of `adapter`'s parameters from an LLM-SRT state dict (missing/mis-shaped -> error)."""
    flat = llm_srt_to_flat(adapter.config, state_dict, prefix=prefix, source=source)
    load_flat_params(adapter, flat, source=source)


def infer_config(state_dict: Mapping[str, Any], *, prefix: str = PREFIX, pool_k: int | None = None,
                 source: str = "LLM-SRT state dict", **overrides: Any) -> QFormerConfig:
    """Read the adapter sizes off the tensors. Not in the weights: `num_attention_heads` (LLM-SRT
    uses transformers' default 12), `layer_norm_eps` (1e-12) and `pool_k` (pass it for the pooled
    variant: with llm_dim > 2560 the plain and pooled projectors have identical tensors).
    """
    def shape(rel: str) -> tuple[int, ...]:
        if prefix + rel not in state_dict:
            raise CheckpointError(f"{source}: missing tensor {prefix + rel}")
        return tuple(state_dict[prefix + rel].shape)

    if not any(k.startswith(prefix) for k in state_dict):
        raise CheckpointError(f"{source}: no tensors under {prefix!r} (is this an LLM-SRT checkpoint "
                              f"of an encoder_projector 'q-former' model?)")
    q = shape("query")
    if len(q) != 3 or q[0] != 1:
        raise CheckpointError(f"{source}: {prefix}query has shape {q}, expected (1, Q, hidden)")
    layer_re = re.compile(re.escape(prefix) + r"qformer\.encoder\.layer\.(\d+)\.")
    layers = {int(m.group(1)) for k in state_dict if (m := layer_re.match(k))}
    if not layers:
        raise CheckpointError(f"{source}: no {prefix}qformer.encoder.layer.* tensors")
    n_layers = max(layers) + 1
    cross = sorted(i for i in range(n_layers)
                   if f"{prefix}qformer.encoder.layer.{i}.crossattention.attention.key.weight" in state_dict)
    if not cross or cross[0] != 0:
        raise CheckpointError(f"{source}: layer 0 has no crossattention tensors "
                              f"({prefix}qformer.encoder.layer.0.crossattention.*)")
    freq = cross[1] if len(cross) > 1 else n_layers
    if cross != list(range(0, n_layers, freq)):
        raise CheckpointError(f"{source}: cross-attention in layers {cross} is not every n-th layer")
    key0 = shape("qformer.encoder.layer.0.crossattention.attention.key.weight")
    ffn = shape("qformer.encoder.layer.0.intermediate_query.dense.weight")
    llm_dim = shape("norm.weight")[0]
    kw: dict[str, Any] = dict(num_hidden_layers=n_layers, hidden_size=q[2], num_queries=q[1],
                              cross_attention_frequency=freq, encoder_hidden_size=key0[1],
                              intermediate_size=ffn[0], llm_dim=llm_dim, pool_k=pool_k)
    kw.update(overrides)
    cfg = QFormerConfig(**kw)
    has_linear = prefix + "linear.weight" in state_dict
    mid = None if has_linear else shape("linear1.weight")[0]
    if mid != cfg.projector_mid:
        hint = (" — a 2560-wide linear1 with llm_dim <= 2560 is LLM-SRT's pooled variant: pass pool_k "
                "(e.g. 5)" if mid == 2560 and pool_k is None else "")
        raise CheckpointError(
            f"{source}: the projector tensors ({'linear' if has_linear else f'linear1 width {mid}'}) "
            f"do not match llm_dim {llm_dim} with pool_k {pool_k} (expects "
            f"{'linear' if cfg.projector_mid is None else f'linear1 width {cfg.projector_mid}'}){hint}")
    return cfg


# ----------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------

def _torch():
    try:
        import torch
    except ImportError:
        raise CheckpointError("reading/writing a PyTorch .pt state dict needs PyTorch (pip install "
                              "-e '.[torch]': torch==2.13.0); or convert it once to .safetensors with the same keys") from None
    return torch


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A `.safetensors` file, or a torch `.pt`/`.pth`/`.bin` state dict (needs torch), as numpy arrays."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file")
    if p.suffix == ".safetensors":
        return dict(load_file(str(p)))
    if p.suffix not in _TORCH_SUFFIXES:
        raise CheckpointError(f"{p}: unknown checkpoint format {p.suffix!r}; expected .safetensors "
                              f"or a torch state dict ({', '.join(_TORCH_SUFFIXES)})")
    torch = _torch()
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — re-raised with the file name
        raise CheckpointError(f"{p}: cannot read as a torch state dict: {e}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{p}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    out = {}
    for name, t in obj.items():
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            out[name] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[name] = t.numpy()
    return out


def write_state_dict(tensors: Mapping[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Write numpy tensors as `.safetensors`, or as a torch state dict for `.pt`/`.pth`/`.bin` (needs torch)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix == ".safetensors":
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(p),
                  metadata={"format": "pt"})
        return p
    if p.suffix not in _TORCH_SUFFIXES:
        raise CheckpointError(f"{p}: unknown checkpoint format {p.suffix!r}; use .safetensors or .pt")
    torch = _torch()
    sd = {}
    for k, v in tensors.items():
        v = np.ascontiguousarray(v)
        if v.dtype.name == "bfloat16":
            sd[k] = torch.from_numpy(v.view(np.int16).copy()).view(torch.bfloat16)
        else:
            sd[k] = torch.from_numpy(v.copy())
    torch.save(sd, str(p))
    return p


def load_llm_srt_adapter(path: str | os.PathLike, *, pool_k: int | None = None, rngs: nnx.Rngs | None = None,
                         **overrides: Any) -> SpeechAdapter:
    """Build a `SpeechAdapter` from an LLM-SRT checkpoint file, sizes inferred (see `infer_config`)."""
    sd = read_state_dict(path)
    cfg = infer_config(sd, pool_k=pool_k, source=str(path), **overrides)
    adapter = SpeechAdapter(cfg, rngs=rngs or nnx.Rngs(0))
    load_llm_srt_into(adapter, sd, source=str(path))
    return adapter


def save_llm_srt_adapter(adapter: SpeechAdapter, path: str | os.PathLike, *,
                         extra: Mapping[str, np.ndarray] | None = None) -> Path:
    """Write the adapter as LLM-SRT `encoder_projector.*` tensors (+ `extra`, e.g. LoRA) to `path`."""
    tensors = adapter_to_llm_srt(adapter)
    if extra:
        clash = sorted(set(extra) & set(tensors))
        if clash:
            raise CheckpointError(f"extra tensors clash with adapter tensors: {clash[:5]}")
        tensors.update(extra)
    return write_state_dict(tensors, path)
