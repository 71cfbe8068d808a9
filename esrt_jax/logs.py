"""Logging set-up for the command lines (`python -m esrt_jax.serve`, ...).

`logging.basicConfig` does nothing once the root logger has a handler, and importing orbax (via
`esrt_jax.train.checkpoint`) gives it one: orbax's `ArrayHandler` logs through absl at import
time, before absl's own handler exists, and absl then calls `logging.basicConfig()` itself (a
WARNING-level stderr handler). So `setup()` replaces whatever handlers the imports installed.
"""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup(level: int = logging.INFO) -> None:
    """Root logger -> stderr at `level`, replacing handlers that imports installed; absl (orbax's
    checkpoint chatter) stays at WARNING."""
    logging.basicConfig(level=level, format=FORMAT, force=True)
    logging.getLogger("absl").setLevel(max(level, logging.WARNING))
