"""Flax NNX model families: pure modules with their HF tensor-name maps beside them, no file IO
(reading and writing checkpoint directories is `esrt_jax.convert`; see docs/architecture.md)."""
