"""`python -m esrt_jax.train.curves RUN_DIR [--out PNG]` / `esrt-curves`: draw a run's training curves (see
`esrt_jax.train.curves`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from esrt_jax.train import curves
from esrt_jax.train.curves import plot_curves


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(prog="python -m esrt_jax.train.curves", description=curves.__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="train.py run folder (holds asr/, smt/, srt/)")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curves.png)")
    a = p.parse_args(argv)
    out = plot_curves(a.run_dir, a.out)
    if out is None:
        raise SystemExit(f"error: {a.run_dir}: no stage has a metrics.jsonl with a train loss")
    print(out)
    return out


def command() -> int:
    """The `esrt-curves` console command (`main` returns the PNG's path)."""
    main()
    return 0


if __name__ == "__main__":
    main()
