"""Test setup: 8 simulated CPU devices, exact f32 matmuls, shared tiny fixtures."""

import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """`helpers_sllm.make_tiny_run` once per session: (config path, run dir) of a tiny srt run."""
    from helpers_sllm import make_tiny_run

    cfg_path, run_dir, _ = make_tiny_run(tmp_path_factory.mktemp("tiny_run"))
    return cfg_path, run_dir
