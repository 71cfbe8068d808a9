"""Import: an export directory -> a new run dir with an Orbax checkpoint in the training format."""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import yaml
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file

from esrt_jax.config import ConfigError
from esrt_jax.convert.peft import load_peft_adapter
from esrt_jax.export.common import ESRT_CONFIG, FORMAT, VERSION, ExportError, write_json
from esrt_jax.files import UndoOnFailure, write_atomic
from esrt_jax.models.qformer import load_flat_params
from esrt_jax.pytree import first_non_finite, key_name, path_str
from esrt_jax.speech.load import inference_builder
from esrt_jax.train.checkpoint import Checkpointer
from esrt_jax.train.config import load_run_config
from esrt_jax.train.optimizer import make_optimizer

def read_export(out: str | os.PathLike) -> dict:
    out = Path(out)
    f = out / ESRT_CONFIG
    if not f.is_file():
        raise ExportError(f"--import {out}: no {ESRT_CONFIG} (not an esrt-jax export directory)")
    try:
        ec = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ExportError(f"{f}: not valid JSON ({e})") from None
    if ec.get("format") != FORMAT:
        raise ExportError(f"{f}: format {ec.get('format')!r} is not {FORMAT!r}")
    if ec.get("version") != VERSION:
        raise ExportError(f"{f}: version {ec.get('version')!r} is not supported (this code reads {VERSION})")
    for key in ("run_config", "llm", "encoder", "adapter", "source"):
        if key not in ec:
            raise ExportError(f"{f}: missing key {key!r}")
    return ec


def import_config(out: str | os.PathLike, new_run_dir: str | os.PathLike) -> dict:
    """The run config of an export with the model paths pointing into OUT (a plain dict)."""
    out = Path(out).absolute()
    ec = read_export(out)
    cfg = copy.deepcopy(ec["run_config"])
    m = cfg.setdefault("model", {})
    enc = ec["encoder"]
    m["whisper"] = str(out / "encoder") if enc["format"] == "weights" else enc["path"]
    m.pop("whisper_config", None)
    llm = ec["llm"]
    if llm["format"] == "merged":
        m["llm"], m["tokenizer"] = str(out / "llm"), str(out / "llm")
    else:
        b = llm["base"]
        m["llm"] = str(out / "llm") if b["format"] == "weights" else b["path"]
        m["tokenizer"] = str(out / "llm" / "adapter")
        lo = llm["lora"]
        cfg["lora"] = {**cfg.get("lora", {}), "enabled": True, "rank": lo["rank"], "alpha": lo["alpha"],
                       "targets": list(lo["targets"])}
    m.pop("llm_config", None)
    m.pop("tokenizer_vocab", None)
    for st in (cfg.get("stages") or {}).values():  # stage overrides must not point elsewhere
        for k in ("whisper", "whisper_config", "llm", "llm_config", "tokenizer", "tokenizer_vocab"):
            (st.get("model") or {}).pop(k, None)
    cfg["run_dir"] = str(Path(new_run_dir).absolute())
    cfg.pop("stage", None)
    return cfg


def _check_finite(model, where: str) -> None:
    """Refuse NaN / Inf in any floating tensor of `model` (an imported model would decode to
    empty text with rc 0): names the first bad tensor."""
    bad = first_non_finite((p, v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model)))
    if bad is not None:
        raise ExportError(f"{where}: tensor {bad} holds NaN or Inf values; the export is damaged (re-export the run)")


