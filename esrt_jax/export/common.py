"""What export, import and the model card share: the export format, its errors, finding a run."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from esrt_jax.train.config import LLM_STAGES
from esrt_jax.train.restore import resolve_checkpoint

FORMAT = "esrt-jax-export"
VERSION = 1
ESRT_CONFIG = "esrt_config.json"
POINTER = "BASE_MODEL.json"
CONFIG_NAMES = ("config.yaml", "config.yml", "run_config.yaml")


class ExportError(ValueError):
    """Bad export/import input: names the file or directory and the problem."""


def find_run_config(run_dir: str | os.PathLike, config: str | os.PathLike | None = None,
                    stage: str | None = None) -> Path:
    """The YAML the run was trained with: `config`, else RUN_DIR/config.yaml (or RUN_DIR/<stage>/)."""
    if config is not None:
        p = Path(config)
        if not p.is_file():
            raise ExportError(f"--config {p}: file does not exist")
        return p
    run = Path(run_dir)
    cands = [run / n for n in CONFIG_NAMES] + ([run / stage / n for n in CONFIG_NAMES] if stage else [])
    for c in cands:
        if c.is_file():
            return c
    raise ExportError(f"{run}: no run config found (looked for {', '.join(str(c) for c in cands)}); "
                      f"pass the YAML the run was trained with: --config configs/X.yaml [--set ...]")


def stage_checkpoint(run_dir: str | os.PathLike, stage: str | None, step: int | None) -> Path:
    """RUN_DIR + stage/step -> the checkpoint path `load_model` takes (a checkpoints or step dir)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ExportError(f"--run {run}: directory does not exist")
    if stage is None:
        ck, stage, _ = resolve_checkpoint(run)
        if stage is None:
            raise ExportError(f"{run}: cannot tell the stage of {ck}; pass --stage")
    else:
        if stage not in LLM_STAGES:
            raise ExportError(f"--stage {stage!r}: unknown stage; stages are {list(LLM_STAGES)}")
        ck = run / stage / "checkpoints"
        if not ck.is_dir():
            raise ExportError(f"{run}: stage {stage} has no checkpoints ({ck} does not exist)")
    if step is not None:
        d = ck / str(step)
        if not d.is_dir():
            have = sorted(int(p.name) for p in ck.iterdir() if p.is_dir() and p.name.isdigit())
            raise ExportError(f"{ck}: no checkpoint at step {step} (steps present: {have})")
        return d
    return ck


def local_dir(spec: Any) -> Path | None:
    if not spec or not isinstance(spec, str):
        return None
    p = Path(spec).expanduser()
    return p.absolute() if (p / "config.json").is_file() else None


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return path
