"""Logical axis names -> mesh axes.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv_heads`, `head_dim`,
`vocab`, `layers`, ...) in its `out_sharding` metadata. One rules table, a tuple of
`(logical_name, mesh_axis | tuple of mesh axes | None)` pairs, maps them onto a mesh
(`data`, `fsdp`, `tensor`). This module is the single place that translation happens, used by the
checkpoint loaders (to place each tensor directly on its devices) and by training.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxis = str | tuple[str, ...] | None
# A tuple of (logical, mesh axis) pairs, or a mapping logical -> mesh axis (train.mesh's form).
Rules = Sequence[tuple[str, MeshAxis]] | Mapping[str, MeshAxis]

# A sensible default for decoder LLMs: FSDP over the embedding dim, tensor parallel over
# heads / mlp / vocab. Axes absent from a mesh are dropped by `logical_to_mesh`.
DEFAULT_RULES: tuple[tuple[str, MeshAxis], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("q_len", None),
    ("enc_embed", None),
    ("conv_in", None),
    ("conv_k", None),
    ("kv", "tensor"),
    ("length", None),
    ("lora_rank", None),
)


class UnruledAxisError(ValueError):
    """A logical axis name the rules table has no entry for (`axis`): an error rather than a
    silent replication, so a new layer's axis name is never left unsharded by accident."""

    def __init__(self, axis: str):
        super().__init__(f"logical axis {axis!r} has no sharding rule (add ({axis!r}, mesh axis or None) "
                         f"to the rules)")
        self.axis = axis


def _check_rules(rules: Rules) -> dict[str, MeshAxis]:
    if isinstance(rules, Mapping):
        rules = tuple(rules.items())
    table: dict[str, MeshAxis] = {}
    for i, item in enumerate(rules):
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(f"sharding rule #{i} {item!r}: expected (logical_name, mesh_axis|None)")
        name, target = item
        if name in table:
            raise ValueError(f"sharding rules name logical axis {name!r} twice")
        table[name] = tuple(target) if isinstance(target, list) else target
    return table


def logical_to_mesh(axes: Sequence[str | None] | None, rules: Rules,
                    mesh: Mesh | None = None) -> PartitionSpec:
    """Logical axis names (one per array dim) -> a `PartitionSpec` of mesh axes.

    - None is replicated; a logical name without a rule raises `UnruledAxisError` (give it a
      rule, None to replicate).
    - A mesh axis already used by an earlier dim is not reused (a spec may name each mesh axis
      once), so e.g. `('embed', 'embed')` shards only the first dim.
    - With `mesh`, mesh axes the mesh does not have (or of size 1) are dropped, so one rules
      table serves every mesh shape.
    """
    if axes is None:
        return PartitionSpec()
    table = _check_rules(rules)
    used: set[str] = set()
    spec: list[Any] = []
    for name in axes:
        if name is not None and name not in table:
            raise UnruledAxisError(name)
        target = table[name] if name is not None else None
        if target is None:
            spec.append(None)
            continue
        names = (target,) if isinstance(target, str) else tuple(target)
        keep = []
        for m in names:
            if m in used:
                continue
            if mesh is not None and (m not in mesh.shape or mesh.shape[m] == 1):
                continue
            keep.append(m)
        used.update(keep)
        spec.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Replicate any dim whose size the assigned mesh axes do not divide (e.g. 2 kv heads on
    tensor=4), instead of failing: the weight is small and correctness beats a layout error."""
    out = []
    for i, entry in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        if entry is None:
            out.append(None)
            continue
        names = (entry,) if isinstance(entry, str) else tuple(entry)
        size = int(np.prod([mesh.shape[n] for n in names]))
        out.append(entry if shape[i] % size == 0 else None)
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def named_sharding(axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                   rules: Rules) -> NamedSharding:
    """`NamedSharding` for an array of `shape` whose dims carry logical `axes`."""
    return NamedSharding(mesh, fit_spec(logical_to_mesh(axes, rules, mesh), shape, mesh))


def variable_axes(var: Any) -> tuple[str | None, ...] | None:
    """Logical axes stored on an nnx Variable (metadata `out_sharding`), or None."""
    meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
    val = meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")
    return tuple(val) if val is not None else None


def make_mesh(shape: dict[str, int], devices: Iterable[jax.Device] | None = None) -> Mesh:
    """A mesh with named axes, e.g. `make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})`: every mesh
    of the project is built here (the trainer's `train.mesh.make_mesh` resolves its `MeshConfig`
    to a shape and calls this). Axes are `Auto` (jax.make_mesh defaults to Explicit)."""
    devs = list(devices) if devices is not None else jax.devices()
    n = int(np.prod(list(shape.values())))
    if n > len(devs):
        raise ValueError(f"mesh {shape} needs {n} devices, only {len(devs)} available")
    dims, names = tuple(shape.values()), tuple(shape)
    auto = (jax.sharding.AxisType.Auto,) * len(names)
    if devs == jax.devices():  # every device: let jax pick a topology-aware order
        return jax.make_mesh(dims, names, axis_types=auto)
    return Mesh(np.asarray(devs[:n]).reshape(dims), names, axis_types=auto)
