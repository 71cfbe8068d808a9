"""Per-stage training curves of a run as one PNG: RUN_DIR/curves.png.

One panel per stage that has a metrics.jsonl: the train loss (each logged step, and its moving
average), the dev loss and the dev loss with each row's speech taken from another row (the
listening check: no gap means the model ignores its audio). `train.py` redraws it after every
stage; `python -m esrt_jax.train.curves RUN_DIR [--out PNG]` draws it for any run.

Plots use matplotlib's object API with the Agg canvas (no pyplot, no display).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from esrt_jax.train.config import STAGES


def read_series(metrics: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{metric: (steps, values)} of a stage's metrics.jsonl; unreadable lines are skipped (a killed
    run may leave half a line)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        for k, v in rec.items():
            if k != "step" and isinstance(v, (int, float)):
                series.setdefault(k, []).append((int(rec["step"]), float(v)))
    return {k: (np.array([s for s, _ in v]), np.array([x for _, x in v])) for k, v in series.items()}


def moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` values (the first values average what exists)."""
    c = np.cumsum(np.insert(x, 0, 0.0))
    n = np.minimum(np.arange(1, len(x) + 1), window)
    return (c[1:] - c[np.arange(1, len(x) + 1) - n]) / n


def plot_curves(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Draw the run's per-stage curves into `out` (default RUN_DIR/curves.png); None when no stage
    has metrics yet."""
    run_dir = Path(run_dir)
    stages = [(s, read_series(run_dir / s / "metrics.jsonl")) for s in STAGES
              if (run_dir / s / "metrics.jsonl").is_file()]
    stages = [(s, m) for s, m in stages if "loss" in m]
    if not stages:
        return None
    fig = Figure(figsize=(4.2 * len(stages), 3.4), dpi=100)
    axes = fig.subplots(1, len(stages), squeeze=False, sharey=True)[0]
    for ax, (stage, m) in zip(axes, stages):
        steps, loss = m["loss"]
        ax.plot(steps, loss, color="tab:blue", alpha=0.25, lw=0.8)
        ax.plot(steps, moving_average(loss, 10), color="tab:blue", lw=1.5, label="train (avg of 10)")
        if "dev_loss" in m:
            ax.plot(*m["dev_loss"], "o-", color="tab:green", ms=4, label="dev")
        if "dev_loss_shuffled" in m:
            ax.plot(*m["dev_loss_shuffled"], "s--", color="tab:red", ms=4, label="dev, speech shuffled")
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (nats per answer token)")
    axes[0].legend(fontsize=8)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "curves.png"
    fig.savefig(out)
    return out


if __name__ == "__main__":  # the command is esrt_jax.cli.curves (commands live in the top layer)
    import runpy

    runpy.run_module("esrt_jax.cli.curves", run_name="__main__", alter_sys=True)
