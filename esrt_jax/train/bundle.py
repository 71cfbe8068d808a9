"""The narrow interface between a model and the training infrastructure.

A model builder (config `model.builder: "pkg.module:function"`) returns a `TrainBundle`:
pure pytrees of trainable and frozen params (nested dicts of arrays, or
`jax.ShapeDtypeStruct`s when built abstractly for a dry run), the logical axis names of
every leaf, and a pure loss function

    loss_fn(trainable, frozen, batch, rng) -> (loss: f32 scalar, aux: dict of scalars)

`aux` may contain `tokens` (number of target tokens in the batch, for tokens/s) and any
other scalar metrics (accuracy, ...). Batches are dicts of arrays whose leading dim is the
batch. `split_nnx` builds such a bundle from any Flax NNX module.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Any, Callable, Hashable, Iterable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from esrt_jax.pytree import merge_trees, path_str

LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, dict]]


@dataclasses.dataclass
class TrainBundle:
    loss_fn: LossFn
    trainable: Any
    frozen: Any
    trainable_axes: Any
    frozen_axes: Any
    # Optional hooks.
    eval_fn: LossFn | None = None                         # dev loss; defaults to loss_fn
    decode_fn: Callable[..., dict] | None = None          # (trainable, frozen, examples) -> report
    flops_per_example: float | None = None                # model FLOPs fwd+bwd per example
    # Batch keys holding the speech input: the dev loss is also taken with them shuffled
    # across rows (`dev_loss_shuffled`, `dev_audio_gap`), which shows whether the model listens.
    speech_keys: tuple[str, ...] = ()
    # (dev batch) -> each row's reference (hashable; None: a padding row): rows that share one never
    # swap speech (`pytree.swap_partners`). Without it every row counts as its own reference.
    row_refs: Callable[[dict], Sequence[Hashable | None]] | None = None
    # (rows) -> dict of jax.ShapeDtypeStruct: one batch's shapes, for the dry run.
    batch_spec: Callable[[int], dict] | None = None
    info: dict = dataclasses.field(default_factory=dict)  # printed at start (sizes, names)


def import_object(spec: str, key: str = "builder") -> Any:
    """'pkg.module:attr' -> the attribute, with an error naming the config key."""
    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ImportError(f"{key}: cannot import module {mod_name!r} ({e})") from None
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise ImportError(f"{key}: module {mod_name!r} has no attribute {attr!r}") from None



def _axes_of(var: nnx.Variable):
    ax = var.get_metadata().get("out_sharding") if hasattr(var, "get_metadata") else None
    return tuple(ax) if ax is not None else None


def split_nnx(model: nnx.Module, trainable: Sequence[str] | Callable[[str], bool],
              module_loss: Callable[[nnx.Module, dict, jax.Array], tuple[jax.Array, dict]],
              *, frozen_dtype: Any = None) -> tuple[TrainBundle, Any]:
    """Partition an NNX module's params into trainable / frozen pure pytrees.

    `trainable` is a list of regexes matched (re.search) against '/'-joined param paths, or
    a predicate on that string. Non-Param variables (e.g. RNG counts) are frozen. Frozen
    float params are cast to `frozen_dtype` if given (bf16 halves their memory).
    Returns (bundle, graphdef).
    """
    if callable(trainable):
        pred = trainable
    else:
        pats = [re.compile(p) for p in trainable]
        pred = lambda s: any(p.search(s) for p in pats)  # noqa: E731

    graphdef, state = nnx.split(model)
    flat = list(nnx.to_flat_state(state))
    t_paths = [p for p, v in flat if isinstance(v, nnx.Param) and pred(path_str(p))]
    if not t_paths:
        names = ", ".join(path_str(p) for p, _ in flat[:8])
        raise ValueError(f"no parameter matches the trainable patterns {trainable!r}; "
                         f"params look like: {names} ...")
    tset = set(t_paths)

    def tree(sel, fn):
        out: dict = {}
        for p, v in flat:
            if sel(p):
                node = out
                for k in p[:-1]:
                    node = node.setdefault(k, {})
                node[p[-1]] = fn(v)
        return out

    def value(v, cast):
        x = v.get_value() if hasattr(v, "get_value") else v.value
        if cast is not None and jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(cast) if not isinstance(x, jax.ShapeDtypeStruct) else \
                jax.ShapeDtypeStruct(x.shape, cast, sharding=x.sharding)
        return x

    tr = tree(lambda p: p in tset, lambda v: value(v, None))
    fr = tree(lambda p: p not in tset, lambda v: value(v, frozen_dtype))
    tr_axes = tree(lambda p: p in tset, _axes_of)
    fr_axes = tree(lambda p: p not in tset, _axes_of)
    # Abstract template: holding the original arrays here would pin a second copy in memory.
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), state)

    def loss_fn(trainable, frozen, batch, rng):
        full = merge_trees(trainable, frozen)
        st = jax.tree.map(lambda x: x, template)
        nnx.replace_by_pure_dict(st, full)
        m = nnx.merge(graphdef, st)
        return module_loss(m, batch, rng)

    return TrainBundle(loss_fn=loss_fn, trainable=tr, frozen=fr, trainable_axes=tr_axes,
                       frozen_axes=fr_axes), graphdef


def count_params(tree: Any) -> int:
    return sum(int(x.size) if hasattr(x, "size") else int(jnp.size(x)) for x in jax.tree.leaves(tree))


def flat_paths(tree: Any) -> Iterable[str]:
    for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        yield path_str(p)
