"""Hardening (issue 29) of export and import: a failed `--import` leaves an existing run dir as it
was and a new one absent (1), NaN/Inf weights and truncated safetensors are refused in one line (5,
17), the edge export on a full disk leaves no truncated model under its final name and says so
(4), a read-only export target (also on a real read-only mount) is a one-line error (17), and the
import/edge writers under a failing file system either finish or leave nothing (chaos)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from esrt_jax import export as ex
from esrt_jax.cli import export as export_cli
from helpers_fs import full_disk, read_only, remount, tmpfs
from helpers_sllm import make_tiny_run


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("hexport")
    cfg, run, _ = make_tiny_run(d)
    res = ex.export_run(run, d / "out", config=cfg)
    return d, res.out


def _copy_export(src, dst):
    shutil.copytree(src, dst)
    return dst


def _existing_run(d):
    """A run dir someone already has: a config.yaml and a metrics file."""
    run = d / "existing"
    run.mkdir()
    (run / "config.yaml").write_text("# my run\nrun_dir: elsewhere\n")
    (run / "notes.txt").write_text("keep me")
    return run


def _snapshot(d):
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


def _edit_tensor(f, fn):
    t = dict(load_file(str(f)))
    fn(t)
    save_file(t, str(f))


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for n in needles:
        assert n in err, err
    return err


def test_failed_import_never_touches_an_existing_run(exported, tmp_path, capsys):
    _, out = exported
    bad = _copy_export(out, tmp_path / "bad")
    _edit_tensor(bad / "adapter" / "model.safetensors", lambda t: t.__setitem__("query", t["query"][:, :3]))
    run = _existing_run(tmp_path)
    before = _snapshot(run)
    assert export_cli.main(["--import", str(bad), "--run", str(run), "--no-data-state"]) == 2
    _one_line_error(capsys, "query", "shape")
    assert _snapshot(run) == before  # config.yaml not rewritten, nothing added
    fresh = tmp_path / "fresh"
    assert export_cli.main(["--import", str(bad), "--run", str(fresh), "--no-data-state"]) == 2
    assert not fresh.exists()


@pytest.mark.parametrize("where", ["adapter/model.safetensors", "llm/model.safetensors"])
def test_import_refuses_non_finite_weights(exported, tmp_path, capsys, where):
    _, out = exported
    bad = _copy_export(out, tmp_path / "nan")

    def poison(t):
        k = sorted(k for k in t if t[k].dtype.kind == "f" and t[k].size > 1)[0]
        t[k] = t[k].copy()
        t[k].flat[1] = np.nan
    _edit_tensor(bad / where, poison)
    assert export_cli.main(["--import", str(bad), "--run", str(tmp_path / "new"), "--no-data-state"]) == 2
    _one_line_error(capsys, "NaN or Inf")
    assert not (tmp_path / "new").exists()


def test_export_refuses_a_checkpoint_with_nan_weights(tmp_path, capsys):
    """Item 5 on the export side: a run whose last step holds NaN params is not exported (the
    import would refuse it): one line naming the step and the param, nothing written."""
    import jax

    from esrt_jax.train.checkpoint import Checkpointer

    cfg, run, trained = make_tiny_run(tmp_path)
    ck = Checkpointer(run / "srt" / "checkpoints", async_save=False)
    ck.save(6, jax.tree.map(lambda x: x * np.nan, trained), {"count": np.zeros((), np.int32)})
    ck.close()
    assert export_cli.main(["--run", str(run), "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    _one_line_error(capsys, f"checkpoint {run / 'srt' / 'checkpoints'}/6: param adapter/", "NaN or Inf")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("where", ["adapter/model.safetensors", "llm/model.safetensors"])
def test_truncated_safetensors_at_import_is_one_line(exported, tmp_path, capsys, where):
    _, out = exported
    bad = _copy_export(out, tmp_path / "cut")
    f = bad / where
    os.truncate(f, f.stat().st_size // 2)
    assert export_cli.main(["--import", str(bad), "--run", str(tmp_path / "new"), "--no-data-state"]) == 2
    _one_line_error(capsys, "safetensors")
    assert not (tmp_path / "new").exists()


def test_import_on_a_full_disk_leaves_the_run_as_it_was(exported, tmp_path, monkeypatch, capsys):
    """Chaos: the import's writes fail after 0, 10 and 200 bytes; each time the existing run dir is
    unchanged and a new one absent; with room to spare it succeeds."""
    _, out = exported
    run = _existing_run(tmp_path)
    before = _snapshot(run)
    for budget in (0, 10, 200):
        with monkeypatch.context() as m:
            full_disk(m, budget)
            assert export_cli.main(["--import", str(out), "--run", str(run), "--no-data-state"]) == 2
        _one_line_error(capsys, "no space left on device")
        assert _snapshot(run) == before, budget
        assert not list(run.parent.glob(".*tmp*"))
    assert export_cli.main(["--import", str(out), "--run", str(run), "--no-data-state"]) == 0
    assert (run / "srt" / "checkpoints" / "5").is_dir() and "written by" in (run / "config.yaml").read_text()


def test_read_only_export_target_is_one_line(exported, tmp_path, monkeypatch, capsys):
    d, _ = exported
    target = tmp_path / "ro"
    target.mkdir()
    read_only(monkeypatch, target)
    assert export_cli.main(["--run", str(d / "runs"), "--config", str(d / "run.yaml"), "--out", str(target / "o")]) == 2
    _one_line_error(capsys, "read-only file system")


def test_read_only_mount_as_export_target_or_import_run_is_one_line(exported, tmp_path, capsys):
    """The same on a real read-only mount (root ignores permission bits, not a read-only mount):
    an export into it and an import whose run dir is on it; the existing run is left as it was."""
    d, out = exported
    with tmpfs(tmp_path / "mnt", "4m") as mnt:
        run = _existing_run(Path(mnt))
        before = _snapshot(run)
        remount(mnt, "ro")
        assert export_cli.main(["--run", str(d / "runs"), "--config", str(d / "run.yaml"),
                                "--out", str(Path(mnt) / "o")]) == 2
        _one_line_error(capsys, "read-only file system")
        assert export_cli.main(["--import", str(out), "--run", str(run), "--no-data-state"]) == 2
        _one_line_error(capsys, "read-only file system")
        assert _snapshot(run) == before and not (Path(mnt) / "o").exists()


def _fill_to(mnt, free: int) -> None:
    """Leave about `free` bytes free on the file system of `mnt` (a filler file)."""
    st = os.statvfs(mnt)
    with open(Path(mnt) / "filler", "ab") as f:
        f.write(b"\0" * max(st.f_bavail * st.f_frsize - free, 0))


def test_export_on_a_full_disk_keeps_the_previous_export(exported, tmp_path, capsys):
    """Chaos on a real size-limited file system: a re-export into OUT that runs out of space (at the
    start, part way, near the end) leaves the previous export in OUT byte for byte, says 'no space
    left on device' in one line and leaves no temporary folder; with room it is replaced whole."""
    d, out = exported
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    with tmpfs(tmp_path / "mnt", f"{3 * size // 1024 + 256}k") as mnt:
        target = Path(mnt) / "o"
        args = ["--run", str(d / "runs"), "--config", str(d / "run.yaml"), "--out", str(target)]
        assert export_cli.main(args) == 0
        capsys.readouterr()
        before = _snapshot(target)
        for free in (0, size // 2, size - 8192):
            _fill_to(mnt, free)
            assert export_cli.main(args) == 2, free
            _one_line_error(capsys, "no space left on device")
            assert _snapshot(target) == before, free
            assert sorted(p.name for p in Path(mnt).iterdir()) == ["filler", "o"], free
            (Path(mnt) / "filler").unlink()
        assert export_cli.main(args) == 0
        assert sorted(p.name for p in Path(mnt).iterdir()) == ["o"]
        assert _snapshot(target).keys() == before.keys()
        assert ex.read_export(target)["source"]["step"] == 5


# ----------------------------------------------------------------------------- edge export (ONNX)

def test_edge_export_on_a_full_disk_leaves_no_truncated_model(tmp_path, monkeypatch):
    """Chaos: the edge export's writes fail at several points; the earlier export in OUT stays
    intact and loadable, no temporary or `-inferred` file is left, the error says 'no space left'."""
    pytest.importorskip("onnxruntime")
    from esrt_jax.edge import OnnxEdgeModel
    from esrt_jax.export.onnx_edge import export_edge_onnx
    from test_edge_onnx import mels, tiny_half

    half = tiny_half()
    out = tmp_path / "out"
    export_edge_onnx(half, "a" * 16, out, int8=True)
    good = {p.name: p.read_bytes() for p in out.iterdir()}
    size = len(good["edge.onnx"])
    for budget in (0, size // 2, size + 1000):  # in the fp32 file, in the int8 one
        with monkeypatch.context() as m:
            full_disk(m, budget)
            with pytest.raises(ex.ExportError, match="no space left on device"):
                export_edge_onnx(half, "b" * 16, out, int8=True)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == good, budget
    assert OnnxEdgeModel(out / "edge.int8.onnx").fingerprint == "a" * 16
    paths = export_edge_onnx(half, "b" * 16, out, int8=True)  # with room: replaced whole
    assert {p.name for p in out.iterdir()} == {"edge.onnx", "edge.int8.onnx"}
    assert OnnxEdgeModel(paths["fp32"]).fingerprint == "b" * 16
    assert OnnxEdgeModel(paths["int8"]).encode(mels(1)).shape[0] == 1
