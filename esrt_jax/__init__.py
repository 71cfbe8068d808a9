"""esrt-jax: JAX/Flax many-to-many speech translation (LLM-SRT and ESRT)."""

import os

# transformers is only used for tokenizers and configs here; without torch its import prints the
# advisory "PyTorch was not found..." (twice: its __init__ can run twice). Silence that advice only.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
