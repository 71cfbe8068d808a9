"""The Colab notebook runs top to bottom on the CPU: the demo config (2 steps per stage), then its
section 7, the real path, on the local folders of $ESRT_REAL_DIR (whisper-base + gemma-3-270m on a
few Fillets records, with the encoder cache when it is there, 2 steps per stage, a tiny eval with the listening
diagnostic, export, transformers reload). The notebook is executed once per module; without the
real folders section 7 is switched off and the real test skips, except under CI=true, where it
fails (like tests/test_real_smoke.py). The real section is also the suite's one real-weights run of
every stage and the export with LoRA merged (test_real_smoke.py keeps the learning check)."""

import json
from pathlib import Path

import nbformat
import numpy as np
import pytest
import yaml
from nbclient import NotebookClient

from helpers_real import REAL, hub_hint, skip_unless_ci

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "colab" / "esrt_jax.ipynb"
REAL_NEEDS = ("whisper-base/config.json", "gemma3-270m/config.json", "fillets/train.jsonl",
              "fillets/dev.jsonl", "fillets_ces/train.jsonl", "fillets_ces/dev.jsonl")
ENC_CACHE = REAL / "enc_cache" / "whisper-base-fillets"  # used when there, else the encoder runs


def _real_missing() -> list[str]:
    return [p for p in REAL_NEEDS if not (REAL / p).is_file()]


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("notebook")
    env = {
        "ESRT_NOTEBOOK_STEPS": "2",
        "ESRT_NOTEBOOK_RUN_DIR": str(tmp / "run"),
        "ESRT_NOTEBOOK_EVAL_LIMIT": "1",
        # the closing dev decode (a generation compile per stage) in the first stage only
        "ESRT_NOTEBOOK_SET": "model.decode.max_new_tokens=8 train.eval_batches=1 train.decode_samples=4 "
                             "stages.smt.train.decode_samples=0 stages.srt.train.decode_samples=0 "
                             "train.progress=false train.log_every=1",
        # section 7 on the local folders: 2 records per direction, 2 steps per stage, 2 test
        # records per source into English
        "ESRT_NOTEBOOK_REAL": "off" if _real_missing() else "local",
        "ESRT_NOTEBOOK_REAL_RUN_DIR": str(tmp / "real"),
        "ESRT_NOTEBOOK_REAL_STEPS": "2",
        "ESRT_NOTEBOOK_REAL_RECORDS": "2",
        "ESRT_NOTEBOOK_REAL_EVAL_LIMIT": "2",
        "ESRT_NOTEBOOK_REAL_TGT": "eng",
        "ESRT_NOTEBOOK_REAL_SET": "model.decode.max_new_tokens=8 train.eval_batches=1 "
                                  "train.decode_samples=2 stages.smt.train.decode_samples=0 "
                                  "stages.srt.train.decode_samples=0 train.progress=false train.log_every=1",
        "JAX_PLATFORMS": "cpu",
        # one CPU device, as on a CPU runtime (conftest's 8 simulated devices would each hold a
        # replica of gemma-3-270m and whisper-base: ~20 GB by the SMT stage)
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
    }
    nb = nbformat.read(NOTEBOOK, as_version=4)
    with pytest.MonkeyPatch.context() as mp:  # the kernel inherits this environment
        for k, v in env.items():
            mp.setenv(k, v)
        client = NotebookClient(nb, timeout=1800, kernel_name="python3",
                                resources={"metadata": {"path": str(NOTEBOOK.parent)}})
        try:
            client.execute()  # raises CellExecutionError naming the failing cell
        finally:
            nbformat.write(nb, tmp / "executed.ipynb")  # for a look at the outputs
    outputs = {i: "".join(o.get("text", "") for o in c.get("outputs", []) if o.get("output_type") == "stream")
               for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    return tmp, nb, "\n".join(outputs.values())


@pytest.mark.slow  # executes the whole notebook in a kernel (end to end)
def test_notebook_runs_on_cpu(executed):
    tmp, nb, text = executed
    run_dir = tmp / "run"
    assert "using the checkout at" in text and "backend: cpu" in text
    assert "mesh {'data':" in text
    for stage in ("asr", "smt", "srt"):
        assert (run_dir / stage / "checkpoints" / "2").is_dir(), stage
    assert (run_dir / "eval" / "results.jsonl").is_file()
    pngs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
    assert pngs, "the BLEU heatmap was not displayed inline"
    out = run_dir.parent / "run_hf"
    assert (out / "llm" / "config.json").is_file() and (out / "esrt_config.json").is_file()
    assert "transformers reproduces the JAX output token for token" in text
    if _real_missing():
        assert "section 7 skipped (ESRT_NOTEBOOK_REAL)" in text


@pytest.mark.slow  # trains, evaluates and exports whisper-base + gemma-3-270m in the notebook
def test_notebook_real_path_on_local_folders(executed):
    missing = _real_missing()
    if missing:
        models = [m.split("/")[0] for m in missing if not m.startswith("fillets")]
        msg = (f"real folders {', '.join(missing)} not in {REAL} (ESRT_REAL_DIR); "
               + (hub_hint(models) + "; " if models else "")
               + ("the Fillets sets are built by the development tools (docs/development.md); without "
                  "them the notebook's section 7 takes FLEURS from the hub (ESRT_NOTEBOOK_REAL=hub)"
                  if any(m.startswith("fillets") for m in missing) else ""))
        skip_unless_ci(msg)
    tmp, nb, text = executed
    real = tmp / "real"
    assert "real path: local; configs/real_small.yaml + [" in text
    cfg = yaml.safe_load((real / "config.yaml").read_text())
    assert cfg["model"]["llm"] == str(REAL / "gemma3-270m")
    assert cfg["data"]["encoder_cache"] == (str(ENC_CACHE) if (ENC_CACHE / "meta.json").is_file() else None)
    assert cfg["data"]["train"] == [str(real / "data" / "fillets_train.jsonl"),
                                    str(real / "data" / "fillets_ces_train.jsonl")]
    # 2 records per direction: Dutch and Czech speech, 9 targets each
    assert "fillets_train.jsonl: 18 records, 9 directions" in text
    for stage in ("asr", "smt", "srt"):
        assert (real / stage / "checkpoints" / "2").is_dir(), stage
        assert f"real {stage}: step 2, loss" in text
    results = (real / "eval" / "results.jsonl").read_text().splitlines()
    assert len(results) == 4  # nld->eng, ces->eng, 2 each
    assert (real / "eval" / "results.swapped.jsonl").is_file()
    assert "listening: distinct outputs" in text
    assert "audio gain (each clip's audio replaced by another clip's): BLEU" in text
    assert (tmp / "real_hf" / "llm" / "config.json").is_file()
    assert "exported LLM vs ours on [speech][prompt]: max |logit diff|" in text
    assert "real path done: trained, evaluated, exported, reloaded" in text
    rows = [json.loads(line) for line in (real / "asr" / "metrics.jsonl").read_text().splitlines()]
    assert [np.isfinite(r["loss"]) for r in rows if "loss" in r] == [True, True]
    assert np.isfinite([r for r in rows if "dev_loss" in r][-1]["dev_loss"])
    assert [r for r in rows if "dev_wer" in r][-1]["dev_distinct"] > 0  # the closing dev decode
    smt = [json.loads(line) for line in (real / "smt" / "metrics.jsonl").read_text().splitlines()]
    assert any("dev_loss" in r for r in smt) and not any("dev_distinct" in r for r in smt)  # decode_samples 0


@pytest.mark.slow
def test_notebook_real_export_merges_lora(executed):
    """The notebook's real export (the srt stage trains LoRA): the merged q_proj differs from the
    base checkpoint's. (The re-import is tests/test_export.py's, on tiny models: identical eval.)"""
    if _real_missing():
        skip_unless_ci(f"real folders {', '.join(_real_missing())} not in {REAL}")
    from safetensors import safe_open

    def tensor(model_dir: Path, name: str) -> np.ndarray:
        for f in sorted(model_dir.glob("*.safetensors")):
            with safe_open(str(f), "np") as st:
                if name in st.keys():
                    return st.get_tensor(name).astype(np.float32)
        raise AssertionError(f"{name} not in {model_dir}")

    tmp, _, _ = executed
    name = "model.layers.0.self_attn.q_proj.weight"
    merged, base = tensor(tmp / "real_hf" / "llm", name), tensor(REAL / "gemma3-270m", name)
    assert merged.shape == base.shape and np.abs(merged - base).max() > 1e-5, "the LoRA factors were not merged"
