"""`python -m esrt_jax.export`: see `esrt_jax.export.cli`."""

import sys

from esrt_jax.export.cli import main

if __name__ == "__main__":
    sys.exit(main())
