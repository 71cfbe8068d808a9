"""The real-weights folders the real tests use, and their skip-or-fail rule."""

import os
from pathlib import Path

import pytest

REAL = Path(os.environ.get("ESRT_REAL_DIR") or "~/.cache/esrt_jax/real").expanduser()


def skip_unless_ci(msg: str) -> None:
    """Skip the test for `msg` (missing real folders), except under CI=true, where it fails:
    `.ci/run` builds the folders, so a missing one there is a bug."""
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true: " + msg)
    pytest.skip(msg)
