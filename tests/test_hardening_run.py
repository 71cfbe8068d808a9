"""Hardening (issue 29) of runs and configs: a run dir is locked against a second trainer (2), the
shipped configs dry-run (15), config values are type-checked and a damaged RUN_DIR/config.yaml
is a one-line error (16), a read-only run dir is a one-line error (17), a checkpoint save on a full
disk stops the run in one line with the earlier steps intact, and a step with a missing OCDBT
manifest is set aside with one notice and no "Event loop is closed" tracebacks (17); a stage
started from a step with NaN params stops in one line (5)."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from pathlib import Path

import jax
import pytest
import yaml

from esrt_jax.config import ConfigError
from esrt_jax.cli import train as run_cli
from esrt_jax.train.config import load_run_config
from helpers_fs import read_only, remount, tmpfs
from train_toy import toy_yaml

ROOT = Path(__file__).resolve().parents[1]


def _one_line(e) -> str:
    msg = str(e.value.code)
    assert len(msg.splitlines()) == 1 and msg.startswith("error: "), msg
    return msg


# ----------------------------------------------------------------------------- the run-dir lock (2)

def test_second_trainer_on_a_run_dir_is_refused_naming_the_holder(tmp_path):
    y = toy_yaml(tmp_path)
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from esrt_jax.files import lock_run_dir; "
         "f = lock_run_dir(sys.argv[1]); print('locked', flush=True); time.sleep(120)", str(run)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    try:
        assert holder.stdout.readline().strip() == "locked"
        base = ["--stage=asr", "--config", str(y), "--run-dir", str(run), "--compile-cache", ""]
        with pytest.raises(SystemExit) as e:
            run_cli.main(base)
        msg = _one_line(e)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in msg and str(run) in msg, msg
        assert not (run / "asr").exists() and not (run / "config.yaml").exists()  # touched nothing
    finally:
        holder.kill()
        holder.wait()
    (res,) = run_cli.main(base)  # the holder is gone (killed): its lock went with it
    assert res.final_step == 5


def test_init_from_a_checkpoint_with_nan_params_is_one_line(tmp_path):
    """Item 5 on the training side: a stage started from a step whose params hold NaN (the one
    restore every reader shares) stops in one line naming the step and the param, before training."""
    import numpy as np

    from esrt_jax.train.checkpoint import Checkpointer, restore_params

    y = toy_yaml(tmp_path)
    base = ["--stage=asr", "--config", str(y), "--compile-cache", ""]
    run_cli.main(base + ["--run-dir", str(tmp_path / "a")])
    ck_dir = tmp_path / "a" / "asr" / "checkpoints"
    params, step = restore_params(ck_dir, _abstract(y))
    ck = Checkpointer(ck_dir, async_save=False)
    ck.save(step + 1, jax.tree.map(lambda x: x * np.nan, params), {"count": np.zeros((), np.int32)})
    ck.close()
    with pytest.raises(SystemExit) as e:
        run_cli.main(base + ["--run-dir", str(tmp_path / "b"), "--init-from", str(ck_dir)])
    msg = _one_line(e)
    assert f"cannot start from {ck_dir}: checkpoint {ck_dir}/{step + 1}: param " in msg and "NaN or Inf" in msg, msg
    new = tmp_path / "b" / "asr" / "checkpoints"
    assert not new.exists() or not any(new.iterdir())  # nothing trained from it


def _abstract(y):
    cfg = load_run_config(y).for_stage("asr")
    return cfg.model_builder()(cfg, abstract=True).trainable


# ----------------------------------------------------------------------------- shipped configs (15)

def test_demo_config_dry_runs(capsys):
    """The reported crash: `train.py --config configs/demo.yaml --stage=asr --dry-run` (token dropout
    under abstract params)."""
    (rep,) = run_cli.main(["--config", str(ROOT / "configs" / "demo.yaml"), "--stage=asr", "--dry-run",
                           "--compile-cache", ""])
    assert rep["trainable_params"] > 0 and "GiB per device" in capsys.readouterr().out


def _shipped():
    return sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("name", _shipped())
def test_every_shipped_config_builds_and_traces_every_stage(name):
    """Each stage of each shipped config: the abstract model (no weights read) and its loss traced on
    the batch the dry run compiles (XLA compile skipped: minutes for the 12-32B configs on a CPU).
    The mesh is the one the dry run simulates for it (`dry_run_devices`), fitted to this process's 8."""
    path = ROOT / "configs" / name
    cfg = load_run_config(path)
    over = []
    if run_cli.dry_run_devices(cfg.mesh) > len(jax.devices()):
        over = ["mesh.data=-1", "mesh.fsdp=2", "mesh.tensor=2"]
    for key in ("whisper", "llm"):  # real local HF dirs (real_small): only where they are built
        spec = cfg.model.get(key)
        if spec and not cfg.model.get(f"{key}_config") and not (Path(spec) / "config.json").is_file():
            pytest.skip(f"{name}: model.{key} {spec} is not built here")
    if cfg.data.get("encoder_cache") and not (Path(cfg.data["encoder_cache"]) / "meta.json").is_file():
        over.append("data.encoder_cache=null")
    cfg = load_run_config(path, over)
    for stage in cfg.curriculum():  # align only where the config has stages.align
        scfg = cfg.for_stage(stage)
        b = scfg.model_builder()(scfg, abstract=True)
        loss, _ = jax.eval_shape(b.loss_fn, b.trainable, b.frozen, b.batch_spec(2), jax.random.key(0))
        assert loss.shape == (), (name, stage)


