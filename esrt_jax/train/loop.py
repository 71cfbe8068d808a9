"""One training stage: place params on the mesh, resume, compile, step, log, checkpoint.

`run_stage` is generic over a `TrainBundle` (bundle.py) and a data factory returning a
Grain iterator (anything with `__next__`, `get_state`, `set_state`) that yields this
process's share of each global batch as a dict of numpy arrays (rows, ...).

Exact resume: the step RNG is `fold_in(key(seed), step)`, the data iterator state is part
of every checkpoint, and the loop never reads ahead of the step it runs, so a rerun after
kill -9 continues from the last checkpoint with identical batches and identical losses.
The metrics JSONL is truncated to the restored step so it reads as one uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tensorboardX import SummaryWriter
from tqdm import tqdm

from esrt_jax.train import mesh as mesh_lib
from esrt_jax.train.bundle import TrainBundle, count_params, path_str
from esrt_jax.train.checkpoint import Checkpointer, abstract_like
from esrt_jax.train.config import RunConfig
from esrt_jax.train.optimizer import make_optimizer, make_schedule
from esrt_jax.train.step import NonFiniteError, jit_train_step, make_eval_step, make_train_step

GiB = 1024 ** 3


@dataclasses.dataclass
class StageResult:
    stage: str | None
    stage_dir: Path
    final_step: int
    losses: dict[int, float]           # step -> train loss, from the (truncated) JSONL
    dev: dict[str, float]
    resumed_from: int | None
    skipped: bool = False              # the stage had already finished


def log0(*args) -> None:
    if jax.process_index() == 0:
        print(*args, flush=True)


def to_global(tree: Any, shardings: Any) -> Any:
    """Host values (identical on every process) -> global arrays with `shardings`."""
    def put(x, s):
        if isinstance(x, jax.Array) and x.sharding == s:
            return x
        if isinstance(x, jax.Array) and x.is_fully_addressable and jax.process_count() == 1:
            return jax.device_put(x, s)
        a = np.asarray(x)
        return jax.make_array_from_callback(a.shape, s, lambda idx: a[idx])
    return jax.tree.map(put, tree, shardings)


def host_batch_to_global(batch: dict, n_micro: int, sharding) -> dict:
    """This process's rows (b, ...) -> global arrays (A, B/A, ...) sharded over the batch axis."""
    def put(x):
        x = np.asarray(x)
        if x.shape[0] % n_micro:
            raise ValueError(f"per-process batch of {x.shape[0]} rows is not divisible by "
                             f"grad_accum={n_micro}")
        x = x.reshape(n_micro, x.shape[0] // n_micro, *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x)
    return {k: put(v) for k, v in batch.items()}


def cast_floats(tree: Any, dtype) -> Any:
    def c(x):
        if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
            return x.astype(dtype) if not isinstance(x, jax.ShapeDtypeStruct) else \
                jax.ShapeDtypeStruct(x.shape, dtype, sharding=getattr(x, "sharding", None))
        return x
    return jax.tree.map(c, tree)


def with_frozen_dtype(bundle: TrainBundle, tc) -> TrainBundle:
    """The one place `train.frozen_dtype` is applied: the frozen float params cast to it (bf16
    halves their memory); model builders leave them in their own dtype."""
    if tc.frozen_dtype == "float32":
        return bundle
    return dataclasses.replace(bundle, frozen=cast_floats(bundle.frozen, jnp.dtype(tc.frozen_dtype)))


class MetricsWriter:
    """metrics.jsonl (+ TensorBoard events via tensorboardX) on process 0."""

    def __init__(self, stage_dir: Path, truncate_after: int | None, tensorboard: bool = True):
        self.path = stage_dir / "metrics.jsonl"
        self.enabled = jax.process_index() == 0
        self.tb = None
        if not self.enabled:
            return
        stage_dir.mkdir(parents=True, exist_ok=True)
        keep = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line torn by kill -9
                    continue
                if truncate_after is not None and rec.get("step", 0) <= truncate_after:
                    keep.append(line)
        self.path.write_text("".join(l + "\n" for l in keep))
        self.f = open(self.path, "a")
        if tensorboard:
            try:
                self.tb = SummaryWriter(str(stage_dir / "tb"), purge_step=(truncate_after or 0) + 1)
            except ImportError:
                self.tb = None

    def write(self, rec: dict) -> None:
        if not self.enabled:
            return
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, rec["step"])

    def close(self) -> None:
        if self.enabled:
            self.f.close()
            if self.tb is not None:
                self.tb.close()


