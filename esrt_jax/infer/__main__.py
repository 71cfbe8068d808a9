"""`python -m esrt_jax.infer`: runs the inference command, `esrt_jax.cli.infer` (the top layer).

Run by name (runpy), not imported: a command module may import every layer, the infer package
may not import upwards.
"""

import runpy

if __name__ == "__main__":
    runpy.run_module("esrt_jax.cli.infer", run_name="__main__", alter_sys=True)
