"""The one shape of a Hugging Face <-> ours tensor-name map, shared by all model families.

Each family defines `hf_to_ours(cfg)` / `ours_to_hf(cfg)` next to its modules
(`llm_hf`, `whisper`, `qformer`): one `ParamMap` per HF tensor, pure (no file IO), so the
converters in `esrt_jax.convert` stream tensor by tensor and check names and shapes before
placing anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class ParamMap:
    """One HF tensor <-> one slice of our params.

    hf_name: e.g. 'model.layers.3.self_attn.q_proj.weight' (relative to the family's prefix where
    the family has several); path: our nnx path, e.g. ('layers', 'self_attn', 'q_proj', 'kernel');
    layer: index into the leading stacked `layers` axis (None for unstacked params); transform:
    numpy function HF tensor -> our slice (`hf_to_ours`) or our slice -> HF tensor (`ours_to_hf`);
    shape: the output shape of transform; hf_shape: the HF tensor's shape (torch layout).
    """
    hf_name: str
    path: tuple[str, ...]
    layer: int | None
    transform: Callable[[np.ndarray], np.ndarray]
    shape: tuple[int, ...]
    hf_shape: tuple[int, ...]


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
