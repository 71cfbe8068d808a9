"""Inference: generation, the `Translator`, the edge payload codec, the cloud service backend and
file-level batch inference (loading a trained run is `esrt_jax.speech.load`)."""
