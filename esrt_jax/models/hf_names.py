"""The one shape of a Hugging Face <-> ours tensor-name map, and the one way to apply it, shared
by all model families.

Each family defines `hf_to_ours(cfg)` / `ours_to_hf(cfg)` next to its modules
(`llm_hf`, `whisper`, `qformer`): one `ParamMap` per HF tensor, pure (no file IO), so the
converters in `esrt_jax.convert` stream tensor by tensor and check names and shapes before
placing anything. Every family applies its maps with the same three functions: `from_hf` (HF
tensors -> our slices, shapes checked), `to_hf` (our params -> HF tensors, fused ones joined) and
`flat_params` (any params tree -> {path: array}); each family only says where the slices go (numpy
buffers, dotted names, sharded device arrays) and which HF names it refuses or ignores.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from flax import nnx, traverse_util

from esrt_jax.config import CheckpointError


@dataclass(frozen=True)
class ParamMap:
    """One HF tensor <-> one slice of our params.

    hf_name: e.g. 'model.layers.3.self_attn.q_proj.weight' (relative to the family's prefix where
    the family has several); path: our nnx path, e.g. ('layers', 'self_attn', 'q_proj', 'kernel');
    layer: index into the leading stacked `layers` axis (None for unstacked params); transform:
    numpy function HF tensor -> our slice (`hf_to_ours`) or our slice -> HF tensor (`ours_to_hf`);
    shape: the output shape of transform; hf_shape: the HF tensor's shape (torch layout).
    hf_rows: (start, stop) when the HF tensor holds several of our tensors stacked along its first
    (torch out) axis (Phi-3's fused `qkv_proj`, `gate_up_proj`; `fuse_rows`): transform reads /
    writes rows start:stop only, hf_shape stays the whole tensor's. None: the whole tensor.
    """
    hf_name: str
    path: tuple[str, ...]
    layer: int | None
    transform: Callable[[np.ndarray], np.ndarray]
    shape: tuple[int, ...]
    hf_shape: tuple[int, ...]
    hf_rows: tuple[int, int] | None = None

    def hf_part(self, arr: np.ndarray) -> np.ndarray:
        """The part of the HF tensor `arr` this map reads (`hf_to_ours`)."""
        return arr if self.hf_rows is None else arr[self.hf_rows[0]:self.hf_rows[1]]


def fuse_rows(maps: list[ParamMap], fused: Mapping[str, Sequence[str]]) -> list[ParamMap]:
    """`maps` with the HF tensors named in `fused` (fused name -> its parts' names, in row order)
    replaced by row ranges of one fused tensor: the part maps keep their paths and transforms and
    get the fused name, `hf_rows` and the fused `hf_shape`. Parts must agree on all but the first
    axis. A family whose checkpoints fuse projections lists them here, once (`LLMConfig.HF_FUSED`)."""
    part_of = {part: (name, j) for name, parts in fused.items() for j, part in enumerate(parts)}
    by_name = {m.hf_name: m for m in maps}
    rows: dict[str, list[tuple[int, int]]] = {}
    for name, parts in fused.items():
        shapes = [by_name[p].hf_shape for p in parts]
        if len({s[1:] for s in shapes}) != 1:
            raise ValueError(f"fused tensor {name}: parts {list(parts)} differ beyond the first axis {shapes}")
        edges = np.cumsum([0] + [s[0] for s in shapes]).tolist()
        rows[name] = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
    out = []
    for m in maps:
        if m.hf_name not in part_of:
            out.append(m)
            continue
        name, j = part_of[m.hf_name]
        total = rows[name][-1][1]
        out.append(dataclasses.replace(m, hf_name=name, hf_rows=rows[name][j], hf_shape=(total,) + m.hf_shape[1:]))
    return out


def join_rows(parts: Iterable[tuple[ParamMap, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
    """(ours_to_hf map, its transformed array) -> (HF name, HF tensor): whole tensors as they come,
    a fused one (`hf_rows`) once all its row ranges have arrived, in row order."""
    pending: dict[str, list[tuple[tuple[int, int], np.ndarray]]] = {}
    for m, arr in parts:
        if m.hf_rows is None:
            yield m.hf_name, arr
            continue
        got = pending.setdefault(m.hf_name, [])
        got.append((m.hf_rows, arr))
        if sum(b - a for (a, b), _ in got) == m.hf_shape[0]:
            yield m.hf_name, np.concatenate([x for _, x in sorted(got, key=lambda t: t[0])], axis=0)
            del pending[m.hf_name]
    if pending:
        raise ValueError(f"fused HF tensor(s) missing row ranges: {sorted(pending)}")


def _same(a: np.ndarray) -> np.ndarray:
    return a


def _dense(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.T)


def _conv(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(2, 1, 0))


# Ours <-> torch layout for the families whose tensors differ only by a transpose (its own
# inverse, so one function serves both directions): Dense kernels are (in, out) vs torch
# (out, in); conv kernels (K, in, out) vs (out, in, K).
LAYOUTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"none": _same, "dense": _dense, "conv": _conv}


def layout_maps(entries: list[tuple[str, tuple[str, ...], int | None, str, tuple[int, ...]]],
                direction: str) -> list[ParamMap]:
    """(HF name, our path, layer, layout kind, our slice shape) -> `ParamMap`s for `direction`
    ('hf_to_ours' or 'ours_to_hf'), the HF shape being our shape in torch layout."""
    out = []
    for name, path, layer, kind, shape in entries:
        hf_shape = tuple(LAYOUTS[kind](np.empty(shape, dtype=np.int8)).shape)
        out.append(ParamMap(name, tuple(path), layer, LAYOUTS[kind],
                            tuple(shape) if direction == "hf_to_ours" else hf_shape, hf_shape))
    return out


def flat_params(params: Any, variables: Any = nnx.Param) -> dict[tuple[str, ...], Any]:
    """A module (its `variables`, an nnx filter), an `nnx.State`, a nested dict of arrays (e.g.
    restored by Orbax) or an already flat {path tuple: array} -> {path tuple of str: array}
    (Variables unwrapped; arrays left where they are, so a stacked device array is sliced before
    it is copied to the host)."""
    if isinstance(params, nnx.Module):
        params = nnx.state(params, variables)
    if isinstance(params, nnx.State):
        items = nnx.to_flat_state(params)
    elif isinstance(params, Mapping) and params and all(isinstance(k, tuple) for k in params):
        items = params.items()
    else:
        items = traverse_util.flatten_dict(params).items()
    return {tuple(map(str, k)): (v[...] if isinstance(v, nnx.Variable) else v) for k, v in items}


def from_hf(maps: Sequence[ParamMap], items: Iterable[tuple[str, np.ndarray]], *, prefix: str = "",
            where: str = "checkpoint") -> Iterator[tuple[ParamMap, np.ndarray]]:
    """(HF name, tensor) stream -> (map, the slice in our layout) for each `hf_to_ours` map that
    reads the tensor (a fused one feeds several), in stream order: the one weight-application step
    of every family. Map names are relative to `prefix`; names not under it or without a map are
    skipped (the family decides which to refuse). Each tensor's shape is checked against the map's
    `hf_shape` before the transform: CheckpointError naming the tensor and our parameter."""
    by_name: dict[str, list[ParamMap]] = {}
    for m in maps:
        by_name.setdefault(prefix + m.hf_name, []).append(m)
    for name, arr in items:
        for m in by_name.get(name, ()):
            arr = np.asarray(arr)
            if tuple(arr.shape) != tuple(m.hf_shape):
                raise CheckpointError(
                    f"{where}: tensor {name} has shape {tuple(arr.shape)}, expected {tuple(m.hf_shape)}, which "
                    f"does not fit {'/'.join(m.path)} {tuple(m.shape)} of this config (check config.json)")
            yield m, m.transform(m.hf_part(arr))


def to_hf(maps: Sequence[ParamMap], flat: Mapping[tuple[str, ...], Any], *, prefix: str = "",
          where: str = "export") -> Iterator[tuple[str, np.ndarray]]:
    """Our params (`flat_params`) -> (prefix + HF name, numpy tensor in torch layout) for each
    `ours_to_hf` map, streamed (each slice copied to the host alone); a fused HF tensor once all its
    parts are there (`join_rows`). A parameter the maps need and `flat` lacks, or a slice of the
    wrong shape, is a CheckpointError naming both."""
    def parts():
        for m in maps:
            if m.path not in flat:
                raise CheckpointError(f"{where}: our params lack {'/'.join(m.path)} (needed for {prefix + m.hf_name})")
            arr = flat[m.path]
            a = np.ascontiguousarray(m.transform(np.asarray(arr if m.layer is None else arr[m.layer])))
            if tuple(a.shape) != tuple(m.shape):
                raise CheckpointError(f"{where}: {'/'.join(m.path)} gives {prefix}{m.hf_name} of shape "
                                      f"{a.shape}, expected {tuple(m.shape)}")
            yield dataclasses.replace(m, hf_name=prefix + m.hf_name), a
    yield from join_rows(parts())
