"""`python train.py --stage=asr|smt|srt|all --config configs/X.yaml [--set k=v ...]`.

Each stage trains into RUN_DIR/<stage>/ (checkpoints/, metrics.jsonl, tb/) and redraws
RUN_DIR/curves.png (train and dev loss per stage, see train/curves.py). A stage starts
from the previous stage's final trainable params (the optimizer restarts, as in the papers)
unless `--init-from` names a checkpoint folder; rerunning a command resumes from the last
checkpoint; a finished stage is skipped.

The model and the data are plugged in by the config:
  model.builder: "pkg.module:fn"   fn(cfg: RunConfig, *, abstract: bool) -> TrainBundle
  data.builder:  "pkg.module:fn"   fn(cfg, split, *, process_index, process_count)
                                   split "train": an infinite Grain iterator (get_state /
                                   set_state) of this process's rows of each global batch;
                                   split "dev": an iterable of such batches.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Importing jax before the dry run's device flags are set is fine: XLA reads XLA_FLAGS when the
# first backend starts, and the platform is set through jax.config (see _prepare_dry_run_devices).
import jax
import yaml

from esrt_jax.config import ConfigError, cache_home, to_dict
from esrt_jax.files import RunDirLocked, lock_run_dir, os_error_line
from esrt_jax.train import distributed
from esrt_jax.train.checkpoint import (CheckpointMismatch, Checkpointer, CheckpointWriteError, UnreadableCheckpoint,
                                       abstract_like, restore_params)
from esrt_jax.train.config import STAGES, load_run_config, save_run_config
from esrt_jax.train.curves import plot_curves
from esrt_jax.train.dryrun import dry_run
from esrt_jax.train.loop import log0, run_stage, stage_layout


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", default="all", choices=[*STAGES, "all"],
                   help="curriculum stage to train: align, asr, smt, srt, or all in order; align only when "
                        "the config has stages.align (default: all)")
    p.add_argument("--config", required=True, help="YAML run config (configs/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-5 (repeatable)")
    p.add_argument("--init-from", default=None,
                   help="checkpoint folder (a stage's checkpoints/ dir) to take the first stage's "
                        "trainable params from, instead of the previous stage")
    p.add_argument("--from-init", action="store_true",
                   help="start the first stage from the model's initial params, not from the previous "
                        "stage (curriculum ablations: --stage=srt --from-init trains SRT only)")
    p.add_argument("--run-dir", default=None, help="output folder (default: the config's run_dir)")
    p.add_argument("--dry-run", action="store_true",
                   help="compile on abstract params and print per-device memory; trains nothing")
    p.add_argument("--devices", type=int, default=None,
                   help="dry run: number of simulated CPU devices (default: the config's mesh, at least 8)")
    p.add_argument("--coordinator", default=None, help="jax.distributed coordinator host:port")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--compile-cache", default=os.environ.get("ESRT_JAX_COMPILE_CACHE", str(cache_home() / "xla")),
                   help="persistent XLA compilation cache dir ('' disables); stages and reruns reuse "
                        "compiled steps (default: $ESRT_JAX_COMPILE_CACHE, else $XDG_CACHE_HOME/esrt_jax/xla, "
                        "else ~/.cache/esrt_jax/xla)")
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() with no arguments (TPU pods, SLURM)")
    return p.parse_args(argv)


def dry_run_devices(mesh) -> int:
    """Simulated devices a dry run needs for a `MeshConfig`: data x fsdp x tensor, with `data: -1`
    filled up to at least 8 devices (esrt_12b's fsdp 4 x tensor 4 needs 16, not the default 8)."""
    fixed = mesh.fsdp * mesh.tensor
    return fixed * (mesh.data if mesh.data > 0 else -(-8 // fixed))


def _prepare_dry_run_devices(args, n_default: int = 8) -> None:
    """Simulated CPU devices must be requested before jax starts."""
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "") and args.devices is None:
        return
    n = args.devices or n_default
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    os.environ["JAX_PLATFORMS"] = "cpu"  # for child processes; jax itself read it at import
    jax.config.update("jax_platforms", "cpu")


def stage_ckpt_dir(run_dir: Path, stage: str) -> Path:
    return run_dir / stage / "checkpoints"


def _has_steps(ckpt_dir: Path) -> bool:
    return ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())


def _command(args, stage: str, run_dir: Path) -> str:
    sets = "".join(f" --set {o}" for o in args.overrides)
    return f"python train.py --stage={stage} --config {args.config} --run-dir {run_dir}{sets}"


def previous_params_dir(args, cfg, stage: str, run_dir: Path) -> Path:
    """The previous stage's checkpoint folder, checked to hold its final step."""
    prev = cfg.previous_stage(stage)
    d = stage_ckpt_dir(run_dir, prev)
    want = cfg.for_stage(prev).train.steps
    hint = (f"; create it with: {_command(args, prev, run_dir)}  (or start this stage from another "
            f"checkpoint with --init-from DIR)")
    if not d.is_dir():
        raise SystemExit(f"error: stage {stage} starts from the final checkpoint of stage {prev}, "
                         f"expected in {d}, which does not exist{hint}")
    last = Checkpointer(d, keep=1_000_000, async_save=False)
    try:
        step = last.latest_step()
    finally:
        last.close()
    if step is None or step < want:
        raise SystemExit(f"error: stage {prev} in {d} is not finished (last checkpoint: step {step}, "
                         f"needs {want}){hint.replace('create it', 'finish it')}")
    return d


def _flat(d, prefix=""):
    """Nested dict -> {dotted key: value} (lists are values)."""
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def changed_keys(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    a, b = _flat(old), _flat(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def check_against_checkpoints(cfg, run_dir: Path, model_builder) -> None:
    """Every stage's newest checkpoint in `run_dir` must fit the model this config builds; else a
    one-line SystemExit naming the config keys that changed since the saved RUN_DIR/config.yaml."""
    saved_path = run_dir / "config.yaml"
    for stage in STAGES:
        d = stage_ckpt_dir(run_dir, stage)
        if not _has_steps(d):
            continue
        abstract = model_builder(cfg.for_stage(stage), abstract=True).trainable
        ck = Checkpointer(d, keep=1_000_000, async_save=False)
        try:
            for step in sorted(ck.all_steps(), reverse=True):  # the newest step whose metadata reads
                try:
                    ck.check_shapes(step, abstract)
                    break
                except CheckpointMismatch as e:
                    keys = []
                    if saved_path.is_file():
                        keys = changed_keys((yaml.safe_load(saved_path.read_text()) or {}).get("model"),
                                            to_dict(cfg).get("model"))
                    what = (f"changed model keys {', '.join('model.' + k for k in keys)}" if keys
                            else "a different model")
                    raise SystemExit(f"error: this config builds {what}, which does not fit the checkpoints in "
                                     f"{d} ({str(e).split(': ', 1)[1]}); revert the change or use another "
                                     f"--run-dir") from None
                except Exception:  # noqa: BLE001 - unreadable metadata: the stage's resume handles it
                    continue
        finally:
            ck.close()


def _main(argv, held: list) -> list:
    args = parse_args(argv)
    if args.dry_run:  # the config is read before any device is touched: it sizes the simulated mesh
        try:
            mesh_cfg = load_run_config(args.config, args.overrides).mesh
        except ConfigError as e:
            raise SystemExit(f"error: {e}") from None
        _prepare_dry_run_devices(args, dry_run_devices(mesh_cfg))

    if not args.dry_run:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                               auto=args.distributed)

    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", str(Path(args.compile_cache).expanduser()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
    try:
        cfg = load_run_config(args.config, args.overrides)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    run_dir = Path(args.run_dir or cfg.run_dir)
    stages = cfg.curriculum() if args.stage == "all" else (args.stage,)
    if args.init_from and args.from_init:
        raise SystemExit("error: give --init-from DIR or --from-init, not both")
    if args.init_from and not Path(args.init_from).is_dir():
        raise SystemExit(f"error: --init-from {args.init_from}: no such checkpoint folder")
    model_builder, data_builder = cfg.model_builder(), cfg.data_builder()

    if not args.dry_run and jax.process_index() == 0:
        try:  # two trainers on one run dir would delete each other's checkpoints
            held.append(lock_run_dir(run_dir))
        except (RunDirLocked, OSError) as e:
            raise SystemExit(f"error: {e if isinstance(e, RunDirLocked) else os_error_line(e)}") from None
    if not args.dry_run:
        check_against_checkpoints(cfg, run_dir, model_builder)
    if not args.dry_run and jax.process_index() == 0:
        # The resolved config (overrides applied) next to the stages: export/eval/serve read it.
        # Written only once it is known to fit the checkpoints already there.
        try:
            save_run_config(run_dir, cfg)
        except OSError as e:
            raise SystemExit(f"error: cannot write the run config: {os_error_line(e)}") from None

    results = []
    for i, stage in enumerate(stages):
        scfg = cfg.for_stage(stage)
        if args.dry_run:
            try:
                results.append(dry_run(scfg, model_builder(scfg, abstract=True)))
            except ConfigError as e:  # a mesh that does not fit, a missing encoder cache: one line
                raise SystemExit(f"error: [{stage}] {e}") from None
            continue
        stage_dir = run_dir / stage
        resuming = _has_steps(stage_ckpt_dir(run_dir, stage))
        src = None
        if not resuming:
            if args.init_from and i == 0:
                src = Path(args.init_from)
            elif cfg.previous_stage(stage) and not (args.from_init and i == 0):
                src = previous_params_dir(args, cfg, stage, run_dir)
            elif (not args.from_init and "align" not in cfg.curriculum() and stage != "align"
                  and _has_steps(stage_ckpt_dir(run_dir, "align"))):
                # an easy slip: `--stage=align` run with `--set stages.align...`, the next command without it
                log0(f"[{stage}] notice: {stage_ckpt_dir(run_dir, 'align')} has checkpoints but this config has no "
                     f"stages.align block, so {stage} starts from the model's initial params; add the block "
                     f"(or --init-from that folder) to start from the aligned adapter")
        try:
            bundle = model_builder(scfg, abstract=False)
        except ConfigError as e:  # e.g. data.encoder_cache built for another encoder, a damaged shard
            raise SystemExit(f"error: [{stage}] {e}") from None
        init = None
        if src is not None:
            sh = stage_layout(scfg, bundle).sh
            try:
                # the align stage's CTC head is not part of the speech LLM: left out
                init, step = restore_params(src, abstract_like(bundle.trainable, sh["trainable"]),
                                            fill=bundle.trainable,
                                            drop=(".",) if cfg.previous_stage(stage) == "align" else ())
            except (UnreadableCheckpoint, CheckpointMismatch) as e:
                raise SystemExit(f"error: [{stage}] cannot start from {src}: {e}") from None
            log0(f"[{stage}] starting from trainable params of {src} (step {step}); optimizer restarts")
        pi, pc = jax.process_index(), jax.process_count()
        try:
            res = run_stage(scfg, bundle, stage_dir=stage_dir,
                            make_data=lambda: data_builder(scfg, "train", process_index=pi, process_count=pc),
                            make_dev=lambda: data_builder(scfg, "dev", process_index=pi, process_count=pc),
                            init_params=init)
        except (UnreadableCheckpoint, CheckpointMismatch, CheckpointWriteError) as e:
            raise SystemExit(f"error: [{stage}] {e}") from None
        except OSError as e:  # e.g. metrics.jsonl on a full disk
            raise SystemExit(f"error: [{stage}] {os_error_line(e)}") from None
        if res.losses:
            steps = sorted(res.losses)
            log0(f"[{stage}] done: step {res.final_step}, first logged loss {res.losses[steps[0]]:.4f}, "
                 f"last {res.losses[steps[-1]]:.4f}; checkpoints in {stage_ckpt_dir(run_dir, stage)}")
        if jax.process_index() == 0 and not res.skipped:
            log0(f"[{stage}] curves: {plot_curves(run_dir)}")
        results.append(res)
    return results


def main(argv=None) -> list:
    """The train.py CLI; the run-dir lock is released however it ends (also for in-process callers)."""
    held: list = []
    try:
        return _main(argv, held)
    finally:
        for f in held:
            f.close()


def command() -> int:
    """The `esrt-train` console command: exit status 0 once the stages ran."""
    return 0 if main() is not None else 1


if __name__ == "__main__":
    sys.exit(command())
