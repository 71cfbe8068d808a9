"""Orbax checkpoints of a training stage.

One checkpoint = a step folder with four items:
  params  trainable params (pytree of arrays; Orbax/tensorstore, written collectively)
  opt     optimizer state (mirrors the params)
  meta    JSON: step, RNG key data, stage name
  data    the Grain iterator state (grain.checkpoint handler: one JSON file per process)

Saves are async (training continues while tensorstore writes); Orbax writes into a
temporary folder and renames it when complete, so a kill -9 at any moment leaves either
the previous or the new checkpoint, never a torn one. Restores take abstract targets
(`jax.ShapeDtypeStruct` with a sharding), so a checkpoint written on 8 devices restores
onto 1 device or any other mesh.

A step that cannot be read back (a truncated or damaged file) is moved aside to `<step>.corrupt`
with a one-line notice and the previous kept step is used; a step whose param shapes or optimizer
state differ from the model's (a changed config) is never touched: that is a `CheckpointMismatch`.

A save that the file system refuses (a full disk, a read-only mount) is a `CheckpointWriteError`:
one line naming the folder, the step and the cause; the step's partial temporary folder is
removed and the earlier steps are left as they were. Orbax's own reports of that failure (absl
ERROR records with tracebacks from its save threads) and tensorstore's "Event loop is closed"
callbacks into the event loop Orbax already closed, and asyncio's "... exception was never
retrieved" for the other reads or writes of a failed batch, are dropped: they are noise around a cause that
is reported once (see `_quiet_orbax`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from esrt_jax.files import os_error_line
from esrt_jax.pytree import first_non_finite, merge_trees


class UnreadableCheckpoint(ValueError):
    """A checkpoint step cannot be read back: the message names the folder/step and what to do."""


class CheckpointMismatch(ValueError):
    """The checkpoint's params or optimizer state do not fit the model and optimizer of the config."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (full disk, read-only file system): the message names the
    folder, the step, the cause and the step a rerun resumes from."""


_OS_CODE = re.compile(r"\[os_error_code='(\d+)'\]")  # how tensorstore names the errno


def os_cause(err: BaseException | None) -> int | None:
    """The errno of the file-system failure behind an Orbax/tensorstore error, following the
    exception chain (None: no file-system cause, e.g. a bug, which is re-raised as it is)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno:
            return err.errno
        m = _OS_CODE.search(str(err))
        if m:
            return int(m.group(1))
        err = err.__cause__ or err.__context__
    return None


class _OrbaxWriteFailureFilter(logging.Filter):
    """Drops Orbax's ERROR records (with tracebacks, one per save thread) about a file-system
    failure: `Checkpointer` reports that failure in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or "orbax" not in record.pathname:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        return os_cause(exc) is None and not _OS_CODE.search(record.getMessage())


class _SiblingFailureFilter(logging.Filter):
    """Drops asyncio's "Task / _GatheringFuture exception was never retrieved" for a tensorstore
    error (a read or write failure: its message carries the tensorstore spec or an errno): another
    read or write of a batch whose first failure Orbax already raised (and `Checkpointer` reported)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or "exception was never retrieved" not in record.getMessage().split("\n", 1)[0]:
            return True
        return not ("tensorstore_spec" in str(exc) or os_cause(exc) is not None)


def _closed_loop_callback(u) -> bool:
    """An unraisable `RuntimeError('Event loop is closed')` from `loop.call_soon_threadsafe`:
    tensorstore delivering the result of a read or write that Orbax stopped waiting for (the first
    failure of a batch ends Orbax's `run_until_complete` and closes its loop; the rest of the batch
    completes later, into the closed loop). Nothing is lost: the first failure is what is raised."""
    if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
        return False
    tb = u.exc_traceback
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
            return True
        tb = tb.tb_next
    return False


def _quiet_orbax() -> None:
    """Install `_OrbaxWriteFailureFilter` on absl's logger (Orbax logs through absl),
    `_SiblingFailureFilter` on asyncio's, and a `sys.unraisablehook` that drops
    `_closed_loop_callback` noise and passes the rest on."""
    for name, kind in (("absl", _OrbaxWriteFailureFilter), ("asyncio", _SiblingFailureFilter)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())
    prev = sys.unraisablehook
    if getattr(prev, "_esrt_quiet", False):
        return

    def hook(u):
        if not _closed_loop_callback(u):
            prev(u)
    hook._esrt_quiet = True
    sys.unraisablehook = hook


_quiet_orbax()


def _flat_shapes(tree: Any) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): tuple(leaf.shape)
            for path, leaf in leaves}


