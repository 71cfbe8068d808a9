"""The real-weights folders the real tests use, and their skip-or-fail rule."""

import os
from pathlib import Path

import pytest

REAL = Path(os.environ.get("ESRT_REAL_DIR") or "~/.cache/esrt_jax/real").expanduser()
# folder name under REAL -> the hub repository with the same checkpoint
HUB = {"whisper-base": "openai/whisper-base", "gemma3-270m": "google/gemma-3-270m",
       "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct"}


def hub_hint(names) -> str:
    """How a user gets the checkpoints `names` (folder names under REAL) from the Hugging Face hub."""
    cmds = [f"hf download {HUB[n]} --local-dir {REAL / n}" for n in names if n in HUB]
    gated = " (google/gemma-3-270m is gated: accept its license on the hub and `hf auth login` first)" \
        if "gemma3-270m" in names else ""
    return ("get them from the Hugging Face hub with " + " && ".join(f"`{c}`" for c in cmds) + gated
            if cmds else "")


def skip_unless_ci(msg: str) -> None:
    """Skip the test for `msg` (missing real folders), except under CI=true, where it fails:
    `.ci/run` builds the folders, so a missing one there is a bug."""
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true: " + msg)
    pytest.skip(msg)
