"""Flax NNX model families; each file holds one family with its HF mapping beside it."""
