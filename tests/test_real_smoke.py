"""Real-weights smoke test: whisper-base + gemma-3-270m through the training builder.

`configs/real_small.yaml` (folders from $ESRT_REAL_DIR, default ~/.cache/esrt_jax/real) is trained
for two steps by the real CLI (`python train.py`, one CPU device) on four demo-corpus clips, with the
encoder running on the audio, LoRA on and the adapter over all 30 s of frames (the config's own ASR
stage is adapter-only over the real frames; the overrides keep the LoRA export path covered); the
stage's closing dev decode runs; the run is exported
to Hugging Face (LoRA merged) and imported back. Checked: the exported LLM, loaded by transformers,
gives our model's logits on [speech embeddings][text] (fp32), the merged weights differ from the
base checkpoint's (the LoRA factors were trained), and the re-imported run gives the same speech
embeddings and logits again.

The real folders are the hub's openai/whisper-base and google/gemma-3-270m downloaded into
$ESRT_REAL_DIR (the skip message gives the commands; `.ci/run` builds the same checkpoints offline,
docs/development.md); without them the test skips, except under CI=true.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors import safe_open

from helpers_real import REAL, hub_hint, skip_unless_ci

ROOT = Path(__file__).resolve().parents[1]
NEEDED = ("whisper-base", "gemma3-270m")
STEPS = 2


def _require_real():
    missing = [n for n in NEEDED if not (REAL / n / "config.json").is_file()]
    if missing:
        msg = f"real models {', '.join(missing)} not in {REAL} (ESRT_REAL_DIR); {hub_hint(missing)}"
        skip_unless_ci(msg)


def _tiny_set(path: Path) -> Path:
    """Four eng->deu records of the demo corpus (built on first use): four different sentences,
    absolute audio paths."""
    from esrt_jax.data.demo import build_demo_corpus, default_demo_dir

    d = build_demo_corpus(default_demo_dir(), progress=False)
    out, seen = [], set()
    for line in (d / "train.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if r["src"] == "eng" and r["tgt"] == "deu" and r["asr"] not in seen:
            seen.add(r["asr"])
            out.append({**r, "audio": str((d / r["audio"]).resolve())})
        if len(out) == 4:
            break
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out), encoding="utf-8")
    return path


def _config(root: Path, data: Path, overrides: list[str]) -> Path:
    """configs/real_small.yaml on `data` (train and dev), run dir ROOT/run, written to ROOT/config.yaml."""
    from esrt_jax.config import apply_overrides, load_yaml

    cfg = apply_overrides(load_yaml(ROOT / "configs" / "real_small.yaml"), [
        f"data.train=[{data}]", f"data.dev=[{data}]", "data.text_buckets=[32]", "data.languages=[eng,deu]",
        "train.eval_batches=1", "train.log_every=1", "train.progress=false", *overrides])
    cfg["run_dir"] = str(root / "run")
    (root / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root / "config.yaml"


def _cli(*args: str, timeout: int = 1200) -> None:
    """`python ARGS` on one CPU device (the real CLI, as a user runs it)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    _require_real()
    root = tmp_path_factory.mktemp("real_smoke")
    cfg = _config(root, _tiny_set(root / "tiny.jsonl"), [
        "data.encoder_cache=null", "data.enc_frame_bucket=0", "model.adapter.attend_padding=true",
        "stages.asr.lora.enabled=true", f"stages.asr.train.steps={STEPS}", "train.batch_size=2",
        "train.warmup_steps=0", "train.lr=1e-2", "train.decode_samples=2", f"train.ckpt_every={STEPS}",
        "model.decode.max_new_tokens=6", "model.adapter.num_queries=8"])
    _cli(str(ROOT / "train.py"), "--stage=asr", "--config", str(cfg))
    return root, root / "run"


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "asr" / "metrics.jsonl").read_text().splitlines()]


def test_two_steps_and_decode(run):
    _, run_dir = run
    rows = _metrics(run_dir)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == STEPS and all(np.isfinite(losses))
    dev = [r for r in rows if "dev_loss" in r]
    assert dev and np.isfinite(dev[-1]["dev_loss"])
    dec = [r for r in rows if "dev_wer" in r]  # the closing dev decode: greedy outputs scored
    assert dec and np.isfinite(dec[-1]["dev_wer"]) and dec[-1]["dev_distinct"] > 0


def _llm_logits_ours(model, speech, ids):
    import jax.numpy as jnp
    from esrt_jax.models.llm import positions_from_mask

    embeds, mask = model.llm_inputs(jnp.asarray(speech), jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32))
    return np.asarray(model.llm(embeds, positions_from_mask(mask), mask)[0])


