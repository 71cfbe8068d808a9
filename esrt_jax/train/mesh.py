"""Device mesh (data x fsdp x tensor) and the logical-axis rules table.

Every parameter carries logical axis names (see esrt_jax/models/layers.py).
`esrt_jax.sharding.DEFAULT_RULES` maps each logical name to mesh axes; `spec_for` turns (shape, logical axes) into a
`PartitionSpec`, replicating a dimension when its size is not divisible by the mesh axes
(tiny test models, odd vocab sizes) and never using one mesh axis twice in a spec.
The same rules shard params, optimizer state (it mirrors the params) and batches
(leading `batch` axis over data x fsdp).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from esrt_jax import sharding
from esrt_jax.config import ConfigError
from esrt_jax.train.config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Resolve `data: -1`; errors name the mesh keys when the product does not fit."""
    fixed = cfg.fsdp * cfg.tensor
    if cfg.data == -1:
        if n_devices % fixed:
            raise ConfigError(f"mesh: fsdp*tensor = {cfg.fsdp}*{cfg.tensor} = {fixed} does not divide "
                              f"the {n_devices} available devices")
        return (n_devices // fixed, cfg.fsdp, cfg.tensor)
    total = cfg.data * fixed
    if total != n_devices:
        raise ConfigError(f"mesh: data*fsdp*tensor = {cfg.data}*{cfg.fsdp}*{cfg.tensor} = {total} "
                          f"but {n_devices} devices are available (set mesh.data=-1 to fill)")
    return (cfg.data, cfg.fsdp, cfg.tensor)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` over all (or the given) devices with axes (data, fsdp, tensor): `mesh_shape`, then
    `esrt_jax.sharding.make_mesh` (the one mesh builder)."""
    devices = list(devices) if devices is not None else jax.devices()
    return sharding.make_mesh(dict(zip(MESH_AXES, mesh_shape(cfg, len(devices)))), devices)


def make_rules(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`esrt_jax.sharding.DEFAULT_RULES` (the one table) with the config's `mesh.rules` on top."""
    rules = dict(sharding.DEFAULT_RULES)
    for k, v in (overrides or {}).items():
        rules[k] = tuple(v) if isinstance(v, list) else v
    for k, v in rules.items():
        for a in (v if isinstance(v, tuple) else (v,)):
            if a is not None and a not in MESH_AXES:
                raise ConfigError(f"mesh.rules.{k}: unknown mesh axis {a!r}; valid: {list(MESH_AXES)}")
    return rules


def _axis_size(mesh: Mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def spec_for(shape: Sequence[int], axes: Sequence[str | None] | None, mesh: Mesh,
             rules: Mapping[str, Any]) -> P:
    """PartitionSpec for an array of `shape` with logical `axes` under `rules`.

    Delegates to esrt_jax.sharding (one translation for loaders and training): each mesh
    axis used once per spec, size-1 axes dropped, non-divisible dims replicated.
    """
    if axes is not None and len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    try:
        return sharding.named_sharding(axes, shape, mesh, rules).spec
    except sharding.UnruledAxisError as e:  # the same error, named as the run config spells it
        raise ConfigError(f"logical axis {e.axis!r} has no sharding rule; add mesh.rules.{e.axis}") from None


def _is_axes(x) -> bool:
    return x is None or (isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x))


def tree_shardings(tree: Any, axes_tree: Any, mesh: Mesh, rules: Mapping[str, Any]) -> Any:
    """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs).

    `axes_tree` has the same structure with a tuple of logical names (or None) per leaf.
    """
    flat_axes, _ = jax.tree.flatten(axes_tree, is_leaf=_is_axes)
    leaves, treedef = jax.tree.flatten(tree)
    if len(flat_axes) != len(leaves):
        raise ValueError(f"axes tree has {len(flat_axes)} leaves, params have {len(leaves)}")
    shard = [NamedSharding(mesh, spec_for(l.shape, a, mesh, rules)) for l, a in zip(leaves, flat_axes)]
    return jax.tree.unflatten(treedef, shard)


def batch_sharding(mesh: Mesh, rules: Mapping[str, Any], leading: int = 1) -> NamedSharding:
    """Sharding of a batch leaf (A, B, ...) with `leading` unsharded dims before the batch dim."""
    tgt = rules.get("batch")
    tgt = () if tgt is None else (tgt if isinstance(tgt, tuple) else (tgt,))
    tgt = tuple(a for a in tgt if mesh.shape[a] > 1)
    spec = (None,) * leading + ((tgt if len(tgt) != 1 else tgt[0]) if tgt else None,)
    return NamedSharding(mesh, P(*spec))


def batch_divisor(mesh: Mesh, rules: Mapping[str, Any]) -> int:
    tgt = rules.get("batch")
    tgt = () if tgt is None else (tgt if isinstance(tgt, tuple) else (tgt,))
    return _axis_size(mesh, tgt)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def bytes_per_device(tree: Any, shardings: Any) -> int:
    """Bytes one device holds for `tree` (arrays or ShapeDtypeStructs) under `shardings`."""
    total = 0
    for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        shard = sh.shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total
