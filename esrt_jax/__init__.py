"""esrt-jax: JAX/Flax many-to-many speech translation (LLM-SRT and ESRT)."""

__version__ = "0.1.0"
