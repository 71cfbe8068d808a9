"""Hugging Face <-> esrt-jax parameter conversion."""
