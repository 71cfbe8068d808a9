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

from esrt_jax.pytree import swap_partners, swap_rows
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
                try:
                    self.tb.close()
                except OSError:  # a full disk: the events still queued are lost (metrics.jsonl has
                    # every record); mark them closed so tensorboardX's atexit hook does not retry
                    for w in self.tb.all_writers.values():
                        w.event_writer._closed = True  # noqa: SLF001
                    raise


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


@dataclasses.dataclass(frozen=True)
class StageLayout:
    """Where one stage's arrays live: its mesh, the rules table, the optimizer and `sh`, the
    shardings of params, optimizer state and batches (`stage_shardings`)."""

    mesh: Any
    rules: dict
    optimizer: optax.GradientTransformation
    sh: dict


def stage_layout(cfg: RunConfig, bundle: TrainBundle, mesh=None) -> StageLayout:
    """The mesh (`cfg.mesh`, unless given), rules, optimizer and shardings of a stage: built once
    here for training, the dry run and the restore of a previous stage's params."""
    mesh = mesh or mesh_lib.make_mesh(cfg.mesh)
    rules = mesh_lib.make_rules(cfg.mesh.rules)
    optimizer = make_optimizer(cfg.train, bundle.trainable)
    return StageLayout(mesh, rules, optimizer, stage_shardings(bundle, optimizer, mesh, rules))


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


def check_batch_size(tc, mesh, rules) -> None:
    """The global batch must split evenly over grad_accum x the data axes and over processes."""
    gb = tc.batch_size
    div = mesh_lib.batch_divisor(mesh, rules) * tc.grad_accum
    if gb % div:
        raise ValueError(f"train.batch_size={gb} must be divisible by grad_accum x data x fsdp = {div}")
    if gb % jax.process_count():
        raise ValueError(f"train.batch_size={gb} must be divisible by the {jax.process_count()} processes")


def with_init_params(bundle: TrainBundle, init_params: Any) -> TrainBundle:
    """The bundle with its trainable params replaced by `init_params` (e.g. the previous stage's);
    the two trees must have the same paths."""
    if init_params is None:
        return bundle
    want = sorted(path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(bundle.trainable)[0])
    got = sorted(path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(init_params)[0])
    if want != got:
        missing = sorted(set(want) - set(got))[:5]
        extra = sorted(set(got) - set(want))[:5]
        raise ValueError(f"init params do not match the trainable set: missing {missing}, extra {extra}")
    return dataclasses.replace(bundle, trainable=init_params)


@dataclasses.dataclass
class StageState:
    """The device-side state of a running stage (global arrays placed on the mesh)."""
    trainable: Any
    opt_state: Any
    frozen: Any
    start: int                  # the step training continues after
    latest: int | None          # the restored checkpoint's step, None on a fresh start


def place_on_mesh(bundle: TrainBundle, sh: dict) -> tuple[Any, Any]:
    """The bundle's (trainable, frozen) params as global arrays on the mesh. Call inside
    `jax.set_mesh(mesh)`."""
    return to_global(bundle.trainable, sh["trainable"]), to_global(bundle.frozen, sh["frozen"])


def restore_latest(stage: str | None, st: StageState, sh: dict, ckpt: Checkpointer, data_iter: Any
                   ) -> StageState:
    """Resume from the latest readable checkpoint (params, optimizer state and the data iterator's
    position), if there is one; else `st` unchanged."""
    res = ckpt.restore_latest(abstract_like(st.trainable, sh["trainable"]),  # skips unreadable steps
                              abstract_like(st.opt_state, sh["opt_state"]),
                              data_iter if hasattr(data_iter, "get_state") else None)
    if res is None:
        return st
    latest = int(res["meta"]["step"])
    log0(f"[{stage}] resumed from {ckpt.directory}/{latest} (step {latest})")
    return dataclasses.replace(st, trainable=res["params"], opt_state=res["opt"], start=latest, latest=latest)