def read_losses(stage_dir: Path) -> dict[int, float]:
    path = Path(stage_dir) / "metrics.jsonl"
    out: dict[int, float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in rec:
                out[rec["step"]] = rec["loss"]
    return out


def stage_shardings(bundle: TrainBundle, optimizer, mesh, rules) -> dict:
    t_sh = mesh_lib.tree_shardings(bundle.trainable, bundle.trainable_axes, mesh, rules)
    f_sh = mesh_lib.tree_shardings(bundle.frozen, bundle.frozen_axes, mesh, rules)
    rep = mesh_lib.replicated(mesh)
    abstract_t = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), bundle.trainable)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_t)
    o_sh = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, t_sh,
                                 transform_non_params=lambda _: rep)
    return {"trainable": t_sh, "frozen": f_sh, "opt_state": o_sh, "replicated": rep,
            "batch": mesh_lib.batch_sharding(mesh, rules, leading=1),
            "eval_batch": mesh_lib.batch_sharding(mesh, rules, leading=0),
            "abstract_opt": abstract_opt}


def memory_report(compiled, sh: dict, trainable: Any, frozen: Any, opt_abstract) -> dict:
    """Per-device bytes of params, optimizer state, and the compiled step's buffers."""
    ma = compiled.memory_analysis()
    rep = {
        "trainable_params": mesh_lib.bytes_per_device(trainable, sh["trainable"]),
        "frozen_params": mesh_lib.bytes_per_device(frozen, sh["frozen"]),
        "optimizer_state": mesh_lib.bytes_per_device(opt_abstract, sh["opt_state"]),
    }
    if ma is not None:
        rep.update(arguments=ma.argument_size_in_bytes, outputs=ma.output_size_in_bytes,
                   aliased=ma.alias_size_in_bytes, temporaries=ma.temp_size_in_bytes)
        rep["peak_estimate"] = (ma.argument_size_in_bytes + ma.output_size_in_bytes
                                - ma.alias_size_in_bytes + ma.temp_size_in_bytes)
    return rep


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.2f}{unit}"
        n /= 1024
    return f"{n:.2f}GiB"


def format_memory(rep: dict) -> str:
    return "  ".join(f"{k}={human_bytes(v)}" for k, v in rep.items())


def step_flops(compiled, n_devices: int, bundle: TrainBundle, batch_size: int) -> float:
    """Model FLOPs per optimizer step: the bundle's figure, else XLA's cost analysis."""
    if bundle.flops_per_example:
        return bundle.flops_per_example * batch_size
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return float(ca.get("flops", 0.0)) * n_devices  # cost analysis is per device
    except Exception:  # noqa: BLE001 - some backends have no cost analysis
        return 0.0


