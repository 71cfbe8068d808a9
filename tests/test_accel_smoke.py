"""bench/accel.py, the accelerator check: its --smoke run (the same code path on CPU, tiny dims) must
produce every section with numbers, so the prepared GPU command cannot rot; plus the batch search's
arithmetic and the bf16 peak table."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import accel  # noqa: E402

# Numbers each section must carry (None is allowed only where the CPU has no such figure).
REQUIRED = {
    "device": ["device_count"],
    "parity": [],
    "train": ["batch", "steps_per_s", "examples_per_s", "answer_tokens_per_s", "llm_positions_per_s",
              "flops_per_step_cost_analysis", "flops_per_step_hlo", "flops_per_step_model", "tflops_s",
              "compile_s", "loss_first", "loss_last"],
    "train_torch": ["batch", "steps_per_s", "examples_per_s", "loss_first", "ours_over_torch_examples_per_s"],
    "memory": ["peak_bytes", "dry_run_peak_estimate", "measured_over_estimate"],
    "encoder": ["audio_s_per_s", "torch_audio_s_per_s", "ratio_vs_torch", "tflops_s"],
    "decode": [],
}
CPU_NONE = {"train": ["mfu", "hfu", "mfu_cost_analysis", "peak_bf16_tflops"]}


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.timeout(1500)
def test_smoke_run_has_every_section_with_numbers(tmp_path):
    out = tmp_path / "accel.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as on one GPU
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "accel.py"), "--smoke", "--out", str(out),
                           "--xla-cache", str(tmp_path / "xla-cache")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1400)
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    secs = rep["sections"]
    assert set(secs) == set(accel.SECTIONS) | set(accel.DERIVED)
    failed = {k: v.get("error") for k, v in secs.items() if not v.get("ok")}
    assert not failed, f"sections failed: {failed}\n{proc.stdout[-3000:]}"
    assert proc.returncode == 0
    for name, keys in REQUIRED.items():
        for k in keys:
            assert _number(secs[name].get(k)), f"{name}.{k} = {secs[name].get(k)!r}"
    assert secs["device"]["platform"] == "cpu" and rep["smoke"] is True
    for k in CPU_NONE["train"]:  # no bf16 peak is claimed for a CPU, so no MFU either
        assert secs["train"][k] is None
    # parity: every item of each family measured at both precisions, and within tolerance on CPU
    from esrt_jax.models.llm import FAMILIES
    items = secs["parity"]["items"]
    assert {"whisper_encoder", "qformer"} <= set(items)
    assert {f"llm_{mt}" for mt in FAMILIES if mt != "gemma3"} <= set(items)
    for name, v in items.items():
        assert _number(v["fp32_err"]) and _number(v["bf16_err"]) and _number(v["torch_bf16_err"]), name
    assert secs["parity"]["pass"], items
    # the torch reference ran at the train section's batch; the step really trained
    assert secs["train_torch"]["batch"] == secs["train"]["batch"]
    assert secs["train"]["finite"] and secs["train"]["loss_last"] != secs["train"]["loss_first"]
    # the HLO count follows the loop trip counts, so it is not below XLA's once-per-loop-body count
    assert secs["train"]["flops_per_step_hlo"] >= secs["train"]["flops_per_step_cost_analysis"] * 0.9
    for b, row in secs["decode"]["batches"].items():
        assert _number(row["ours_tok_s"]) and _number(row["torch_tok_s"]), b
    assert set(secs["decode"]["batches"]) == {"1", "2"}


def test_batch_search_finds_the_largest_batch_under_the_budget():
    fixed, per_row = 10.0, 3.0
    calls = []

    def plan(b, superlinear=0.0):
        calls.append(b)
        temp = per_row * b + superlinear * b * b
        return {"per_device_bytes": {"peak_estimate": fixed + temp, "temporaries": temp}}

    b, tried = accel.search_batch(limit=400.0, b0=8, cap=512, multiple=8, plan=plan)
    assert b == 128 and fixed + per_row * b <= 400 < fixed + per_row * (b + 8)
    assert [t[0] for t in tried] == calls == [8, 128]
    # temporaries that grow faster than the batch: the first guess is over, the search shrinks
    b, tried = accel.search_batch(limit=400.0, b0=8, cap=512, multiple=8,
                                  plan=lambda b: plan(b, superlinear=0.05))
    assert fixed + per_row * b + 0.05 * b * b <= 400
    assert len(tried) > 2 and tried[-1][0] == b
    assert accel.search_batch(limit=400.0, b0=8, cap=8, multiple=8, plan=plan)[0] == 8
    with pytest.raises(RuntimeError, match="batch 8 needs"):
        accel.search_batch(limit=20.0, b0=8, cap=512, multiple=8, plan=plan)


def test_bf16_peak_table_by_device_kind():
    assert accel.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989
    assert accel.peak_bf16_tflops("NVIDIA H100 PCIe") == 756
    assert accel.peak_bf16_tflops("NVIDIA H200") == 989
    assert accel.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert accel.peak_bf16_tflops("TPU v4") == 275
    assert accel.peak_bf16_tflops("TPU v5 lite") == 197
    assert accel.peak_bf16_tflops("TPU v5") == 459
    assert accel.peak_bf16_tflops("TPU v6 lite") == 918
    assert accel.peak_bf16_tflops("cpu") is None
