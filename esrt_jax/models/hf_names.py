"""The one shape of a Hugging Face <-> ours tensor-name map, shared by all model families.

Each family defines `hf_to_ours(cfg)` / `ours_to_hf(cfg)` next to its modules
(`llm_hf`, `whisper`, `qformer`): one `ParamMap` per HF tensor, pure (no file IO), so the
converters in `esrt_jax.convert` stream tensor by tensor and check names and shapes before
placing anything.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np


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
