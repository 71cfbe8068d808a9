"""Inference: generation, edge payloads, cloud service."""
