"""Training across processes: exact resume after SIGKILL, and 2-process jax.distributed.

Runs the real CLI (`python train.py`) on the tiny model of tests/train_toy.py.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
TOY = {"model": {"builder": "train_toy:build_model"},
       "data": {"builder": "train_toy:build_data", "size": 128},
       "train": {"steps": 24, "batch_size": 8, "lr": 0.05, "warmup_steps": 2, "ckpt_every": 4,
                 "log_every": 1, "keep": 2, "progress": False, "eval_batches": 1}}


def env(devices: int) -> dict:
    e = dict(os.environ)
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    e["JAX_PLATFORMS"] = "cpu"
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT), e.get("PYTHONPATH", "")])
    return e


def launch(cfg: Path, run_dir: Path, devices: int, *extra: str, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "train.py"), "--stage=asr", "--config", str(cfg),
           "--run-dir", str(run_dir), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env(devices), stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait(p: subprocess.Popen, log: Path, timeout=240) -> None:
    rc = p.wait(timeout=timeout)
    assert rc == 0, f"exit {rc}:\n{log.read_text()[-3000:]}"


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "asr" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            assert rec["step"] not in out, f"step {rec['step']} logged twice"
            out[rec["step"]] = rec["loss"]
    return out


@pytest.mark.slow  # three training processes, one killed
def test_sigkill_mid_stage_then_rerun_gives_identical_losses(tmp_path):
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(json.dumps(TOY))
    full = launch(cfg, tmp_path / "full", 2, log=tmp_path / "full.log")
    victim = launch(cfg, tmp_path / "killed", 2, log=tmp_path / "killed1.log")
    metrics = tmp_path / "killed" / "asr" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:  # kill somewhere past the second checkpoint, mid-stage
        if metrics.exists() and sum(1 for _ in open(metrics)) >= 10:
            break
        assert victim.poll() is None, (tmp_path / "killed1.log").read_text()
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = max(losses(tmp_path / "killed"))
    assert killed_at < 24, "the run finished before it could be killed"
    rerun = launch(cfg, tmp_path / "killed", 2, log=tmp_path / "killed2.log")
    wait(rerun, tmp_path / "killed2.log")
    wait(full, tmp_path / "full.log")
    assert "resumed from" in (tmp_path / "killed2.log").read_text()
    a, b = losses(tmp_path / "full"), losses(tmp_path / "killed")
    assert sorted(a) == sorted(b) == list(range(1, 25))
    assert [a[s] for s in a] == [b[s] for s in a]   # bit-identical, not just close
    assert a[24] < a[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # jax.distributed with two processes on localhost
def test_two_processes_match_one_process(tmp_path):
    cfg = tmp_path / "toy.yaml"
    d = json.loads(json.dumps(TOY))
    d["train"].update(steps=4, ckpt_every=2)
    cfg.write_text(json.dumps(d))
    port = free_port()
    mesh = ("--set", "mesh.fsdp=2")
    procs = [launch(cfg, tmp_path / "multi", 2, *mesh, "--coordinator", f"localhost:{port}",
                    "--num-processes", "2", "--process-id", str(i), log=tmp_path / f"p{i}.log")
             for i in range(2)]
    single = launch(cfg, tmp_path / "single", 4, *mesh, log=tmp_path / "single.log")
    for i, p in enumerate(procs):
        wait(p, tmp_path / f"p{i}.log")
    wait(single, tmp_path / "single.log")
    assert "2 process(es)" in (tmp_path / "p0.log").read_text()
    a, b = losses(tmp_path / "single"), losses(tmp_path / "multi")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert abs(a[s] - b[s]) < 1e-5, (s, a[s], b[s])
    # The checkpoint was written collectively: one complete step folder, both data states.
    data = tmp_path / "multi" / "asr" / "checkpoints" / "4" / "data"
    assert sorted(p.name for p in data.glob("process_*")) == ["process_0-of-2.json", "process_1-of-2.json"]