def shape_mismatches(saved: Any, abstract: Any) -> list[str]:
    """Param paths whose shape differs (or that exist on one side only), as 'path: saved vs model'."""
    a, b = _flat_shapes(saved), _flat_shapes(abstract)
    out = [f"{k}: {a.get(k, 'missing')} vs {b.get(k, 'missing')}" for k in sorted(a.keys() | b.keys())
           if a.get(k) != b.get(k)]
    return out


def item_problem(item_dir: Path) -> str | None:
    """Why an Orbax item folder (a step's params or opt) cannot be read, found without Orbax: its
    `_METADATA` or, in an OCDBT checkpoint, its root `manifest.ocdbt` is missing or empty. None: no
    such problem. (Orbax would fail on the first array it opens and leave the other reads of the
    batch to call back into the event loop it closed: a traceback each.)"""
    need = ["_METADATA"] + (["manifest.ocdbt"] if any(item_dir.glob("ocdbt.process_*")) else [])
    for name in need:
        f = item_dir / name
        if not f.is_file():
            return f"{item_dir.name}/{name} is missing"
        if f.stat().st_size == 0:
            return f"{item_dir.name}/{name} is empty"
    return None


def saved_tree(directory: Path, step: int, item: str = "params") -> Any:
    """The tree of `ArrayMetadata` (shapes, dtypes) of a step's `item` (params or opt), read without
    restoring. `UnreadableCheckpoint` when `item_problem` finds the folder incomplete."""
    item_dir = Path(directory) / str(step) / item
    problem = item_problem(item_dir)
    if problem:
        raise UnreadableCheckpoint(problem)
    meta = ocp.StandardCheckpointHandler().metadata(item_dir)
    return getattr(meta, "tree", meta)


def state_skeleton(tree: Any) -> Any:
    """A pytree's nesting and leaf shapes in the form Orbax stores it: tuples as lists, named tuples
    as dicts of their fields, empty nodes (optax's EmptyState) as None, leaves as shapes. Compared
    whole, not leaf by leaf as `shape_mismatches` does: one more EmptyState in an optax chain adds
    no leaf, yet Orbax refuses to restore into it."""
    if hasattr(tree, "shape"):
        return tuple(tree.shape)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        tree = {f: getattr(tree, f) for f in tree._fields}
    if isinstance(tree, Mapping):
        out = {str(k): state_skeleton(v) for k, v in tree.items()}
    elif isinstance(tree, (list, tuple)):
        out = [state_skeleton(v) for v in tree]
    else:
        return None
    return out or None


class _IterState:
    """Adapter between a data iterator and grain's Orbax handler.

    The handler calls `get_state()` from Orbax's background thread when saving async, by
    which time the loop has consumed more batches; so the state is captured at `save()`
    time here. Also lets any object with get_state/set_state (dict or bytes state) be saved.
    """

    def __init__(self, it: Any, snapshot: bool):
        self.it = it
        self.state = _encode_state(it.get_state()) if snapshot else None

    def get_state(self) -> bytes:
        return self.state

    def set_state(self, state: bytes) -> None:
        cur = self.it.get_state()
        self.it.set_state(json.loads(state) if isinstance(cur, dict) else state)

    def start_prefetch(self) -> None:
        if hasattr(self.it, "start_prefetch"):
            self.it.start_prefetch()


