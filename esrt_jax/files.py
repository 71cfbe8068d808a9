"""Writing files so that a failure loses nothing: atomic replace, undo of a failed multi-file write,
one-line causes for OS errors, and an exclusive lock on a run dir.

`write_atomic` writes a temporary name beside the target and renames it (a full disk or a kill
leaves the old file or none, never a truncated one under the final name); `staged_dir` does the
same for a whole folder (an export). `UndoOnFailure` records
what a multi-file write is about to touch (files it replaces, paths it creates) and puts it back
when the block raises. `os_error_line` turns an `OSError` into the one line a CLI prints ("no
space left on device", "read-only file system", ...). `lock_run_dir` takes an exclusive `fcntl`
lock on RUN_DIR/.lock for the life of the process, so that two trainers never share a run dir.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
from pathlib import Path

LOCK_NAME = ".lock"


class RunDirLocked(RuntimeError):
    """Another process holds the run dir's lock: the message names its pid and host."""


def os_error_line(e: OSError, path: str | os.PathLike | None = None) -> str:
    """'PATH: no space left on device' style one-line cause of an OSError."""
    causes = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
              errno.EFBIG: "file too large for the file system (no space left?)",
              errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
              errno.EPERM: "operation not permitted"}
    if e.errno is None:  # raised with our own message (e.g. FileNotFoundError("checkpoint X does not exist"))
        return str(e)
    where = path or e.filename or "?"
    return f"{where}: {causes.get(e.errno, e.strerror or type(e).__name__)}"


def rust_os_error(e: Exception) -> OSError | None:
    """The OSError inside a Rust writer's error ('I/O error: No space left on device (os error 28)',
    safetensors), else None."""
    m = re.search(r"\(os error (\d+)\)", str(e))
    return OSError(int(m[1]), os.strerror(int(m[1]))) if m else None


def tmp_name(path: Path) -> Path:
    """The temporary sibling `write_atomic` writes `path` under first (same directory, same file system)."""
    return path.parent / f".{path.name}.tmp-{os.getpid()}"


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temporary sibling + fsync + rename; on failure the temporary
    is removed and `path` is untouched. Raises the OSError."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike):
    """Yields a temporary sibling of folder `final` to write a whole folder into; when the block
    succeeds it takes `final`'s place (an earlier `final` is renamed aside, then removed), when it
    raises it is removed and `final` is as it was (an earlier version, or absent)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    stage, old = tmp_name(final), final.parent / f".{final.name}.old-{os.getpid()}"
    for p in (stage, old):  # left by a killed run with this pid
        shutil.rmtree(p, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
        if final.exists():
            os.rename(final, old)
        os.rename(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if old.exists() and not final.exists():
            os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


class UndoOnFailure:
    """Context manager: `keep(path)` before replacing a file (its old bytes come back on failure, or
    it is removed when it did not exist), `created(path)` before creating a file or folder (removed on
    failure when it did not exist). The root folder is removed on failure when the block created it."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._root_new = not self.root.exists()
        self._files: list[tuple[Path, bytes | None]] = []
        self._new: list[Path] = []

    def keep(self, path: Path) -> None:
        self._files.append((path, path.read_bytes() if path.is_file() else None))

    def created(self, path: Path) -> None:
        if not path.exists():
            self._new.append(path)

    def __enter__(self) -> "UndoOnFailure":
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            return False
        if self._root_new:
            shutil.rmtree(self.root, ignore_errors=True)
            return False
        for p in reversed(self._new):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        for p, old in reversed(self._files):
            try:
                if old is None:
                    p.unlink(missing_ok=True)
                elif not p.is_file() or p.read_bytes() != old:
                    p.write_bytes(old)  # same size as before: fits where it was
            except OSError:
                pass  # best effort; the original error is what the caller reports
        return False


def lock_run_dir(run_dir: str | os.PathLike):
    """Exclusive lock on RUN_DIR/.lock for this process's lifetime (returns the open lock file; keep a
    reference). `RunDirLocked` (one line: holder pid and host) when another process holds it.
    A killed holder releases it (the kernel drops the lock with the process)."""
    import fcntl  # POSIX only

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            f.close()
            raise
        f.seek(0)
        holder = f.read().strip() or "an unknown process"
        f.close()
        raise RunDirLocked(f"run dir {run_dir} is in use by {holder} (lock {path}); wait for it to "
                           f"finish, stop it, or use another --run-dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
    f.flush()
    return f