class StepCompiler:
    """AOT-compiled train step per batch shape (text buckets give a few shapes) and its FLOPs;
    the first compile also logs the per-device memory."""

    def __init__(self, step_fn, sh: dict, bundle: TrainBundle, stage: str | None, batch_size: int):
        self.step_fn, self.sh, self.bundle = step_fn, sh, bundle
        self.stage, self.batch_size = stage, batch_size
        self.compiled: dict = {}
        self.flops: dict = {}

    def __call__(self, batch: dict, st: StageState, key: jax.Array) -> tuple[Any, float]:
        shape_key = tuple((k, v.shape, str(v.dtype)) for k, v in sorted(batch.items()))
        if shape_key not in self.compiled:
            t0 = time.perf_counter()
            c = self.step_fn.lower(st.trainable, st.opt_state, st.frozen, batch, key).compile()
            shapes = {k: tuple(v.shape) for k, v in batch.items()}
            log0(f"[{self.stage}] compiled train step for batch {shapes} in {time.perf_counter() - t0:.1f}s")
            if not self.compiled:
                rep = memory_report(c, self.sh, st.trainable, st.frozen, self.sh["abstract_opt"])
                log0(f"[{self.stage}] per-device memory: {format_memory(rep)}")
            self.compiled[shape_key] = c
            self.flops[shape_key] = step_flops(c, jax.device_count(), self.bundle, self.batch_size)
        return self.compiled[shape_key], self.flops[shape_key]


