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


# The demo config trained 3 ASR steps with LoRA: the one trained demo run of the session, shared by
# the export tests and the documentation snippets (tests/test_snippets.py).
DEMO_OVERRIDES = [
    "stages.asr.train.steps=3", "lora.enabled=true", "train.trainable=[]", "train.warmup_steps=0",
    "train.eval_batches=1", "train.decode_samples=4", "train.log_every=1", "train.progress=false",
    "model.decode.max_new_tokens=12", "model.decode.no_repeat_ngram_size=2",
]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """(root, run_dir): the demo trained 3 steps with LoRA; the run config is RUN_DIR/config.yaml."""
    from pathlib import Path

    import yaml

    from esrt_jax.config import apply_overrides, load_yaml
    from esrt_jax.cli import train as run

    root = tmp_path_factory.mktemp("demo_run")
    run_dir = root / "run"
    run_dir.mkdir()
    cfg = apply_overrides(load_yaml(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"), DEMO_OVERRIDES)
    cfg["run_dir"] = str(run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    run.main(["--stage", "asr", "--config", str(run_dir / "config.yaml"), "--run-dir", str(run_dir)])
    return root, run_dir


@pytest.fixture(scope="session")
def demo_exports(demo_run):
    """(merged, peft): the demo run exported to Hugging Face with LoRA merged, and as PEFT."""
    from esrt_jax import export as ex

    root, run_dir = demo_run
    return (ex.export_run(run_dir, root / "out_merged").out,
            ex.export_run(run_dir, root / "out_peft", peft=True).out)
