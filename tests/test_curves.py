"""Per-stage training curves (train/curves.py): parsing, moving average, the PNG and the CLI."""

import json

import numpy as np
import pytest

from esrt_jax.cli import curves as curves_cli
from esrt_jax.train import curves


def _write(path, recs, tail=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + tail)


def test_series_png_and_cli(tmp_path):
    run = tmp_path / "run"
    _write(run / "asr" / "metrics.jsonl",
           [{"step": s, "loss": 5.0 / s, "lr": 1e-3} for s in range(1, 31)]
           + [{"step": 20, "dev_loss": 0.5, "dev_loss_shuffled": 1.5, "dev_audio_gap": 1.0}],
           tail='{"step": 31, "lo')  # a killed run's half-written line
    _write(run / "srt" / "metrics.jsonl", [{"step": s, "loss": 1.0} for s in range(1, 11)])
    m = curves.read_series(run / "asr" / "metrics.jsonl")
    assert m["loss"][0].tolist() == list(range(1, 31))
    assert m["dev_loss_shuffled"][0].tolist() == [20] and m["dev_loss_shuffled"][1].tolist() == [1.5]
    out = curves.plot_curves(run)
    assert out == run / "curves.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert curves_cli.main([str(run), "--out", str(tmp_path / "c.png")]).stat().st_size > 10_000
    with pytest.raises(SystemExit, match="no stage has a metrics.jsonl"):
        curves_cli.main([str(tmp_path / "empty")])


def test_moving_average_is_trailing():
    x = np.array([1.0, 3.0, 5.0, 7.0])
    np.testing.assert_allclose(curves.moving_average(x, 2), [1.0, 2.0, 4.0, 6.0])
    np.testing.assert_allclose(curves.moving_average(x, 10), [1.0, 2.0, 3.0, 4.0])