class DevReporter:
    """Dev-set evaluation during training: teacher-forced loss/accuracy over `train.eval_batches`
    batches (with the listening check: the same batches with shuffled speech, and the gap), and
    the bundle's free-running decodes (`decode_fn`: sample lines and scores). Both write to the
    metrics file and the log; both return {} when the bundle has nothing to run."""

    def __init__(self, cfg: RunConfig, bundle: TrainBundle, sh: dict,
                 make_dev: Callable[[], Iterable[dict]] | None, writer: MetricsWriter):
        self.stage, self.tc, self.bundle, self.sh, self.make_dev, self.writer = (
            cfg.stage, cfg.train, bundle, sh, make_dev, writer)
        self.eval_fn = None
        if make_dev is not None:
            self.eval_fn = jax.jit(make_eval_step(bundle.eval_fn or bundle.loss_fn),
                                   in_shardings=(sh["trainable"], sh["frozen"], sh["eval_batch"]),
                                   out_shardings=sh["replicated"])

    def _runs(self, b: dict) -> list[tuple[str, dict]]:
        runs = [("", b)]
        if self.bundle.speech_keys:
            # The same batch with each row's speech taken from another row (the swap rule,
            # `pytree.swap_partners`): a model that ignores its speech input has the same loss (no gap).
            rows = len(next(iter(b.values())))
            refs = self.bundle.row_refs(b) if self.bundle.row_refs else range(rows)
            runs.append(("_shuffled", swap_rows(b, self.bundle.speech_keys, swap_partners(list(refs)))))
        return runs

    def loss(self, step: int, st: StageState) -> dict:
        if self.eval_fn is None:
            return {}
        tot: dict[str, float] = {}
        n = 0
        for i, b in enumerate(self.make_dev()):
            if i >= self.tc.eval_batches:
                break
            for suffix, bb in self._runs(b):
                gb_ = {k: jax.make_array_from_process_local_data(self.sh["eval_batch"], np.asarray(v))
                       for k, v in bb.items()}
                m = jax.device_get(self.eval_fn(st.trainable, st.frozen, gb_))
                for k, v in m.items():
                    if suffix and k not in ("loss", "accuracy"):
                        continue
                    tot[k + suffix] = tot.get(k + suffix, 0.0) + float(v)
            n += 1
        out = {f"dev_{k}": v / max(n, 1) for k, v in tot.items()}
        if "dev_loss_shuffled" in out and "dev_loss" in out:
            out["dev_audio_gap"] = out["dev_loss_shuffled"] - out["dev_loss"]
        self.writer.write({"step": step, **out})
        log0(f"[{self.stage}] step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in out.items()))
        return out

    def decode(self, step: int, st: StageState) -> dict:
        if self.bundle.decode_fn is None or self.tc.decode_samples == 0:
            return {}
        if jax.process_count() > 1:  # the Translator works on host-local arrays
            log0(f"[{self.stage}] dev decode skipped in multi-process runs (use eval.py on the checkpoint)")
            return {}
        rep = self.bundle.decode_fn(st.trainable, st.frozen, self.tc.decode_samples)
        for line in rep.get("samples", []):
            log0(f"[{self.stage}]   {line}")
        scores = {k: float(v) for k, v in rep.items() if isinstance(v, (int, float))}
        self.writer.write({"step": step, **{f"dev_{k}": v for k, v in scores.items()}})
        if scores:
            log0(f"[{self.stage}] step {step} decode: " + " ".join(f"{k}={v:.2f}" for k, v in scores.items()))
        return scores


class StepLog:
    """Step metrics kept on device until `flush` (every `train.log_every` steps, so the loop does
    not wait for each step): then checked for non-finite values, written to the metrics file, and
    shown on the progress bar with tokens/s and TFLOP/s over the window."""

    def __init__(self, cfg: RunConfig, schedule, writer: MetricsWriter, ckpt_dir: Path, start: int,
                 last_saved: int | None):
        tc = cfg.train
        self.stage, self.schedule, self.writer, self.ckpt_dir = cfg.stage, schedule, writer, ckpt_dir
        self.last_saved = last_saved   # named in the non-finite error
        self.pending: list[tuple[int, dict]] = []
        self.pending_flops: list[float] = []
        self.t = time.perf_counter()
        self.bar = None
        if tc.progress and jax.process_index() == 0:
            self.bar = tqdm(total=tc.steps, initial=start, desc=cfg.stage or "train", file=sys.stderr,
                            dynamic_ncols=True, mininterval=1.0)

    def add(self, step: int, metrics: dict, flops: float) -> None:
        self.pending_flops.append(flops)
        self.pending.append((step, metrics))

    def flush(self) -> None:
        if not self.pending:
            return
        got = jax.device_get([m for _, m in self.pending])
        now = time.perf_counter()
        dt = max(now - self.t, 1e-9)
        toks = sum(float(m.get("tokens", 0.0)) for m in got)
        tok_s = toks / dt
        tflops = sum(f for f in self.pending_flops) / dt / 1e12
        for (s, _), m in zip(self.pending, got):
            if not int(m["finite"]):
                raise NonFiniteError(
                    f"[{self.stage}] step {s}: non-finite loss ({float(m['loss'])}) or gradient norm "
                    f"({float(m['grad_norm'])}); params were not updated. The last good checkpoint is "
                    f"step {self.last_saved} in {self.ckpt_dir}; lower train.lr or check the data.")
            rec = {"step": s, "lr": float(self.schedule(s - 1)),
                   **{k: float(v) for k, v in m.items() if k != "finite"}}
            self.writer.write(rec)
        last = got[-1]
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{float(last['loss']):.4f}",
                                 lr=f"{float(self.schedule(self.pending[-1][0] - 1)):.2e}",
                                 tok_s=f"{tok_s:.0f}", tflops=f"{tflops:.3g}", refresh=False)
            self.bar.update(len(got))
        self.pending.clear()
        self.pending_flops.clear()
        self.t = now

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _close_quietly(ckpt: Checkpointer, writer: MetricsWriter) -> None:
    """Close both after a failure without raising (a full disk fails their last writes too)."""
    try:
        ckpt.close()
    except Exception:  # noqa: BLE001
        pass
    try:
        writer.close()
    except OSError:
        pass


