"""The pure, jitted train step.

    train_step(trainable, opt_state, frozen, batch, rng) -> (trainable, opt_state, metrics)

`batch` leaves are (A, B/A, ...): A micro-batches of one optimizer step, scanned inside the
step (gradient accumulation without a host round trip). The loss is taken in f32. When the
loss or the gradient norm is NaN/Inf the step returns the *old* trainable params and
optimizer state (the inputs are donated, so this select has to happen inside the step) and
`metrics['finite'] = 0`; the loop then stops with a clear error, leaving the last good
checkpoint intact.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from esrt_jax.train.bundle import LossFn

SUMMED_AUX = ("tokens", "examples")  # aux keys that add up over micro-batches (others average)


class NonFiniteError(FloatingPointError):
    """The loss or gradients became NaN/Inf."""


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation) -> Callable:
    """Build the (unjitted) pure step function around `loss_fn`."""
    grad_fn = jax.value_and_grad(lambda t, f, b, r: _f32(loss_fn(t, f, b, r)), has_aux=True)

    def step(trainable, opt_state, frozen, batch, rng):
        n_micro = jax.tree.leaves(batch)[0].shape[0]
        if n_micro == 1:
            (loss, aux), grads = grad_fn(trainable, frozen, jax.tree.map(lambda x: x[0], batch),
                                         jax.random.fold_in(rng, 0))
        else:
            def micro(carry, xs):
                mb, i = xs
                (l, a), g = grad_fn(trainable, frozen, mb, jax.random.fold_in(rng, i))
                gsum, lsum, asum = carry
                return (jax.tree.map(jnp.add, gsum, g), lsum + l, jax.tree.map(jnp.add, asum, a)), None

            zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
            aux0 = jax.eval_shape(lambda: grad_fn(trainable, frozen, jax.tree.map(lambda x: x[0], batch),
                                                  rng)[0][1])
            zeros_a = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), aux0)
            (gsum, lsum, asum), _ = jax.lax.scan(
                micro, (zeros_g, jnp.zeros((), jnp.float32), zeros_a), (batch, jnp.arange(n_micro)))
            grads = jax.tree.map(lambda g, p: (g / n_micro).astype(p.dtype), gsum, trainable)
            loss = lsum / n_micro
            aux = {k: (v if k in SUMMED_AUX else v / n_micro) for k, v in asum.items()}
        gnorm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        updates, new_opt = optimizer.update(grads, opt_state, trainable)
        new_params = optax.apply_updates(trainable, updates)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_params = jax.tree.map(keep, new_params, trainable)
        new_opt = jax.tree.map(keep, new_opt, opt_state)
        metrics = {"loss": loss, "grad_norm": gnorm, "finite": finite.astype(jnp.int32), **aux}
        return new_params, new_opt, metrics

    return step


def make_eval_step(loss_fn: LossFn) -> Callable:
    """(trainable, frozen, batch (B, ...)) -> metrics; rng None = deterministic (no dropout)."""
    def evaluate(trainable, frozen, batch):
        loss, aux = _f32(loss_fn(trainable, frozen, batch, None))
        return {"loss": loss, **aux}
    return evaluate


def _f32(out):
    loss, aux = out
    return loss.astype(jnp.float32), {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}


def jit_train_step(step: Callable, shardings: dict[str, Any]) -> Callable:
    """jit with explicit in/out shardings; trainable params and optimizer state are donated.

    `shardings` has keys trainable, opt_state, frozen, batch, replicated.
    """
    s = shardings
    return jax.jit(step,
                   in_shardings=(s["trainable"], s["opt_state"], s["frozen"], s["batch"], s["replicated"]),
                   out_shardings=(s["trainable"], s["opt_state"], s["replicated"]),
                   donate_argnums=(0, 1))
