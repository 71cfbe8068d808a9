"""LoRA adapters in PEFT's on-disk format, both directions.

    export_peft_adapter(model, adapter_dir, base_model_name_or_path="/models/Qwen2.5-7B")
    # torch side:  PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dir)
    lora = read_peft_config(adapter_dir)                     # -> llm.LoraConfig
    model = load_hf_model(base_dir, lora=lora); load_peft_adapter(model, adapter_dir)

Layout: `adapter_config.json` (peft_type LORA, r, lora_alpha, lora_dropout, target_modules,
base_model_name_or_path, task_type CAUSAL_LM, ...) and `adapter_model.safetensors` holding, per
adapted projection, `base_model.model.<hf module>.lora_A.weight` (r, in_features) and
`...lora_B.weight` (out_features, r), e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. Our factors are
`lora_a` (L, *in, r) and `lora_b` (L, r, *out) (stacked layers, heads split out), so the
conversion is a per-layer flatten + transpose; PEFT's scale alpha / r equals ours.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from esrt_jax.convert import hf_io
from esrt_jax.models import llm
from esrt_jax.models.layers import LoraParam

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def _module_names(cfg: llm.LLMConfig) -> dict[tuple[tuple[str, ...], int], str]:
    """(our module path, layer) -> HF module name, e.g. 'model.layers.0.self_attn.q_proj'."""
    out = {}
    for m in llm.ours_to_hf(cfg):
        if m.path[-1] == "kernel" and m.layer is not None and m.hf_rows is None:
            out[(m.path[:-1], m.layer)] = m.hf_name[: -len(".weight")]
    return out


def _peft_name(names: dict, mod: tuple[str, ...], layer: int, cfg: llm.LLMConfig) -> str:
    if (mod, layer) not in names:  # HF fuses this projection with others (Phi-3's qkv_proj)
        raise ValueError(f"LoRA on {'/'.join(mod)} has no PEFT form for {cfg.model_type}: its checkpoints "
                         f"fuse that projection with others ({', '.join(sorted(cfg.HF_FUSED))}); export the "
                         f"merged model (convert.llm.export_hf) or put LoRA on other modules")
    return names[(mod, layer)]


def adapter_tensors(model: llm.CausalLM, dtype: Any = np.float32) -> Iterator[tuple[str, np.ndarray]]:
    """Stream PEFT-named LoRA tensors of `model`: (name, (r, in) or (out, r) numpy array)."""
    cfg = model.config
    names = _module_names(cfg)
    flat = dict(nnx.to_flat_state(nnx.state(model, LoraParam)))
    for path, var in sorted(flat.items(), key=lambda kv: tuple(map(str, kv[0]))):
        if path[-1] != "lora_a":
            continue
        mod = path[:-1]
        a_all = np.asarray(var.get_value())
        b_all = np.asarray(flat[mod + ("lora_b",)].get_value())
        if mod[0] != "layers":
            raise ValueError(f"LoRA on {'/'.join(mod)} has no PEFT name (only decoder-layer projections)")
        r = a_all.shape[-1]
        for i in range(cfg.num_hidden_layers):
            hf = _peft_name(names, mod, i, cfg)
            a = a_all[i].reshape(-1, r).T        # (*in, r) -> (r, in)
            b = b_all[i].reshape(r, -1).T        # (r, *out) -> (out, r)
            yield f"{PEFT_PREFIX}{hf}.lora_A.weight", np.ascontiguousarray(a).astype(dtype)
            yield f"{PEFT_PREFIX}{hf}.lora_B.weight", np.ascontiguousarray(b).astype(dtype)


def peft_config_dict(lora: llm.LoraConfig, base_model_name_or_path: str | None,
                     cfg: llm.LLMConfig | None = None) -> dict:
    """adapter_config.json content for a plain LoRA (no DoRA / rsLoRA / per-layer patterns)."""
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else float(lora.alpha)
    d = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": alpha,
        "lora_dropout": lora.dropout, "target_modules": sorted(lora.targets),
        "base_model_name_or_path": base_model_name_or_path, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "revision": None,
    }
    if cfg is not None:
        arch = cfg.to_hf_config().get("architectures") or [None]
        d["auto_mapping"] = None if arch[0] is None else {"base_model_class": arch[0],
                                                          "parent_library": "transformers"}
    return d


def export_peft_adapter(model: llm.CausalLM, out_dir: str | os.PathLike, *,
                        base_model_name_or_path: str | os.PathLike | None = None,
                        dtype: Any = np.float32) -> Path:
    """Write `model`'s LoRA factors as a PEFT adapter directory (config + safetensors).

    The base weights are not written: export them with `convert.llm.export_hf(model,
    merge_lora=False)` (or use the original checkpoint), then
    `PeftModel.from_pretrained(base, out_dir)` reproduces our unmerged forward.
    """
    if model.lora is None:
        raise ValueError("the model has no LoRA (built with lora=None); nothing to export")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = dict(adapter_tensors(model, dtype))
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    base = None if base_model_name_or_path is None else str(base_model_name_or_path)
    (out / ADAPTER_CONFIG).write_text(
        json.dumps(peft_config_dict(model.lora, base, model.config), indent=2) + "\n")
    return out


def read_peft_config(adapter_dir: str | os.PathLike) -> llm.LoraConfig:
    """adapter_config.json -> `LoraConfig`; features we do not implement are a clear error."""
    d = hf_io.resolve_local_dir(adapter_dir)
    f = d / ADAPTER_CONFIG
    if not f.is_file():
        raise hf_io.CheckpointError(f"{d} has no {ADAPTER_CONFIG}; not a PEFT adapter directory")
    c = json.loads(f.read_text())
    if c.get("peft_type") != "LORA":
        raise hf_io.CheckpointError(f"{f}: peft_type {c.get('peft_type')!r}; only LORA adapters are supported")
    for key in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if c.get(key):
            raise hf_io.CheckpointError(f"{f}: {key}=true is not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if c.get(key):
            raise hf_io.CheckpointError(f"{f}: per-module {key} is not supported")
    if c.get("layers_to_transform") is not None:
        raise hf_io.CheckpointError(f"{f}: layers_to_transform is not supported (LoRA on every layer only)")
    targets = c.get("target_modules")
    if isinstance(targets, str):
        raise hf_io.CheckpointError(f"{f}: target_modules as a regex ({targets!r}) is not supported; "
                                    f"list the module names")
    return llm.LoraConfig(targets=tuple(sorted(targets)), rank=int(c["r"]),
                          alpha=float(c["lora_alpha"]), dropout=float(c.get("lora_dropout", 0.0)))


def load_peft_adapter(model: llm.CausalLM, adapter_dir: str | os.PathLike) -> llm.CausalLM:
    """Set `model`'s LoRA factors from a PEFT adapter directory (in place; also returned).

    The model must have been built with the adapter's LoraConfig (`read_peft_config`)."""
    d = hf_io.resolve_local_dir(adapter_dir)
    want = read_peft_config(d)
    have = model.lora
    if have is None or (set(have.targets), have.rank, float(have.alpha)) != (
            set(want.targets), want.rank, float(want.alpha)):
        raise ValueError(f"{d}: adapter is {want}, but the model was built with lora={have}; build it "
                         f"with lora=read_peft_config(adapter_dir)")
    f = d / ADAPTER_WEIGHTS
    if not f.is_file():
        raise hf_io.CheckpointError(f"{d} has no {ADAPTER_WEIGHTS}")
    names = _module_names(model.config)
    flat = dict(nnx.to_flat_state(nnx.state(model, LoraParam)))
    updated = {}
    with safe_open(str(f), framework="numpy") as sf:
        keys = set(sf.keys())
        for path, var in flat.items():
            mod, which = path[:-1], path[-1]
            cur = np.asarray(var.get_value())
            new = np.empty_like(cur)
            r = want.rank
            for i in range(model.config.num_hidden_layers):
                hf = _peft_name(names, mod, i, model.config)
                key = f"{PEFT_PREFIX}{hf}.lora_{'A' if which == 'lora_a' else 'B'}.weight"
                if key not in keys:
                    raise hf_io.CheckpointError(f"{f}: missing tensor {key}")
                t = sf.get_tensor(key)
                inner = cur.shape[1:]  # A: (*in, r); B: (r, *out)
                expect = ((r, int(np.prod(inner[:-1]))) if which == "lora_a"
                          else (int(np.prod(inner[1:])), r))
                if tuple(t.shape) != expect:
                    raise hf_io.CheckpointError(f"{f}: {key} has shape {tuple(t.shape)}, expected {expect}")
                x = t.T.reshape(inner)
                new[i] = x.astype(cur.dtype)
            updated[path] = var.replace(jax_array(new, var))
    nnx.update(model, nnx.from_flat_state(updated))
    return model


def jax_array(x: np.ndarray, like: nnx.Variable):
    """x as a jax array with `like`'s sharding (keeps mesh placement of a loaded model)."""
    old = like.get_value()
    sharding = getattr(old, "sharding", None)
    return jax.device_put(x, sharding) if sharding is not None else jax.numpy.asarray(x)