def run_stage(cfg: RunConfig, bundle: TrainBundle, *, stage_dir: str | Path,
              make_data: Callable[[], Any], make_dev: Callable[[], Iterable[dict]] | None = None,
              init_params: Any = None, mesh=None) -> StageResult:
    """Train one stage to `cfg.train.steps`, resuming from `stage_dir/checkpoints` if present."""
    tc = cfg.train
    stage_dir = Path(stage_dir)
    bundle = with_init_params(with_frozen_dtype(bundle, tc), init_params)
    layout = stage_layout(cfg, bundle, mesh)
    mesh, optimizer, sh = layout.mesh, layout.optimizer, layout.sh
    check_batch_size(tc, mesh, layout.rules)
    schedule = make_schedule(tc)
    log0(f"[{cfg.stage}] mesh {dict(mesh.shape)} on {jax.device_count()} devices, "
         f"{jax.process_count()} process(es); trainable {count_params(bundle.trainable):,} params, "
         f"frozen {count_params(bundle.frozen):,}")

    with jax.set_mesh(mesh):
        trainable, frozen = place_on_mesh(bundle, sh)
        bundle = dataclasses.replace(bundle, trainable=None, frozen=None)  # drop host copies
        opt_state = jax.jit(optimizer.init, out_shardings=sh["opt_state"])(trainable)
        ckpt = Checkpointer(stage_dir / "checkpoints", keep=tc.keep, async_save=tc.async_ckpt)
        data_iter = make_data()
        st = restore_latest(cfg.stage, StageState(trainable, opt_state, frozen, 0, None), sh, ckpt,
                            data_iter)
        del trainable, opt_state, frozen  # st holds them (and replaces them as it trains)
        writer = MetricsWriter(stage_dir, truncate_after=st.start)
        if st.start >= tc.steps:
            log0(f"[{cfg.stage}] already complete at step {st.start}; nothing to do")
            writer.close()
            ckpt.close()
            return StageResult(cfg.stage, stage_dir, st.start, read_losses(stage_dir), {}, st.latest,
                               skipped=True)

        base_key = jax.random.key(tc.seed)
        compiled_for = StepCompiler(jit_train_step(make_train_step(bundle.loss_fn, optimizer), sh), sh,
                                    bundle, cfg.stage, tc.batch_size)
        batch = host_batch_to_global(next(data_iter), tc.grad_accum, sh["batch"])
        compiled_for(batch, st, base_key)
        dev_report = DevReporter(cfg, bundle, sh, make_dev, writer)
        log = StepLog(cfg, schedule, writer, ckpt.directory, st.start, st.latest)
        try:
            for step in range(st.start + 1, tc.steps + 1):
                if batch is None:
                    batch = host_batch_to_global(next(data_iter), tc.grad_accum, sh["batch"])
                rng = jax.random.fold_in(base_key, step)
                step_c, step_fl = compiled_for(batch, st, base_key)
                st.trainable, st.opt_state, metrics = step_c(st.trainable, st.opt_state, st.frozen,
                                                             batch, rng)
                log.add(step, metrics, step_fl)
                batch = None
                if step % tc.log_every == 0:
                    log.flush()
                if step % tc.ckpt_every == 0 or step == tc.steps:
                    log.flush()
                    ckpt.save(step, st.trainable, st.opt_state, rng=base_key, meta={"stage": cfg.stage},
                              data_iter=data_iter if hasattr(data_iter, "get_state") else None)
                    log.last_saved = step
                if tc.eval_every and step % tc.eval_every == 0 and step != tc.steps:
                    dev_report.loss(step, st)
                if tc.decode_every and step % tc.decode_every == 0 and step != tc.steps:
                    dev_report.decode(step, st)
            log.flush()
            log.close_bar()  # so the final dev report is not interleaved with the bar
            dev = dev_report.loss(tc.steps, st)
            dev.update(dev_report.decode(tc.steps, st))
        except BaseException:
            log.close_bar()
            _close_quietly(ckpt, writer)  # the error in flight is the one to report
            raise
        log.close_bar()
        try:
            ckpt.close()  # waits for the last save: CheckpointWriteError if it failed
        except BaseException:
            _close_quietly(ckpt, writer)
            raise
        writer.close()
    return StageResult(cfg.stage, stage_dir, tc.steps, read_losses(stage_dir), dev, st.latest)
