"""A full disk for tests, at the OS boundary: every file opened for writing (builtins.open / io.open
/ os.fdopen, which numpy, onnx, safetensors' Python side and our writers go through) shares one
byte budget; the write that crosses it writes what fits and raises OSError(ENOSPC), as a real full
file system does. Nothing of ours is replaced. Writers that bypass Python's file objects (Orbax's
tensorstore) need a real one: `tmpfs` mounts a size-limited file system (root only; skips else)."""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import os
import subprocess


class _Budget:
    def __init__(self, n: int):
        self.left = n
        self.hits = 0


class _LimitedFile:
    """Wraps a real file object opened for writing; counts bytes against the shared budget."""

    def __init__(self, f, budget: _Budget, name):
        self._f, self._b, self._name = f, budget, name

    def write(self, data):
        n = len(data)
        if n > self._b.left:
            part = self._b.left
            if part:
                self._f.write(data[:part])
                self._f.flush()
            self._b.left = 0
            self._b.hits += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self._name))
        self._b.left -= n
        return self._f.write(data)

    def __getattr__(self, k):
        return getattr(self._f, k)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return self._f.__exit__(*a)

    def __iter__(self):
        return iter(self._f)


def _writing(mode) -> bool:
    return any(c in str(mode) for c in "wax+")


def full_disk(monkeypatch, budget: int) -> _Budget:
    """From now on (until monkeypatch undoes it) at most `budget` more bytes can be written."""
    b = _Budget(budget)
    real_open, real_fdopen = builtins.open, os.fdopen

    def open_(file, mode="r", *args, **kw):
        f = real_open(file, mode, *args, **kw)
        return _LimitedFile(f, b, file) if _writing(mode) else f

    def fdopen(fd, mode="r", *args, **kw):
        f = real_fdopen(fd, mode, *args, **kw)
        return _LimitedFile(f, b, fd) if _writing(mode) else f

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(os, "fdopen", fdopen)
    return b


def read_only(monkeypatch, root) -> None:
    """Writes, new folders, renames and removals under `root` fail with OSError(EROFS), as on a
    read-only mount (works for root too, which ignores permission bits)."""
    root = os.path.abspath(os.fspath(root))
    real_open, real_mkdir, real_replace, real_unlink = builtins.open, os.mkdir, os.replace, os.unlink
    real_rename = os.rename

    def under(p) -> bool:
        try:
            return os.path.abspath(os.fspath(p)).startswith(root + os.sep) or os.path.abspath(os.fspath(p)) == root
        except TypeError:
            return False

    def refuse(p):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(p))

    def open_(file, mode="r", *args, **kw):
        if _writing(mode) and under(file):
            refuse(file)
        return real_open(file, mode, *args, **kw)

    def mkdir(p, *a, **kw):
        if under(p):
            if os.path.isdir(p):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(p))
            refuse(p)
        return real_mkdir(p, *a, **kw)

    def two(real):
        def f(a, b, *x, **kw):
            if under(a) or under(b):
                refuse(b)
            return real(a, b, *x, **kw)
        return f

    def unlink(p, *a, **kw):
        if under(p):
            refuse(p)
        return real_unlink(p, *a, **kw)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "replace", two(real_replace))
    monkeypatch.setattr(os, "rename", two(real_rename))
    monkeypatch.setattr(os, "unlink", unlink)


@contextlib.contextmanager
def tmpfs(path, size: str):
    """A real size-limited file system (tmpfs of `size`, e.g. "400k") mounted on `path` for the
    block; `remount(path, "ro")` etc. work inside it. Skips the test where mounting is not
    permitted (no root / no CAP_SYS_ADMIN, e.g. an unprivileged CI container)."""
    import pytest

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({(r.stderr or r.stdout).strip() or r.returncode}): "
                    f"needs root with CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True)


def remount(path, options: str) -> None:
    """Remount a `tmpfs` mount with `options` ("ro", "size=8m", ...)."""
    subprocess.run(["mount", "-o", f"remount,{options}", os.fspath(path)], check=True, capture_output=True)