def _read_safetensors(f: Path, out: Path) -> dict:
    if not f.is_file():
        raise ExportError(f"{out}: missing {f.relative_to(out)}")
    try:
        return load_file(str(f))
    except (SafetensorError, OSError) as e:
        raise ExportError(f"{f}: not a readable safetensors file (truncated or damaged?): "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def import_export(out: str | os.PathLike, new_run_dir: str | os.PathLike, *, data_state: bool = True,
                  log=print) -> Path:
    """OUT -> NEW_RUN_DIR/config.yaml + NEW_RUN_DIR/<stage>/checkpoints/<step>/ (Orbax). Returns the
    step dir.

    Everything is checked (config, every tensor's presence, shape and finiteness) before anything is
    written; on a failure while writing, the files this import made are removed again, an existing
    NEW_RUN_DIR/config.yaml is put back and a run dir this import created is removed: a failed
    import leaves the run dir as it found it."""
    out = Path(out).absolute()
    ec = read_export(out)
    new = Path(new_run_dir).absolute()
    stage, step = ec["source"]["stage"], int(ec["source"]["step"])
    ck_dir = new / stage / "checkpoints"
    if ck_dir.is_dir() and any(p.name.isdigit() for p in ck_dir.iterdir()):
        raise ExportError(f"--run {new}: {ck_dir} already holds checkpoints; import into a new run dir")
    if new.exists() and not new.is_dir():
        raise ExportError(f"--run {new}: exists and is not a directory")
    cfg_dict = import_config(out, new)
    cfg_text = ("# written by `python -m esrt_jax.export --import " + str(out) + "`\n"
                + yaml.safe_dump(cfg_dict, sort_keys=False, allow_unicode=True))
    # 1. check everything, writing nothing into the run dir (the config is validated from a temp copy)
    with tempfile.TemporaryDirectory(prefix="esrt-import-") as tmp:
        tmp_cfg = Path(tmp) / "config.yaml"
        tmp_cfg.write_text(cfg_text, encoding="utf-8")
        try:
            cfg = load_run_config(tmp_cfg).for_stage(stage)
        except ConfigError as e:
            raise ExportError(f"{out / ESRT_CONFIG}: its run config is invalid: {str(e).replace(str(tmp_cfg), 'config')}"
                              ) from None
    flat_adapter = _read_safetensors(out / "adapter" / "model.safetensors", out)
    try:
        model, _tok = inference_builder(cfg)(cfg)
    except SafetensorError as e:
        raise ExportError(f"{out}: a weights file is not readable safetensors (truncated or damaged?): "
                          f"{str(e).splitlines()[0]}") from None
    load_flat_params(model.adapter, flat_adapter, source=str(out / "adapter" / "model.safetensors"))
    if ec["llm"]["format"] == "peft":
        try:
            load_peft_adapter(model.llm, out / "llm" / "adapter")
        except SafetensorError as e:
            raise ExportError(f"{out / 'llm' / 'adapter'}: not readable safetensors (truncated or damaged?): "
                              f"{str(e).splitlines()[0]}") from None
    _check_finite(model, str(out))

    # The checkpoint holds exactly the trainable tree train.py builds for this config.
    abstract = cfg.model_builder()(cfg, abstract=True).trainable
    flat_state = {tuple(str(k) for k in p): v for p, v in nnx.to_flat_state(nnx.state(model))}

    def value(path, leaf):
        key = tuple(str(key_name(k)) for k in path)
        var = flat_state.get(key)
        if var is None:
            raise ExportError(f"trainable param {'/'.join(key)} of the config is not in the model")
        arr = jnp.asarray(var.get_value(), leaf.dtype)
        if arr.shape != tuple(leaf.shape):
            raise ExportError(f"trainable param {'/'.join(key)}: shape {arr.shape}, expected {leaf.shape}")
        return arr

    trainable = jax.tree_util.tree_map_with_path(value, abstract)
    opt_state = make_optimizer(cfg.train).init(trainable)
    data_iter = None
    if data_state:
        try:
            it = cfg.data_builder()(cfg, "train", process_index=0, process_count=1)
            data_iter = it if hasattr(it, "get_state") else None
        except Exception as e:  # noqa: BLE001 - the data may live elsewhere; the params still import
            log(f"note: no data-iterator state saved ({type(e).__name__}: {e}); resume with "
                f"--init-from {ck_dir} instead of rerunning the stage")

    # 2. write; on any failure undo what this import wrote
    with UndoOnFailure(new) as undo:
        cfg_path = new / "config.yaml"
        undo.keep(cfg_path)
        write_atomic(cfg_path, cfg_text.encode("utf-8"))
        undo.created(new / stage)
        undo.created(ck_dir / str(step))
        ck = Checkpointer(ck_dir, keep=max(cfg.train.keep, 1), async_save=False)
        try:
            ck.save(step, trainable, opt_state, rng=jax.random.key(cfg.train.seed), data_iter=data_iter,
                    meta={"stage": stage, "imported_from": str(out)})
            ck.wait()
        finally:
            ck.close()
        undo.keep(new / "IMPORTED_FROM.json")
        write_json(new / "IMPORTED_FROM.json", {"export": str(out), "source": ec["source"],
                                                 "trainable": sorted(path_str(p) for p, _ in
                                                                     jax.tree_util.tree_flatten_with_path(trainable)[0])})
    return ck_dir / str(step)
