"""Small helpers on nested-dict pytrees and batch arrays shared by training, restore, export and eval."""

from __future__ import annotations

from typing import Any, Hashable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def key_name(k: Any) -> Any:
    """One entry of a `jax.tree_util` key path (DictKey, GetAttrKey, SequenceKey) -> its name."""
    return getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))


def path_str(path: Sequence[Any]) -> str:
    """A key path -> 'a/b/c' (the form `train.trainable` regexes match)."""
    return "/".join(str(key_name(p)) for p in path)


def first_non_finite(leaves: Iterable[tuple[Sequence[Any], Any]]) -> str | None:
    """The path ('a/b/c') of the first floating array among `(key path, array)` pairs that holds NaN or
    Inf, else None. Reduced on device (works on sharded arrays)."""
    for path, v in leaves:
        if hasattr(v, "dtype") and jnp.issubdtype(v.dtype, jnp.floating) and not bool(jnp.isfinite(v).all()):
            return path_str(path)
    return None


def merge_trees(a: dict, b: dict) -> dict:
    """Union of two nested dicts of arrays (e.g. trainable and frozen params); no copies."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge_trees(out[k], v) if k in out and isinstance(v, dict) else v
    return out


def swap_partners(refs: Sequence[Hashable | None], groups: Sequence[Hashable] | None = None) -> np.ndarray:
    """The listening check's swap rule: (n,) int64 `p`, row i is given the speech of row p[i].

    Within each group (rows in order; one group when `groups` is None), row i takes the first row
    from i + max(m // 2, 1) on (cyclically, m rows in the group) whose reference differs from its
    own, so that a listening model cannot score by chance (the same sentence by another voice);
    half a group away rather than the next row because neighbours in a file are often the same
    article. When every reference of the group is the same, the row at i + max(m // 2, 1). A row
    whose reference is None (a padding row) keeps its own speech and is nobody's partner; so does
    the only row of a group. `refs` are compared with == (pass normalised text).
    """
    n = len(refs)
    if groups is not None and len(groups) != n:
        raise ValueError(f"swap_partners: {n} references but {len(groups)} groups")
    out = np.arange(n, dtype=np.int64)
    members: dict[Hashable, list[int]] = {}
    for i, r in enumerate(refs):
        if r is not None:
            members.setdefault(None if groups is None else groups[i], []).append(i)
    for idx in members.values():
        m = len(idx)
        shift = max(m // 2, 1)
        for j, i in enumerate(idx):
            cands = (idx[(j + shift + k) % m] for k in range(m))
            out[i] = next((c for c in cands if c != i and refs[c] != refs[i]), idx[(j + shift) % m])
    return out


def swap_rows(batch: dict, keys: Iterable[str], partners: np.ndarray) -> dict:
    """A batch dict (arrays of leading dim B) with the arrays under `keys` taken row-wise from
    `partners` ((B,) from `swap_partners`), the rest as they are: the swapped-speech batch."""
    keys = set(keys)
    return {k: np.asarray(v)[partners] if k in keys else v for k, v in batch.items()}
