"""Plan a run without the hardware: abstract params, AOT compile, per-device memory.

The model builder is called with `abstract=True` (params as ShapeDtypeStructs via
`nnx.eval_shape`, no weights read), the train step is lowered and compiled ahead of time
for the configured mesh on (simulated) devices, and we report per device: trainable and
frozen params, optimizer state, the compiled step's temporaries and a peak estimate, plus
model FLOPs per step (XLA cost analysis, summed over devices).
"""

from __future__ import annotations

import time

import jax

from esrt_jax.train.bundle import TrainBundle, count_params
from esrt_jax.train.checkpoint import abstract_like
from esrt_jax.train.config import RunConfig
from esrt_jax.train.loop import GiB, memory_report, stage_layout, step_flops, with_frozen_dtype
from esrt_jax.train.step import jit_train_step, make_train_step


def dry_run(cfg: RunConfig, bundle: TrainBundle, mesh=None) -> dict:
    """Compile the train step for `cfg` on abstract params; returns (and prints) the report."""
    if bundle.batch_spec is None:
        raise ValueError("dry run: the model builder's bundle has no batch_spec(rows) to shape a batch")
    tc = cfg.train
    bundle = with_frozen_dtype(bundle, tc)
    layout = stage_layout(cfg, bundle, mesh)
    mesh, optimizer, sh = layout.mesh, layout.optimizer, layout.sh
    micro = tc.batch_size // tc.grad_accum
    spec = bundle.batch_spec(micro)
    batch = {k: jax.ShapeDtypeStruct((tc.grad_accum, *v.shape), v.dtype, sharding=sh["batch"])
             for k, v in spec.items()}
    args = (abstract_like(bundle.trainable, sh["trainable"]),
            abstract_like(sh["abstract_opt"], sh["opt_state"]),
            abstract_like(bundle.frozen, sh["frozen"]), batch,
            jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sh["replicated"]))
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jit_train_step(make_train_step(bundle.loss_fn, optimizer), sh).lower(*args).compile()
    rep = memory_report(compiled, sh, bundle.trainable, bundle.frozen, sh["abstract_opt"])
    rep_flops = step_flops(compiled, mesh.devices.size, bundle, tc.batch_size)
    out = {"mesh": dict(mesh.shape), "batch_size": tc.batch_size, "grad_accum": tc.grad_accum,
           "trainable_params": count_params(bundle.trainable), "frozen_params": count_params(bundle.frozen),
           "compile_s": time.perf_counter() - t0, "per_device_bytes": rep, "flops_per_step": rep_flops}
    print(f"[dry-run {cfg.stage}] mesh {out['mesh']} ({mesh.devices.size} devices, "
          f"{mesh.devices.flat[0].platform}); batch {tc.batch_size} x accum {tc.grad_accum}; "
          f"trainable {out['trainable_params']:,} params, frozen {out['frozen_params']:,}; "
          f"compiled in {out['compile_s']:.1f}s")
    for k, v in rep.items():
        print(f"[dry-run {cfg.stage}]   {k:18s} {v / GiB:10.3f} GiB per device")
    print(f"[dry-run {cfg.stage}]   model FLOPs/step   {rep_flops / 1e12:10.3f} TFLOP "
          f"(~{rep_flops / max(tc.batch_size, 1) / 1e9:.1f} GFLOP per example)")
    return out
