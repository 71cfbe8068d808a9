"""Small helpers on nested-dict pytrees and batch arrays shared by training, restore, export and eval."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def key_name(k: Any) -> Any:
    """One entry of a `jax.tree_util` key path (DictKey, GetAttrKey, SequenceKey) -> its name."""
    return getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))


def path_str(path: Sequence[Any]) -> str:
    """A key path -> 'a/b/c' (the form `train.trainable` regexes match)."""
    return "/".join(str(key_name(p)) for p in path)


def merge_trees(a: dict, b: dict) -> dict:
    """Union of two nested dicts of arrays (e.g. trainable and frozen params); no copies."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge_trees(out[k], v) if k in out and isinstance(v, dict) else v
    return out


def rotate_rows(x, valid: Sequence[bool]):
    """Rows of a batch array (B, ...) with the valid rows rotated by one among themselves (row i
    gets the features of the next valid row): the dev loss/decode with swapped speech."""
    x = np.asarray(x)
    rows = np.flatnonzero(np.asarray(valid, bool))
    out = x.copy()
    if rows.size > 1:
        out[rows] = x[np.roll(rows, -1)]
    return out
