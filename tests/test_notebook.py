"""The Colab notebook runs top to bottom on the CPU with the demo config (2 steps per stage)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "colab" / "esrt_jax.ipynb"


@pytest.mark.slow  # executes the whole notebook in a kernel (end to end)
def test_notebook_runs_on_cpu(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    env = {
        "ESRT_NOTEBOOK_STEPS": "2",
        "ESRT_NOTEBOOK_RUN_DIR": str(run_dir),
        "ESRT_NOTEBOOK_EVAL_LIMIT": "1",
        "ESRT_NOTEBOOK_SET": "model.decode.max_new_tokens=8 train.eval_batches=1 train.decode_samples=4 "
                             "train.progress=false train.log_every=1",
        "JAX_PLATFORMS": "cpu",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    try:
        client.execute()  # raises CellExecutionError naming the failing cell
    finally:
        nbformat.write(nb, tmp_path / "executed.ipynb")  # for a look at the outputs
    outputs = {i: "".join(o.get("text", "") for o in c.get("outputs", []) if o.get("output_type") == "stream")
               for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    text = "\n".join(outputs.values())
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