def run_stage(cfg: RunConfig, bundle: TrainBundle, *, stage_dir: str | Path,
              make_data: Callable[[], Any], make_dev: Callable[[], Iterable[dict]] | None = None,
              init_params: Any = None, mesh=None) -> StageResult:
    """Train one stage to `cfg.train.steps`, resuming from `stage_dir/checkpoints` if present."""
    tc = cfg.train
    stage_dir = Path(stage_dir)
    mesh = mesh or mesh_lib.make_mesh(cfg.mesh)
    rules = mesh_lib.make_rules(cfg.mesh.rules)
    gb = tc.batch_size
    div = mesh_lib.batch_divisor(mesh, rules) * tc.grad_accum
    if gb % div:
        raise ValueError(f"train.batch_size={gb} must be divisible by grad_accum x data x fsdp = {div}")
    if gb % jax.process_count():
        raise ValueError(f"train.batch_size={gb} must be divisible by the {jax.process_count()} processes")

    bundle = with_frozen_dtype(bundle, tc)
    if init_params is not None:
        want = sorted(path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(bundle.trainable)[0])
        got = sorted(path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(init_params)[0])
        if want != got:
            missing = sorted(set(want) - set(got))[:5]
            extra = sorted(set(got) - set(want))[:5]
            raise ValueError(f"init params do not match the trainable set: missing {missing}, extra {extra}")
        bundle = dataclasses.replace(bundle, trainable=init_params)

    optimizer = make_optimizer(tc)
    schedule = make_schedule(tc)
    sh = stage_shardings(bundle, optimizer, mesh, rules)
    log0(f"[{cfg.stage}] mesh {dict(mesh.shape)} on {jax.device_count()} devices, "
         f"{jax.process_count()} process(es); trainable {count_params(bundle.trainable):,} params, "
         f"frozen {count_params(bundle.frozen):,}")

    with jax.set_mesh(mesh):
        trainable = to_global(bundle.trainable, sh["trainable"])
        frozen = to_global(bundle.frozen, sh["frozen"])
        bundle = dataclasses.replace(bundle, trainable=None, frozen=None)  # drop host copies
        opt_state = jax.jit(optimizer.init, out_shardings=sh["opt_state"])(trainable)

        ckpt = Checkpointer(stage_dir / "checkpoints", keep=tc.keep, async_save=tc.async_ckpt)
        data_iter = make_data()
        start = 0
        res = ckpt.restore_latest(abstract_like(trainable, sh["trainable"]),  # skips unreadable steps
                                  abstract_like(opt_state, sh["opt_state"]),
                                  data_iter if hasattr(data_iter, "get_state") else None)
        latest = None if res is None else int(res["meta"]["step"])
        if res is not None:
            trainable, opt_state, start = res["params"], res["opt"], latest
            log0(f"[{cfg.stage}] resumed from {ckpt.directory}/{latest} (step {start})")
        writer = MetricsWriter(stage_dir, truncate_after=start)
        if start >= tc.steps:
            log0(f"[{cfg.stage}] already complete at step {start}; nothing to do")
            writer.close()
            ckpt.close()
            return StageResult(cfg.stage, stage_dir, start, read_losses(stage_dir), {}, latest, skipped=True)

        step_fn = jit_train_step(make_train_step(bundle.loss_fn, optimizer), sh)
        base_key = jax.random.key(tc.seed)
        compiled_steps: dict = {}
        flops_by_shape: dict = {}

        def compiled_for(batch):
            """AOT-compiled step per batch shape (text buckets give a few shapes)."""
            key = tuple((k, v.shape, str(v.dtype)) for k, v in sorted(batch.items()))
            if key not in compiled_steps:
                t0 = time.perf_counter()
                c = step_fn.lower(trainable, opt_state, frozen, batch, base_key).compile()
                shapes = {k: tuple(v.shape) for k, v in batch.items()}
                log0(f"[{cfg.stage}] compiled train step for batch {shapes} in {time.perf_counter() - t0:.1f}s")
                if not compiled_steps:
                    rep = memory_report(c, sh, trainable, frozen, sh["abstract_opt"])
                    log0(f"[{cfg.stage}] per-device memory: {format_memory(rep)}")
                compiled_steps[key] = c
                flops_by_shape[key] = step_flops(c, jax.device_count(), bundle, gb)
            return compiled_steps[key], flops_by_shape[key]

        first = host_batch_to_global(next(data_iter), tc.grad_accum, sh["batch"])
        compiled_for(first)

        eval_fn = None
        if make_dev is not None:
            eval_fn = jax.jit(make_eval_step(bundle.eval_fn or bundle.loss_fn),
                              in_shardings=(sh["trainable"], sh["frozen"], sh["eval_batch"]),
                              out_shardings=sh["replicated"])

        def dev_eval(step: int) -> dict:
            if eval_fn is None:
                return {}
            tot: dict[str, float] = {}
            n = 0
            for i, b in enumerate(make_dev()):
                if i >= tc.eval_batches:
                    break
                runs = [("", b)]
                if bundle.speech_keys:
                    # The same batch with each row's speech taken from the next row: a model
                    # that ignores its speech input has the same loss (no gap).
                    runs.append(("_shuffled", {k: np.roll(v, 1, axis=0) if k in bundle.speech_keys else v
                                               for k, v in b.items()}))
                for suffix, bb in runs:
                    gb_ = {k: jax.make_array_from_process_local_data(sh["eval_batch"], np.asarray(v))
                           for k, v in bb.items()}
                    m = jax.device_get(eval_fn(trainable, frozen, gb_))
                    for k, v in m.items():
                        if suffix and k not in ("loss", "accuracy"):
                            continue
                        tot[k + suffix] = tot.get(k + suffix, 0.0) + float(v)
                n += 1
            out = {f"dev_{k}": v / max(n, 1) for k, v in tot.items()}
            if "dev_loss_shuffled" in out and "dev_loss" in out:
                out["dev_audio_gap"] = out["dev_loss_shuffled"] - out["dev_loss"]
            writer.write({"step": step, **out})
            log0(f"[{cfg.stage}] step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in out.items()))
            return out

        def dev_decode(step: int) -> dict:
            if bundle.decode_fn is None:
                return {}
            if jax.process_count() > 1:  # the Translator works on host-local arrays
                log0(f"[{cfg.stage}] dev decode skipped in multi-process runs (use eval.py on the checkpoint)")
                return {}
            rep = bundle.decode_fn(trainable, frozen, tc.decode_samples)
            for line in rep.get("samples", []):
                log0(f"[{cfg.stage}]   {line}")
            scores = {k: float(v) for k, v in rep.items() if isinstance(v, (int, float))}
            writer.write({"step": step, **{f"dev_{k}": v for k, v in scores.items()}})
            if scores:
                log0(f"[{cfg.stage}] step {step} decode: " + " ".join(f"{k}={v:.2f}" for k, v in scores.items()))
            return scores

        bar = None
        if tc.progress and jax.process_index() == 0:
            bar = tqdm(total=tc.steps, initial=start, desc=cfg.stage or "train", file=sys.stderr,
                       dynamic_ncols=True, mininterval=1.0)
        pending: list[tuple[int, dict]] = []
        pending_flops: list[float] = []
        window = {"t": time.perf_counter(), "steps": 0, "tokens": 0.0}
        last_saved = latest

        def flush():
            if not pending:
                return
            got = jax.device_get([m for _, m in pending])
            now = time.perf_counter()
            dt = max(now - window["t"], 1e-9)
            toks = sum(float(m.get("tokens", 0.0)) for m in got)
            tok_s = toks / dt
            tflops = sum(f for f in pending_flops) / dt / 1e12
            for (s, _), m in zip(pending, got):
                if not int(m["finite"]):
                    raise NonFiniteError(
                        f"[{cfg.stage}] step {s}: non-finite loss ({float(m['loss'])}) or gradient norm "
                        f"({float(m['grad_norm'])}); params were not updated. The last good checkpoint is "
                        f"step {last_saved} in {ckpt.directory}; lower train.lr or check the data.")
                rec = {"step": s, "lr": float(schedule(s - 1)),
                       **{k: float(v) for k, v in m.items() if k != "finite"}}
                writer.write(rec)
            last = got[-1]
            if bar is not None:
                bar.set_postfix(loss=f"{float(last['loss']):.4f}", lr=f"{float(schedule(pending[-1][0] - 1)):.2e}",
                                tok_s=f"{tok_s:.0f}", tflops=f"{tflops:.3g}", refresh=False)
                bar.update(len(got))
            pending.clear()
            pending_flops.clear()
            window.update(t=now)

        batch = first
        try:
            for step in range(start + 1, tc.steps + 1):
                if batch is None:
                    batch = host_batch_to_global(next(data_iter), tc.grad_accum, sh["batch"])
                rng = jax.random.fold_in(base_key, step)
                step_c, step_fl = compiled_for(batch)
                trainable, opt_state, metrics = step_c(trainable, opt_state, frozen, batch, rng)
                pending_flops.append(step_fl)
                batch = None
                pending.append((step, metrics))
                if step % tc.log_every == 0:
                    flush()
                if step % tc.ckpt_every == 0 or step == tc.steps:
                    flush()
                    ckpt.save(step, trainable, opt_state, rng=base_key, meta={"stage": cfg.stage},
                              data_iter=data_iter if hasattr(data_iter, "get_state") else None)
                    last_saved = step
                if tc.eval_every and step % tc.eval_every == 0 and step != tc.steps:
                    dev_eval(step)
                if tc.decode_every and step % tc.decode_every == 0 and step != tc.steps:
                    dev_decode(step)
            flush()
            if bar is not None:  # so the final dev report is not interleaved with the bar
                bar.close()
                bar = None
            dev = dev_eval(tc.steps)
            dev.update(dev_decode(tc.steps))
        finally:
            if bar is not None:
                bar.close()
            ckpt.close()
            writer.close()
    return StageResult(cfg.stage, stage_dir, tc.steps, read_losses(stage_dir), dev, latest)
