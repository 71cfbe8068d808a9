"""`python -m esrt_jax.export --run RUN_DIR --out OUT [...]` / `--import OUT --run NEW_RUN_DIR`:
the command line of `esrt_jax.export` (see that package's docstring; `esrt_jax/export/__main__.py`
runs it; console command `esrt-export`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from esrt_jax.config import CheckpointError, ConfigError
from esrt_jax.export import __doc__ as EXPORT_DOC
from esrt_jax.export.common import ExportError, find_run_config, stage_checkpoint
from esrt_jax.export.from_hf import import_export
from esrt_jax.export.to_hf import export_run
from esrt_jax.files import os_error_line
from esrt_jax.speech.load import load_edge_half
from esrt_jax.train.config import LLM_STAGES

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m esrt_jax.export", description=EXPORT_DOC.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run dir to export (or, with --import, the new run dir)")
    p.add_argument("--out", default=None, help="export directory (created)")
    p.add_argument("--import", dest="import_dir", default=None, metavar="OUT",
                   help="turn an export directory back into an Orbax checkpoint in --run")
    p.add_argument("--stage", default=None, choices=LLM_STAGES,
                   help="stage to export (default: the last one with a checkpoint)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--merge-lora", action="store_true", help="fold LoRA into the LLM weights (default)")
    g.add_argument("--peft", action="store_true", help="write the base LLM + a PEFT LoRA adapter")
    p.add_argument("--config", default=None, help="the run's YAML (default: RUN_DIR/config.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides the run was trained with (repeatable)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="storage dtype of the exported LLM weights")
    p.add_argument("--eval-summary", default=None, help="eval summary.json for the model card "
                   "(default: every summary.json under the run dir, one row each)")
    p.add_argument("--max-shard-gb", type=float, default=2.0, help="safetensors shard size")
    p.add_argument("--no-data-state", action="store_true",
                   help="import: do not open the training data to store an iterator state")
    p.add_argument("--edge", action="store_true",
                   help="export only the edge half (encoder + adapter) for a device: OUT/edge.onnx")
    p.add_argument("--format", default="onnx", choices=("onnx",), help="edge export format")
    p.add_argument("--int8", action="store_true", help="edge: also OUT/edge.int8.onnx (dynamic int8 weights)")
    p.add_argument("--split", default=None, choices=("qformer", "projector"),
                   help="edge: split point (default: the model config's; must match the service's)")
    args = p.parse_args(argv)
    if args.edge and (args.import_dir or args.peft or args.merge_lora):
        p.error("--edge exports the edge half only: no --import, --peft or --merge-lora")
    if not args.edge and (args.int8 or args.split):
        p.error("--int8 and --split belong to --edge")
    if args.import_dir is None and args.out is None:
        p.error("give --out OUT (export) or --import OUT (import)")
    if args.import_dir is not None and (args.out or args.peft or args.merge_lora or args.step or args.stage):
        p.error("--import takes only --run (the new run dir)")
    return args


def export_edge(args: argparse.Namespace) -> int:
    """`--edge --format onnx`: the run's edge half -> OUT/edge.onnx [+ OUT/edge.int8.onnx]."""
    try:  # optional: the `[onnx]` extra
        from esrt_jax.export.onnx_edge import export_edge_onnx
    except ImportError as e:
        raise ExportError(f"--edge --format onnx needs onnx and onnxruntime: pip install -e '.[onnx]' in the checkout "
                          f"({e})") from None
    config = find_run_config(args.run, args.config, args.stage)
    half, fingerprint = load_edge_half(config, stage_checkpoint(args.run, args.stage, args.step), args.overrides)
    paths = export_edge_onnx(half, fingerprint, args.out, split=args.split, int8=args.int8)
    print(f"exported the edge half of {args.run} (model {fingerprint}, split "
          f"{args.split or half.config.split}) to {args.out}")
    for kind, path in paths.items():
        size = sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))
        print(f"  {kind}: {path} ({size / 2**20:.1f} MiB)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.edge:
            return export_edge(args)
        if args.import_dir is not None:
            step_dir = import_export(args.import_dir, args.run, data_state=not args.no_data_state)
            run = Path(args.run).absolute()
            print(f"imported {args.import_dir} -> {step_dir}\n"
                  f"  config: {run / 'config.yaml'}\n"
                  f"  infer:  python -m esrt_jax.infer --config {run / 'config.yaml'} --checkpoint {run} ...\n"
                  f"  train:  python train.py --config {run / 'config.yaml'} --stage STAGE "
                  f"--init-from {step_dir.parent} --run-dir NEXT_RUN")
            return 0
        res = export_run(args.run, args.out, config=args.config, overrides=args.overrides, stage=args.stage,
                         step=args.step, peft=args.peft, dtype=args.dtype, eval_summary=args.eval_summary,
                         max_shard_bytes=int(args.max_shard_gb * 1024**3))
    except (ExportError, ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only target, a full disk: the cause in one line
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 2
    print(f"exported stage {res.stage} step {res.step} to {res.out} (llm: {res.llm_format}, "
          f"encoder: {res.encoder_format})")
    for k, v in res.files.items():
        print(f"  {k}/: {', '.join(v)}" if k != "top" else f"  {', '.join(v)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