def test_dry_run_sizes_the_simulated_mesh_from_the_config():
    mesh = lambda n: load_run_config(ROOT / "configs" / n).mesh  # noqa: E731
    assert run_cli.dry_run_devices(mesh("esrt_12b.yaml")) == 16  # fsdp 4 x tensor 4
    assert run_cli.dry_run_devices(mesh("llm_srt_7b.yaml")) == 8
    from esrt_jax.train.config import MeshConfig

    assert run_cli.dry_run_devices(MeshConfig(data=3, fsdp=2)) == 6
    assert run_cli.dry_run_devices(MeshConfig(fsdp=3)) == 9


# ----------------------------------------------------------------------------- config values (16)

def test_llm_config_values_are_type_checked(tmp_path):
    from esrt_jax.speech.config import speech_config

    d = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    d["model"]["llm_config"]["hidden_size"] = "big"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match=r"^model\.llm_config\.hidden_size: expected an integer, got 'big'$"):
        speech_config(load_run_config(tmp_path / "c.yaml").for_stage("asr"))


def test_data_languages_as_a_string_is_refused(tmp_path):
    d = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    d["data"]["languages"] = "eng"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match=r"data\.languages: expected a list of language codes, e\.g\. \[eng\]"):
        load_run_config(tmp_path / "c.yaml")


