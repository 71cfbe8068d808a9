"""AdamW with warm-up + linear/cosine decay and global-norm clipping (optax).

Gradient accumulation is not an optimizer wrapper here: the train step (step.py) scans
over micro-batches inside one jitted call and applies one update, so "step" always means
"optimizer update" (schedules, checkpoints and logs agree). Only the trainable pytree is
given to `init`, so frozen weights get neither gradients nor optimizer state.
"""

from __future__ import annotations

import re

import jax
import optax

from esrt_jax.config import ConfigError
from esrt_jax.pytree import path_str
from esrt_jax.train.config import TrainConfig


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    """lr(step): linear warm-up 0 -> lr over warmup_steps, then decay to end_lr at `steps`."""
    warm = min(cfg.warmup_steps, cfg.steps)
    decay = max(cfg.steps - warm, 1)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.lr, cfg.end_lr, decay)
    else:
        after = optax.cosine_decay_schedule(cfg.lr, decay, alpha=cfg.end_lr / cfg.lr)
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), after], [warm])


def make_optimizer(cfg: TrainConfig, trainable=None) -> optax.GradientTransformation:
    """AdamW of `cfg`; given the `trainable` pytree, first checks that every `cfg.lr_scale` regex
    matches one of its params (a typo would otherwise train that group at the full lr)."""
    if cfg.lr_scale and trainable is not None:
        paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(trainable)]
        for pat in cfg.lr_scale:
            if not any(re.search(pat, s) for s in paths):
                raise ConfigError(f"train.lr_scale: {pat!r} matches no trainable param; "
                                  f"they look like: {', '.join(paths[:4])} ...")
    sched = make_schedule(cfg)
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
    if cfg.lr_scale:
        parts.append(scale_by_path(cfg.lr_scale))
    return optax.chain(*parts)


def scale_by_path(factors: dict[str, float]) -> optax.GradientTransformation:
    """Multiply each update by the factor of the first regex (re.search over the param's 'a/b/c'
    path) that matches it, 1 if none: per-group learning rates after AdamW."""
    pats = [(re.compile(p), f) for p, f in factors.items()]

    def update(updates, state, params=None):
        def scale(path, u):
            s = path_str(path)
            return u * next((f for p, f in pats if p.search(s)), 1.0)
        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
