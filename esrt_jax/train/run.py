"""`python -m esrt_jax.train.run`: runs the command `esrt_jax.cli.train` (the top layer).

Run by name (runpy), not imported: a command may import every layer, this package may not import upwards.
"""

import runpy

if __name__ == "__main__":
    runpy.run_module("esrt_jax.cli.train", run_name="__main__", alter_sys=True)