def test_damaged_run_config_read_by_infer_is_one_line(tmp_path, capsys):
    from esrt_jax.cli.infer import main as infer_main
    from helpers_sllm import make_tiny_run

    cfg, run, _ = make_tiny_run(tmp_path)
    (run / "config.yaml").write_text("model: {whisper: [unclosed\ndata:\n  - : :\n")  # saved by train.py
    rc = infer_main(["--config", str(cfg), "--checkpoint", str(run), "--audio", "x.wav", "--src", "eng",
                     "--tgt", "deu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and str(run / "config.yaml") in err and "line" in err, err
    rc = infer_main(["--config", str(run / "config.yaml"), "--checkpoint", str(run), "--audio", "x.wav",
                     "--src", "eng", "--tgt", "deu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "not valid YAML" in err, err


# ----------------------------------------------------------------------------- read-only run dir (17)

def test_read_only_run_dir_is_one_line(tmp_path):
    y = toy_yaml(tmp_path)
    run = tmp_path / "run"
    base = ["--stage=asr", "--config", str(y), "--run-dir", str(run), "--compile-cache", ""]
    run_cli.main(base)  # finished
    with pytest.MonkeyPatch.context() as m:
        read_only(m, run)
        with pytest.raises(SystemExit) as e:
            run_cli.main(base + ["--set", "train.log_every=2"])
    msg = _one_line(e)
    assert "read-only file system" in msg and str(run) in msg, msg


def test_read_only_mount_as_run_dir_is_one_line(tmp_path):
    """The same on a real read-only mount (root ignores permission bits, not a read-only mount)."""
    y = toy_yaml(tmp_path)
    with tmpfs(tmp_path / "mnt", "8m") as mnt:
        run = Path(mnt) / "run"
        base = ["--stage=asr", "--config", str(y), "--run-dir", str(run), "--compile-cache", ""]
        run_cli.main(base)
        remount(mnt, "ro")
        with pytest.raises(SystemExit) as e:
            run_cli.main(base + ["--set", "train.log_every=2"])
        msg = _one_line(e)
        assert "read-only file system" in msg and str(run) in msg, msg


# ----------------------------------------------------------------------------- checkpoints on a failing disk (17)

def _train(args, **kw):
    """train.py in a child process (its real stderr: Orbax's threads and atexit hooks included)."""
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, **kw,
                          env={"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "PATH": "/usr/bin:/bin",
                               "JAX_PLATFORMS": "cpu"})


def test_checkpoint_save_on_a_full_disk_is_one_line_and_keeps_the_earlier_steps(tmp_path):
    """A real 400 KiB file system fills up during the third or so save: one line naming the folder,
    the step and the cause, rc != 0, no traceback (today: ~300 lines of Orbax threads' tracebacks);
    the earlier steps are intact and no partial step is left; with room, the rerun resumes from
    the newest of them and finishes."""
    y = toy_yaml(tmp_path, steps=16, ckpt_every=2, keep=3)
    with tmpfs(tmp_path / "mnt", "400k") as mnt:
        run = Path(mnt) / "run"
        args = ["--stage=asr", "--config", str(y), "--run-dir", str(run), "--compile-cache", ""]
        r = _train(args)
        err = r.stderr.strip().splitlines()
        assert r.returncode != 0 and "Traceback" not in r.stderr and "Event loop is closed" not in r.stderr, r.stderr
        ck = run / "asr" / "checkpoints"
        last = err[-1]
        assert last.startswith("error: [asr] cannot save checkpoint step ") and \
            f"{ck}: no space left on device" in last, r.stderr
        kept = sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit())
        assert kept and f"resume from step {kept[-1]}" in last, (kept, last)
        assert [p.name for p in ck.iterdir() if not p.name.isdigit()] == []  # no partial step left
        remount(mnt, "size=8m")
        r = _train(args)
        assert r.returncode == 0, r.stderr
        assert f"resumed from {ck}/{kept[-1]} (step {kept[-1]})" in r.stdout and "done: step 16" in r.stdout, r.stdout


_SET_ASIDE = """
import sys, shutil, pathlib
import jax, numpy as np
from esrt_jax.train.checkpoint import Checkpointer
d = pathlib.Path(sys.argv[1])
tree = {f"w{i:03d}": np.full((8,), i, np.float32) for i in range(300)}  # many reads in flight
opt = {"count": np.zeros((), np.int32)}
ab = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (tree, opt))
for n, damage in enumerate(["manifest", "data"] * 3):
    ck = Checkpointer(d / str(n), async_save=False)
    ck.save(1, tree, opt); ck.save(2, tree, opt); ck.close()
    item = d / str(n) / "2" / "params"
    if damage == "manifest":
        (item / "manifest.ocdbt").unlink()
    else:  # what validation cannot see: Orbax reads it and fails
        for f in (item / "d").iterdir():
            f.write_bytes(b"")
    ck = Checkpointer(d / str(n))
    assert ck.restore_latest(*ab)["meta"]["step"] == 1
    ck.close()
"""


def test_unretrieved_sibling_read_failures_are_not_logged(caplog):
    """The other reads of a batch whose first failure Orbax raised end as tasks nobody awaits;
    when they are collected asyncio logged each with a traceback. Other task failures still log."""
    import asyncio
    import gc

    import esrt_jax.train.checkpoint  # noqa: F401  (installs the filters)

    async def fail(msg):
        raise ValueError(msg)

    async def start(msg, gathered):  # a batch's task, or (a full disk) its gather, that nobody awaits
        return asyncio.gather(fail(msg), fail(msg)) if gathered else asyncio.ensure_future(fail(msg))

    def orphan(msg, gathered=False):
        loop = asyncio.new_event_loop()
        fut = loop.run_until_complete(start(msg, gathered))
        loop.run_until_complete(asyncio.sleep(0.01))
        loop.close()
        del fut
        gc.collect()

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        orphan('OUT_OF_RANGE: Error opening "zarr" driver [tensorstore_spec=\'{}\']')
        orphan("RESOURCE_EXHAUSTED: Error writing \"w/0\": No space left on device [os_error_code='28']", gathered=True)
        assert not caplog.records, [r.getMessage() for r in caplog.records]
        orphan("a bug of ours")
        assert [r.getMessage().splitlines()[0] for r in caplog.records] == ["Task exception was never retrieved"]


def test_step_without_its_ocdbt_manifest_is_set_aside_with_one_notice_only(tmp_path):
    """Today each such recovery printed dozens of 'Event loop is closed' tracebacks (tensorstore
    answering into the event loop Orbax had closed) before the notice; now the notice alone."""
    r = subprocess.run([sys.executable, "-c", _SET_ASIDE, str(tmp_path)], capture_output=True, text=True,
                       cwd=ROOT, timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                                   "JAX_PLATFORMS": "cpu"})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 0 and "Event loop is closed" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 6 and all(line.startswith("warning: checkpoint step 2 in ") for line in lines), r.stderr
    assert sum("(UnreadableCheckpoint: params/manifest.ocdbt is missing)" in line for line in lines) == 3, r.stderr