def _tensor(model_dir: Path, name: str) -> np.ndarray:
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            if name in st.keys():
                return st.get_tensor(name).astype(np.float32)
    raise AssertionError(f"{name} not in {model_dir}")


def test_export_matches_transformers_and_reloads(run):
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM

    from esrt_jax import export as ex
    from esrt_jax.audio import mel_from_file
    from esrt_jax.speech.load import load_model

    root, run_dir = run
    loaded = load_model(run_dir / "config.yaml", run_dir)
    model, tok = loaded.model, loaded.tokenizer
    assert loaded.step == STEPS and model.llm.lora is not None
    clip = json.loads((root / "tiny.jsonl").read_text().splitlines()[0])
    mel = mel_from_file(clip["audio"], model.config.encoder.num_mel_bins)[0][None]
    speech = np.asarray(model.encode(jnp.asarray(mel)))                      # (1, 8, 640)
    ids = np.asarray([tok.encode("<|eng|>" + clip["asr"])[:16]], np.int32)  # [bos] + text
    ours = _llm_logits_ours(model, speech, ids)
    lora_b = np.abs(np.asarray(model.llm.layers.self_attn.q_proj.lora_b[...])).max()
    assert lora_b > 0, "the two steps did not train the LoRA factors"

    out = ex.export_run(run_dir, root / "hf").out
    assert (out / "llm" / "config.json").is_file() and (out / "adapter" / "llm_srt_adapter.safetensors").is_file()
    hf = AutoModelForCausalLM.from_pretrained(out / "llm", dtype=torch.float32,
                                              attn_implementation="eager").eval()
    with torch.no_grad():
        text = hf.get_input_embeddings()(torch.from_numpy(ids).long())        # Gemma's sqrt(d) scale inside
        theirs = hf(inputs_embeds=torch.cat([torch.from_numpy(speech), text], 1)).logits.numpy()
    scale = np.abs(ours).max()
    assert np.abs(ours - theirs).max() <= 1e-4 * scale, np.abs(ours - theirs).max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    print(f"exported LLM vs ours: max |logit diff| {np.abs(ours - theirs).max():.2e} (max |logit| {scale:.1f})")
    # The merged LoRA is in the export: q_proj differs from the base checkpoint's.
    name = "model.layers.0.self_attn.q_proj.weight"
    merged, base = _tensor(out / "llm", name), _tensor(REAL / "gemma3-270m", name)
    assert merged.shape == base.shape and np.abs(merged - base).max() > 1e-4
    del hf

    new_run = root / "reimported"
    ex.import_export(out, new_run)
    again = load_model(new_run / "config.yaml", new_run)
    np.testing.assert_allclose(np.asarray(again.model.encode(jnp.asarray(mel))), speech, atol=1e-5)
    np.testing.assert_allclose(_llm_logits_ours(again.model, speech, ids), ours, atol=1e-4 * scale)


HEAR_STEPS = 25


@pytest.mark.slow  # ~25 real train steps
def test_real_model_hears_four_clips(tmp_path):
    """The "can it hear at all" check on real weights: configs/real_small.yaml's recipe (LoRA, the
    Q-Former initialised at std 0.1) trained on four clips, ASR, must decode each of them exactly,
    and with each other's audio must not (docs/experiments/2026-12-real-speech.md)."""
    _require_real()
    data = _tiny_set(tmp_path / "four.jsonl")
    cfg = _config(tmp_path, data, [
        f"data.encoder_cache={tmp_path / 'cache'}", f"stages.asr.train.steps={HEAR_STEPS}",
        "stages.asr.lora.enabled=true",  # 4 clips decode within 25 steps with LoRA (adapter alone: slower)
        "train.batch_size=4", "train.warmup_steps=5", "train.decode_samples=4",
        f"train.ckpt_every={HEAR_STEPS}", "train.eval_every=0", "model.decode.max_new_tokens=16"])
    _cli("-m", "esrt_jax.data.encode_cache", "--config", str(cfg), "--out", str(tmp_path / "cache"),
         "--dtype", "bfloat16")
    _cli(str(ROOT / "train.py"), "--stage=asr", "--config", str(cfg))
    dec = [r for r in _metrics(tmp_path / "run") if "dev_wer" in r][-1]
    assert dec["dev_wer"] == 0.0 and dec["dev_distinct"] == 1.0, dec
    assert dec["dev_wer_gain"] >= 50, dec