def _encode_state(state: Any) -> bytes:
    return state if isinstance(state, bytes) else json.dumps(state).encode()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with the given shardings (restore targets)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` for one stage's folder."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        handlers = {
            "params": ocp.StandardCheckpointHandler(),
            "opt": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
        }
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._pending: int | None = None  # the step of the async save in flight
        self.failed = False  # a save failed (reported); close() then only lets go of Orbax

    def latest_step(self) -> int | None:
        return self.mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.mngr.all_steps())

    def save(self, step: int, trainable: Any, opt_state: Any, *, rng: jax.Array | None = None,
             data_iter: Any = None, meta: dict | None = None, force: bool = True) -> bool:
        m = {"step": int(step), **(meta or {})}
        if rng is not None:
            m["rng"] = np.asarray(jax.random.key_data(rng)).tolist()
        items = {"params": ocp.args.StandardSave(trainable), "opt": ocp.args.StandardSave(opt_state),
                 "meta": ocp.args.JsonSave(m)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_IterState(data_iter, snapshot=True))
        self._finish()  # the previous async save: its failure is that step's
        try:
            saved = self.mngr.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:  # noqa: BLE001 - re-raised unless it is a file-system failure
            self._write_failed(step, e)
            raise
        self._pending = step
        return saved

    def _finish(self) -> None:
        """Wait for the async save in flight (`CheckpointWriteError` when the file system refused it)."""
        step, self._pending = self._pending, None
        try:
            self.mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - re-raised unless it is a file-system failure
            self._write_failed(step, e)
            raise

    def _write_failed(self, step: int | None, err: Exception) -> None:
        """Raise `CheckpointWriteError` for a save of `step` that failed with a file-system error
        (after removing its partial temporary folder); return for any other error."""
        code = os_cause(err)
        if code is None:
            return
        self.failed = True
        if jax.process_index() == 0 and step is not None:
            for tmp in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(tmp, ignore_errors=True)  # frees the space it took; never a whole step
        try:
            self.mngr.reload()
            kept = [s for s in self.all_steps() if s != step]
        except Exception:  # noqa: BLE001 - listing the folder failed too: say nothing about it
            kept = None
        cause = os_error_line(OSError(code, os.strerror(code)), self.directory)
        if kept:
            after = (f"the earlier checkpoints (step {', '.join(map(str, sorted(kept)))}) are intact: "
                     f"free space (or fix the mount) and rerun the same command to resume from step {max(kept)}")
        elif kept is None:
            after = "free space (or fix the mount) and rerun the same command"
        else:
            after = "no earlier checkpoint of this stage exists: free space and rerun to start it again"
        raise CheckpointWriteError(f"cannot save checkpoint step {step}: {cause}; {after}") from None

    def check_shapes(self, step: int, abstract_trainable: Any, abstract_opt: Any = None) -> None:
        """Raise `CheckpointMismatch` when `step`'s saved params do not fit `abstract_trainable`, or
        its optimizer state does not fit `abstract_opt` (other errors: the step's metadata is
        unreadable)."""
        bad = shape_mismatches(saved_tree(self.directory, step), abstract_trainable)
        if bad:
            raise CheckpointMismatch(f"checkpoint {self.directory}/{step} does not fit the model: "
                                     f"{len(bad)} params differ, e.g. {bad[0]}")
        if abstract_opt is not None and (state_skeleton(saved_tree(self.directory, step, "opt"))
                                         != state_skeleton(abstract_opt)):
            # E.g. train.lr_scale or clip_norm changed mid-stage: the optax chain has other elements.
            raise CheckpointMismatch(
                f"checkpoint {self.directory}/{step} has another optimizer state than the config's optimizer "
                f"(was train.lr_scale or train.clip_norm changed?): revert the change to resume, or start a "
                f"new run dir from its params with --init-from {self.directory}")

    def restore_latest(self, abstract_trainable: Any, abstract_opt: Any, data_iter: Any = None) -> dict | None:
        """`restore` of the newest readable step (None: no step at all). Unreadable steps are moved
        aside to `<step>.corrupt` (reported in one line each); if none is left, `UnreadableCheckpoint`."""
        bad: list[int] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                self.check_shapes(step, abstract_trainable, abstract_opt)
            except CheckpointMismatch:
                raise
            except Exception as e:  # noqa: BLE001 - any failure to read metadata = unreadable step
                self._set_aside(step, e)
                bad.append(step)
                continue
            try:
                return self.restore(step, abstract_trainable, abstract_opt, data_iter)
            except Exception as e:  # noqa: BLE001 - shapes fit, so a failed read is a damaged step
                self._set_aside(step, e)
                bad.append(step)
        if bad:
            raise UnreadableCheckpoint(
                f"no readable checkpoint left in {self.directory}: step(s) {', '.join(map(str, bad))} could not "
                f"be read and were moved aside to <step>.corrupt; delete the folder to restart this stage from "
                f"scratch (or copy an intact step back)")
        return None

    def _set_aside(self, step: int, err: Exception) -> None:
        src = self.directory / str(step)
        dst = self.directory / f"{step}.corrupt"
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        if jax.process_index() == 0:
            n = 1
            while dst.exists():
                dst, n = self.directory / f"{step}.corrupt{n}", n + 1
            os.replace(src, dst)
            print(f"warning: checkpoint step {step} in {self.directory} is unreadable "
                  f"({type(err).__name__}: {first}); moved it to {dst.name}, trying the previous step",
                  file=sys.stderr, flush=True)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint-aside-{step}")
        self.mngr.reload()

    def restore(self, step: int, abstract_trainable: Any, abstract_opt: Any,
                data_iter: Any = None) -> dict:
        """Restore params, optimizer state, meta (and the iterator, in place) at `step`."""
        items = {"params": ocp.args.StandardRestore(abstract_trainable),
                 "opt": ocp.args.StandardRestore(abstract_opt),
                 "meta": ocp.args.JsonRestore()}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(_IterState(data_iter, snapshot=False))
        out = self.mngr.restore(step, args=ocp.args.Composite(**items))
        res = {"params": out["params"], "opt": out["opt"], "meta": out["meta"]}
        if "rng" in res["meta"]:
            res["rng"] = jax.random.wrap_key_data(np.asarray(res["meta"]["rng"], np.uint32))
        return res

    def wait(self) -> None:
        self._finish()

    def close(self) -> None:
        """Wait for the save in flight (`CheckpointWriteError` if it failed) and let go of Orbax.
        After a reported failure, Orbax's stored error is not raised again."""
        try:
            if not self.failed:
                self._finish()
        finally:
            try:
                self.mngr.close()
            except Exception:  # noqa: BLE001 - after a failure Orbax raises it again: reported already
                if not self.failed:
                    raise


def _unreadable(directory: Path, step: int, err: Exception) -> UnreadableCheckpoint:
    first = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
    return UnreadableCheckpoint(
        f"checkpoint step {step} in {directory} is unreadable ({type(err).__name__}: {first}); rerun the "
        f"training command to move it aside and resume from the previous step, or pass an earlier step "
        f"dir {directory}/<step>")


def _keep_paths(tree: Any, keep: set[str], prefix: str = "") -> Any:
    """The nested-dict `tree` with only the leaves whose '/'-joined path is in `keep`."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            sub = _keep_paths(v, keep, path + "/")
            if sub:
                out[k] = sub
        elif path in keep:
            out[k] = v
    return out


def restore_params(directory: str | Path, abstract_trainable: Any, step: int | None = None, *,
                   fill: Any = None, drop: Sequence[str] = ()) -> tuple[Any, int]:
    """Only the trainable params of a stage's checkpoint folder (latest step by default).

    Used to start a stage from the previous stage's final params (optimizer restarts). `fill`
    (concrete params shaped like `abstract_trainable`, nested dicts): params that the checkpoint
    does not have are taken from it, with a one-line notice: params new in this stage, e.g. LoRA
    enabled after an adapter-only ASR stage. `drop`: regexes over the paths of params that only
    the checkpoint has and this model does not use (read, then left out, with a notice: the align
    stage's CTC head). Shape differences and other params only in the checkpoint are a
    `CheckpointMismatch`.
    """
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint folder {directory} does not exist")
    mngr = ocp.CheckpointManager(directory, item_handlers={"params": ocp.StandardCheckpointHandler()},
                                 options=ocp.CheckpointManagerOptions(create=False))
    try:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"checkpoint folder {directory} holds no complete checkpoint")
        try:
            bad = shape_mismatches(saved_tree(directory, step), abstract_trainable)
        except Exception as e:  # noqa: BLE001 - unreadable metadata
            raise _unreadable(directory, step, e) from None
        new = [b.split(":")[0] for b in bad if ": missing vs " in b] if fill is not None else []
        extra = [b.split(":")[0] for b in bad if b.endswith(" vs missing")
                 and any(re.search(p, b.split(":")[0]) for p in drop)]
        if len(new) + len(extra) < len(bad):
            bad = [b for b in bad if b.split(":")[0] not in new + extra]
            raise CheckpointMismatch(f"checkpoint {directory}/{step} does not fit the model built from the "
                                     f"config: {len(bad)} params differ, e.g. {bad[0]}")
        target = abstract_trainable
        if new:
            target = _keep_paths(abstract_trainable, set(_flat_shapes(abstract_trainable)) - set(new))
            print(f"note: {len(new)} params are not in {directory}/{step} and start from their initial "
                  f"values (new in this stage), e.g. {new[0]}", file=sys.stderr, flush=True)
        if extra:  # Orbax restores whole trees: read them too, then leave them out
            target = merge_trees(target, jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                                                      _keep_paths(saved_tree(directory, step), set(extra))))
            print(f"note: {len(extra)} params of {directory}/{step} are not used from here on and are "
                  f"left out, e.g. {extra[0]}", file=sys.stderr, flush=True)
        try:
            out = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
        except Exception as e:  # noqa: BLE001 - shapes fit, so a failed read is a damaged step
            raise _unreadable(directory, step, e) from None
        params = _keep_paths(out["params"], set(_flat_shapes(abstract_trainable))) if extra else out["params"]
        bad = first_non_finite(jax.tree_util.tree_flatten_with_path(params)[0])
        if bad is not None:  # damaged weights decode to nothing (or poison the next stage) without a word
            raise UnreadableCheckpoint(f"checkpoint {directory}/{step}: param {bad} holds NaN or Inf values "
                                       f"(damaged weights); pass an earlier step dir {directory}/<step>")
        return (merge_trees(fill, params) if new else params), step
    finally:
        mngr.close()
