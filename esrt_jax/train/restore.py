"""Restoring a run's trained params: checkpoint discovery and writing a restored tree into a model.

`resolve_checkpoint` finds the checkpoints of a run dir / stage dir / step dir, `restore_trainable`
reads the trained params of one (the target tree comes from the config's model builder, built
abstractly) and `merge_params` writes them into a built NNX model. Loading a whole speech model
for inference (the service, edge, CLIs, export) is `esrt_jax.speech.load`, one layer up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from esrt_jax.pytree import key_name
from esrt_jax.train.checkpoint import restore_params
from esrt_jax.train.config import LLM_STAGES

SERVE_ORDER = LLM_STAGES[::-1]  # a run dir is served from its last finished stage


def _is_step_dir(p: Path) -> bool:
    return p.is_dir() and p.name.isdigit()


def resolve_checkpoint(checkpoint: str | Path) -> tuple[Path, str | None, int | None]:
    """A run dir, stage dir, stage `checkpoints/` dir or step dir -> (checkpoints dir, stage, step).

    A run dir resolves to its last stage (srt, then smt, then asr) that holds a checkpoint.
    """
    p = Path(checkpoint).expanduser().absolute()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    if _is_step_dir(p):
        ck, step = p.parent, int(p.name)
    elif p.name == "checkpoints":
        ck, step = p, None
    elif (p / "checkpoints").is_dir():
        ck, step = p / "checkpoints", None
    else:
        for stage in SERVE_ORDER:
            d = p / stage / "checkpoints"
            if d.is_dir() and any(_is_step_dir(c) for c in d.iterdir()):
                ck, step = d, None
                break
        else:
            raise FileNotFoundError(
                f"{p} is not a checkpoint: expected a run dir with <stage>/checkpoints/<step>/ "
                f"(stages {list(SERVE_ORDER)}), a stage dir, a checkpoints dir or a step dir")
    if not any(_is_step_dir(c) for c in ck.iterdir()) and step is None:
        raise FileNotFoundError(f"checkpoint folder {ck} holds no step folders")
    stage = ck.parent.name if ck.parent.name in SERVE_ORDER else None
    return ck, stage, step


def merge_params(model: nnx.Module, trained: Any) -> None:
    """Write a nested dict of trained arrays (paths as in `nnx.state(model)`) into `model`."""
    state = nnx.state(model)
    flat = dict(nnx.to_flat_state(state))
    n = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(trained)[0]:
        key = tuple(key_name(k) for k in path)
        var = flat.get(key)
        if var is None:  # orbax may give int keys back as strings
            key = tuple(int(k) if isinstance(k, str) and k.isdigit() else k for k in key)
            var = flat.get(key)
        if var is None:
            raise KeyError(f"checkpoint param {'/'.join(map(str, key))} does not exist in the model")
        if tuple(var.shape) != tuple(np.shape(leaf)):
            raise ValueError(f"checkpoint param {'/'.join(map(str, key))} has shape {np.shape(leaf)}, "
                             f"the model's is {tuple(var.shape)}")
        var.set_value(jax.numpy.asarray(leaf, var.dtype)) if hasattr(var, "set_value") else \
            setattr(var, "value", jax.numpy.asarray(leaf, var.dtype))
        n += 1
    nnx.update(model, nnx.from_flat_state(flat))
    if n == 0:
        raise ValueError("the checkpoint holds no params")


def restore_trainable(cfg, ck: Path, step: int | None = None) -> tuple[Any, int]:
    """The trained params of a checkpoint (nested dict, on one device) and their step; the
    target tree comes from the config's model builder, built abstractly."""
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev),
                          cfg.model_builder()(cfg, abstract=True).trainable)
    return restore_params(ck, target, step)
