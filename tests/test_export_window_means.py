"""HF export and re-import of the window-means adapter on real-length encoder windows (tiny model).

A tiny run (`helpers_sllm.make_tiny_run`) with `adapter.window_means: 2` and `encoder_window: real`
(encoder window 2 s, so a 0.6 s clip runs on a 1 s window) is exported: our adapter layout only (no
LLM-SRT files, said so in esrt_config.json and the card), the window recorded. The re-imported run
gives the original's speech embeddings and logits; the exported LLM in transformers gives our
logits on [speech][text], and the card's torch snippet gives our speech embeddings.
"""

import contextlib
import functools
import io
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from safetensors.numpy import load_file
from flax import nnx
from transformers import AutoModelForCausalLM

from esrt_jax import export as ex
from esrt_jax.audio import encoder_frames, mel_for_model
from esrt_jax.config import CheckpointError
from esrt_jax.convert.llm_srt import save_llm_srt_adapter
from esrt_jax.export.onnx_edge import require_full_window
from esrt_jax.infer.translator import encode_batch
from esrt_jax.models.llm import positions_from_mask
from esrt_jax.models.qformer import flat_params
from esrt_jax.speech.load import load_model, translator_for
from helpers_sllm import make_tiny_run, write_tone

torch.set_num_threads(1)

MEANS = ["model.adapter.window_means=2", "model.adapter.attend_padding=false",
         "model.whisper_config.max_source_positions=100"]  # 200 mel frames: a 2 s window
FRAMES = 200


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("export_means")
    cfg_path, run_dir, _ = make_tiny_run(d, overrides=MEANS)
    # The window changes no param: the run (trained, as a real one is, on a real-window encoder cache)
    # reads real windows from here on. No cache exists here: export and import must not need one.
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["model"]["encoder_window"] = "real"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = ex.export_run(run_dir, d / "hf", config=cfg_path).out
    ex.import_export(out, d / "imported", log=lambda *_: None)  # no data to open: params only
    clips = [write_tone(d / "short.wav", 0.6, 440.0), write_tone(d / "long.wav", 1.7, 660.0, seed=1)]
    audio = [sf.read(c, dtype="float32")[0] for c in clips]
    mel = np.stack([mel_for_model(a, 80, FRAMES) for a in audio])
    frames = np.array([encoder_frames(a.size, FRAMES // 2) for a in audio], np.int32)
    orig = load_model(cfg_path, run_dir)
    speech = translator_for(orig).encode(mel, frames)
    ids = np.random.default_rng(0).integers(3, 300, (2, 7))
    return {"d": d, "out": out, "new": d / "imported", "orig": orig, "clips": clips, "mel": mel,
            "frames": frames, "speech": speech, "ids": ids, "logits": _logits(orig.model, speech, ids)}


@functools.partial(jax.jit, static_argnums=0)
def _jit_logits(graphdef, state, speech, ids):
    model = nnx.merge(graphdef, state)
    embeds, mask = model.llm_inputs(speech, ids, jnp.ones(ids.shape, jnp.int32))
    return model.llm(embeds, positions_from_mask(mask), mask)[0]


def _logits(model, speech, ids):
    """Our LLM's logits on [speech][text] (B, Q' + T, V)."""
    return np.asarray(_jit_logits(*nnx.split(model), jnp.asarray(speech), jnp.asarray(ids)))


def test_export_holds_the_window_means_adapter_and_the_real_window(run):
    out, model = run["out"], run["orig"].model
    assert {p.name for p in (out / "adapter").iterdir()} == {"model.safetensors", "config.json"}
    ours = load_file(str(out / "adapter" / "model.safetensors"))
    want = flat_params(model.adapter)
    assert ours.keys() == want.keys() and ours["window_in.kernel"].shape == (2 * 32, 32)
    assert not any(k.startswith(("query", "qformer")) for k in ours)
    assert all(np.array_equal(ours[k], want[k]) for k in ours)
    acfg = json.loads((out / "adapter" / "config.json").read_text())
    assert acfg["window_means"] == 2 and acfg["hf_qformer_config"] is None
    ec = json.loads((out / "esrt_config.json").read_text())
    m = ec["model"]
    assert m["adapter"] == "window_means" and m["num_windows"] == 6 and m["window_parts"] == 2
    assert "qformer_hidden" not in m and "num_queries" not in m and m["encoder_window"] == "real"
    files = ec["adapter"]["files"]
    assert files["llm_srt"] is None and "Q-Former" in files["llm_srt_absent"]
    assert ec["encoder"]["window"] == "real" and ec["run_config"]["model"]["encoder_window"] == "real"
    card = (out / "README.md").read_text()
    assert "-> window-means adapter ->" in card and "window means (no Q-Former): 6 equal windows" in card
    assert "real length rounded up to 1 s (`model.encoder_window: real`)" in card
    assert "no LLM-SRT state dict" in card and "Q-Former, 6 queries" not in card
    # LLM-SRT's own format and the ONNX edge target still refuse, in one line
    with pytest.raises(CheckpointError, match=r"LLM-SRT's adapter format holds a Q-Former; .*window_means: 2") as e:
        save_llm_srt_adapter(model.adapter, run["d"] / "x.safetensors")
    assert "\n" not in str(e.value) and not (run["d"] / "x.safetensors").exists()
    with pytest.raises(ex.ExportError, match=r"attend_padding: false \(window means, real-length encoder windows ") as e:
        require_full_window(model.config)
    assert "\n" not in str(e.value)


def test_reimported_run_gives_the_same_embeddings_and_logits(run):
    new = run["new"]
    again = load_model(new / "config.yaml", new)
    assert again.step == 5 and again.stage == "srt"
    assert again.model.config.encoder_window == "real" and again.model.config.adapter.window_means == 2
    tr = translator_for(again)
    speech = tr.encode(run["mel"], run["frames"])
    np.testing.assert_allclose(speech, run["speech"], atol=1e-5, rtol=0)
    # the window matters: on the full 2 s window (the long clip's) the short clip's embeddings differ
    padded = encode_batch(tr.graphdef, tr.state, run["mel"][:1], tr.split, 1, enc_frames=run["frames"][:1])
    assert np.abs(padded[0] - speech[0]).max() > 1e-3
    np.testing.assert_allclose(_logits(again.model, speech, run["ids"]), run["logits"], atol=1e-5, rtol=0)


def test_exported_llm_and_the_cards_snippet_in_pytorch(run):
    out, speech, ids, ours = run["out"], run["speech"], run["ids"], run["logits"]
    hf = AutoModelForCausalLM.from_pretrained(out / "llm", dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        text = hf.get_input_embeddings()(torch.from_numpy(ids).long())
        theirs = hf(inputs_embeds=torch.cat([torch.from_numpy(speech), text], 1)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4 * np.abs(ours).max(), rtol=0)
    # the card's torch + transformers snippet on the short clip (1 s window of the 2 s one)
    card = (out / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    code = code.replace('CLIP = "clip.wav"', f'CLIP = "{run["clips"][0]}"')
    ns: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(code, "card-snippet", "exec"), ns)  # noqa: S102 - the card's own code, as a user runs it
    assert ns["mel"].shape[-1] == 100 and ns["frames"] == run["frames"][0]
    np.testing.assert_allclose(ns["speech"].numpy()[0], speech[0], atol=1e-4, rtol=0)
    assert set(json.loads(printed.getvalue())) == {"transcription", "translation"}
