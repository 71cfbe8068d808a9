"""Small helpers on nested-dict pytrees shared by training, checkpoint restore and export."""

from __future__ import annotations

from typing import Any, Sequence


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
