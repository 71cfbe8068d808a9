"""Decoder LLMs: local Hugging Face directory <-> our `CausalLM`, both directions.

    model = load_hf_model(model_dir, lora=LoraConfig(), param_dtype=jnp.float32,
                          mesh=mesh, rules=DEFAULT_RULES)          # HF dir -> ours (sharded)
    export_hf(model, out_dir, source_dir=model_dir)                 # ours (LoRA merged) -> HF dir
    export_peft_adapter(model, adapter_dir, base_model_name_or_path=model_dir)  # see convert/peft.py

Loading streams tensor by tensor (`hf_io.iter_tensors`, one shard open at a time) through the
family's name mapping (`llm.hf_to_ours`, applied by `hf_names.from_hf` as for every family); each tensor is cast to `param_dtype` on the host and
placed at once: with a mesh, `jax.device_put` onto the `NamedSharding` derived from the
parameter's logical axes (`esrt_jax.sharding`). Stacked layer params (L, ...) are allocated on
their devices once and filled layer by layer with a donated in-place update, so the host holds
one tensor at a time and no device ever holds more than its shard of one model. The model is built abstractly (`nnx.eval_shape`), so no
random init of the base weights is ever materialised; only the (small) LoRA factors are
initialised, inside a jit that computes nothing else.

Export streams the other way (`llm.params_to_hf`) into `hf_io.save_sharded` (one shard in host
memory at a time), writes config.json (with `dtype`/`torch_dtype`), generation_config.json and
copies the tokenizer files, so `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from esrt_jax.convert import hf_io
from esrt_jax.convert.tokenizer import TOKENIZER_FILES, check_vocab, copy_tokenizer_files, load_tokenizer
from esrt_jax.models import llm
from esrt_jax.models.hf_names import from_hf
from esrt_jax.models.llm import abstract_model
from esrt_jax.models.layers import LoraParam
from esrt_jax.sharding import DEFAULT_RULES, Rules, named_sharding, variable_axes

_TORCH_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _dtype_name(dtype: Any) -> str:
    name = jnp.dtype(dtype).name
    if name not in _TORCH_DTYPE_NAMES:
        raise ValueError(f"export dtype {name!r} not supported; use float32, bfloat16 or float16")
    return name


def param_shardings(model_or_state, mesh, rules: Rules | None = None):
    """{path: NamedSharding} for every variable of a model/state, from its logical axes."""
    rules = DEFAULT_RULES if rules is None else rules
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
    return {p: named_sharding(variable_axes(v), v.get_value().shape, mesh, rules)
            for p, v in nnx.to_flat_state(state)}


def _init_lora(cfg, lora, dtype, param_dtype, scan_layers, remat, seed, abstract_flat, mesh, rules):
    """Fresh LoRA factors (PEFT-style: A uniform, B zero), the same values a full `CausalLM`
    init with `nnx.Rngs(seed)` gives, computed in a jit whose only outputs are the factors (XLA
    drops the unused base-weight init)."""
    def make():
        m = llm.CausalLM(cfg, lora=lora, dtype=dtype, param_dtype=param_dtype,
                         scan_layers=scan_layers, remat=remat, rngs=nnx.Rngs(seed))
        return {p: v[...] for p, v in nnx.to_flat_state(nnx.state(m, LoraParam))}

    shapes = jax.eval_shape(make)
    out_sh = None
    if mesh is not None:
        rules = DEFAULT_RULES if rules is None else rules
        out_sh = {p: named_sharding(variable_axes(abstract_flat[p]), s.shape, mesh, rules)
                  for p, s in shapes.items()}
    return jax.jit(make, out_shardings=out_sh)()


def _layer_setter(sharding):
    """Jitted `buf.at[i].set(x)` with `buf` donated: stacked params are filled in place."""
    def set_layer(buf, x, i):
        return jax.lax.dynamic_update_index_in_dim(buf, x.astype(buf.dtype), i, 0)

    return jax.jit(set_layer, donate_argnums=0, out_shardings=sharding)


def stream_params(items, maps: list, cfg: llm.LLMConfig, abs_flat: Mapping, *, param_dtype: Any,
                  mesh=None, rules: Rules | None = None, where: str = "checkpoint") -> dict:
    """(HF name, numpy tensor) stream -> {our path: jax.Array}, each on its final placement.

    Every tensor is transformed to our layout, cast to `param_dtype` on the host and placed at
    once (with `mesh`: onto the `NamedSharding` of the parameter's logical axes). Stacked layer
    params are allocated once on their devices and filled layer by layer (a donated in-place
    update), so the host holds one tensor at a time and devices hold exactly one model.
    """
    rules = DEFAULT_RULES if rules is None else rules
    np_dtype = np.dtype(jnp.dtype(param_dtype))
    L = cfg.num_hidden_layers

    def sharding_of(path, shape):
        if mesh is None:
            return None
        var = abs_flat.get(path)
        return named_sharding(variable_axes(var) if var is not None else None, shape, mesh, rules)

    out: dict[tuple, Any] = {}
    filled: dict[tuple, int] = {}
    setters: dict[tuple, Any] = {}
    for m, x in from_hf(maps, items, where=where):  # a fused HF tensor (Phi-3's qkv_proj) feeds several
        x = x.astype(np_dtype, copy=False)
        if m.layer is None:
            sh = sharding_of(m.path, x.shape)
            out[m.path] = jax.device_put(x, sh) if sh is not None else jnp.asarray(x)
            continue
        if m.path not in out:
            full = (L,) + x.shape
            sh = sharding_of(m.path, full)
            out[m.path] = jnp.zeros(full, np_dtype, device=sh)
            setters[m.path] = _layer_setter(sh)
            filled[m.path] = 0
        if mesh is not None:  # the slice arrives already split like its destination
            sl = out[m.path].sharding.spec
            x = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*tuple(sl)[1:])))
        out[m.path] = setters[m.path](out[m.path], x, m.layer)
        filled[m.path] += 1
    short = {p: n for p, n in filled.items() if n != L}
    if short:
        raise hf_io.CheckpointError(f"{where}: stacked parameter(s) got {short} of {L} layers")
    return out


def _check_tokenizer(model_dir: Path, cfg: llm.LLMConfig) -> None:
    if any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        check_vocab(load_tokenizer(model_dir), cfg.vocab_size, where=model_dir)


def load_hf_model(model_dir: str | os.PathLike, *, lora: llm.LoraConfig | None = None,
                  dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                  mesh: jax.sharding.Mesh | None = None, rules: Rules | None = None,
                  scan_layers: bool = True, remat: bool = False, seed: int = 0,
                  cfg: llm.LLMConfig | None = None, check_tokenizer: bool = True) -> llm.CausalLM:
    """Local HF directory -> `CausalLM` (`model.config` holds its config).

    Single or sharded safetensors (+ index); tied embeddings (no `lm_head.weight`); bf16 / f16 /
    f32 tensors are cast to `param_dtype`. With `mesh`, every parameter is created directly on
    its `NamedSharding` (logical axes -> `rules`, default `esrt_jax.sharding.DEFAULT_RULES`).
    With `lora`, LoRA factors get a fresh init (B = 0, so the forward equals the base model).
    `check_tokenizer`: when the directory holds a tokenizer, its size must fit the vocab.
    Errors: unsupported `model_type` (ConfigError), missing / mis-shaped tensors (CheckpointError),
    tokenizer larger than the embedding table (TokenizerError).
    """
    d = hf_io.resolve_local_dir(model_dir)
    if cfg is None:
        cfg = llm.config_from_hf(hf_io.read_config(d))
    if check_tokenizer:
        _check_tokenizer(d, cfg)
    abstract = abstract_model(cfg, lora=lora, dtype=dtype, param_dtype=param_dtype,
                              scan_layers=scan_layers, remat=remat)
    graphdef, abs_state = nnx.split(abstract)
    abs_flat = dict(nnx.to_flat_state(abs_state))
    files = hf_io.weight_files(d)
    maps = llm.hf_to_ours(cfg, llm.detect_hf_prefix(files))
    names = list(dict.fromkeys(m.hf_name for m in maps))  # a fused tensor is read once
    missing = [n for n in names if n not in files]
    if missing:
        raise hf_io.CheckpointError(
            f"{d}: missing tensor(s) for {cfg.model_type} with {cfg.num_hidden_layers} layers: "
            f"{missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)} missing)")
    loaded = stream_params(hf_io.iter_tensors(d, names), maps, cfg, abs_flat,
                           param_dtype=param_dtype, mesh=mesh, rules=rules, where=str(d))
    lora_vals = (_init_lora(cfg, lora, dtype, param_dtype, scan_layers, remat, seed, abs_flat,
                            mesh, rules) if lora is not None else {})
    return _assemble(graphdef, abs_flat, {**loaded, **lora_vals}, where=str(d))


def _assemble(graphdef, abs_flat: Mapping, values: Mapping, where: str) -> llm.CausalLM:
    new = {}
    for path, var in abs_flat.items():
        if path not in values:
            raise hf_io.CheckpointError(f"{where}: no tensor maps to parameter {'/'.join(map(str, path))}")
        val = values[path]
        if tuple(val.shape) != tuple(var.get_value().shape):
            raise hf_io.CheckpointError(f"{where}: parameter {'/'.join(map(str, path))} has shape "
                                        f"{tuple(val.shape)}, expected {tuple(var.get_value().shape)}")
        new[path] = var.replace(val)
    return nnx.merge(graphdef, nnx.from_flat_state(new))


def model_from_hf_state(hf_config: Any, tensors: Mapping[str, np.ndarray], *,
                        lora: llm.LoraConfig | None = None, dtype: Any = jnp.float32,
                        param_dtype: Any = jnp.float32, mesh=None, rules: Rules | None = None,
                        scan_layers: bool = True, remat: bool = False, seed: int = 0
                        ) -> tuple[llm.CausalLM, llm.LLMConfig]:
    """In-memory variant of `load_hf_model`: HF config (object or dict) + {HF name: numpy array}
    (e.g. a torch state dict converted with `.numpy()`) -> (model, cfg)."""
    cfg = llm.config_from_hf(hf_config)
    abstract = abstract_model(cfg, lora=lora, dtype=dtype, param_dtype=param_dtype,
                              scan_layers=scan_layers, remat=remat)
    graphdef, abs_state = nnx.split(abstract)
    abs_flat = dict(nnx.to_flat_state(abs_state))
    maps = llm.hf_to_ours(cfg, llm.detect_hf_prefix(tensors))
    names = list(dict.fromkeys(m.hf_name for m in maps))  # a fused tensor is read once
    missing = [n for n in names if n not in tensors]
    if missing:
        raise hf_io.CheckpointError(f"state dict: missing tensor(s) {missing[:8]} ({len(missing)} missing)")
    values = stream_params(((n, tensors[n]) for n in names), maps, cfg, abs_flat,
                           param_dtype=param_dtype, mesh=mesh, rules=rules, where="state dict")
    if lora is not None:
        values.update(_init_lora(cfg, lora, dtype, param_dtype, scan_layers, remat, seed, abs_flat,
                                 mesh, rules))
    return _assemble(graphdef, abs_flat, values, where="state dict"), cfg


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------

def has_lora(state: nnx.State) -> bool:
    return any(isinstance(v, LoraParam) for _, v in nnx.to_flat_state(state))


def base_state(model: llm.CausalLM, merge_lora: bool = True) -> nnx.State:
    """The model's params with LoRA folded into the kernels (`merge_lora=True`) or the base
    weights alone (`False`: LoRA goes into a PEFT adapter instead)."""
    state = nnx.state(model)
    if merge_lora and model.lora is not None and has_lora(state):
        state = llm.merge_lora(state, model.lora)
    return state


def hf_config_dict(cfg: llm.LLMConfig, dtype: Any = jnp.float32) -> dict:
    """config.json content: `cfg.to_hf_config()` plus the storage dtype (5.x `dtype` and the
    older `torch_dtype` key, so both transformers generations read it)."""
    d = dict(cfg.to_hf_config())
    name = _dtype_name(dtype)
    d["dtype"] = name
    d["torch_dtype"] = name
    return d


def generation_config_dict(cfg: llm.LLMConfig) -> dict:
    """generation_config.json from the token ids of `cfg`."""
    d: dict[str, Any] = {"_from_model_config": True}
    if cfg.bos_token_id is not None:
        d["bos_token_id"] = cfg.bos_token_id
    if cfg.eos_token_id:
        d["eos_token_id"] = (cfg.eos_token_id[0] if len(cfg.eos_token_id) == 1
                             else list(cfg.eos_token_id))
    if cfg.pad_token_id is not None:
        d["pad_token_id"] = cfg.pad_token_id
    return d


def export_hf(model: llm.CausalLM, out_dir: str | os.PathLike, *, source_dir: str | os.PathLike | None = None,
              tokenizer=None, dtype: Any = jnp.float32, merge_lora: bool = True,
              max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Ours -> a Hugging Face directory that `AutoModelForCausalLM.from_pretrained` loads.

    Writes `model.safetensors` (or `model-0000i-of-0000n.safetensors` + index when over
    `max_shard_bytes`) in `dtype`, config.json, generation_config.json (copied from `source_dir`
    when it has one, else from the config's token ids) and the tokenizer: `tokenizer` (an HF
    tokenizer object, e.g. after adding language tags) is saved, else the tokenizer files of
    `source_dir` are copied. LoRA is merged into the kernels unless `merge_lora=False` (then only
    the base weights are written; export the adapter with `convert.peft.export_peft_adapter`).
    Streams tensor by tensor: one shard is in host memory at a time.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    np_dtype = np.dtype(jnp.dtype(dtype))
    _dtype_name(dtype)
    state = base_state(model, merge_lora)
    tensors = ((name, arr.astype(np_dtype, copy=False)) for name, arr in llm.params_to_hf(dict(nnx.to_flat_state(state)), cfg))
    hf_io.save_sharded(tensors, out, max_shard_bytes=max_shard_bytes)
    (out / "config.json").write_text(json.dumps(hf_config_dict(cfg, dtype), indent=2) + "\n")
    src = Path(source_dir) if source_dir is not None else None
    in_place = src is not None and src.resolve() == out.resolve()
    gen = src / "generation_config.json" if src is not None else None
    if gen is not None and gen.is_file():
        if not in_place:
            (out / "generation_config.json").write_text(gen.read_text())
    else:
        (out / "generation_config.json").write_text(
            json.dumps(generation_config_dict(cfg), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    elif src is not None and not in_place:
        copy_tokenizer_files(src, out)
    return out
