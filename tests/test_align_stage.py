"""The align stage: adapter + CTC head on the frozen encoder, no LLM; resume; the asr stage
starts from it."""

import json

import jax
import numpy as np
import pytest
import soundfile as sf

from esrt_jax.export.to_hf import export_run
from esrt_jax.train.config import load_run_config
from esrt_jax.cli.infer import main as infer_main
from esrt_jax.cli.train import main as train_main
from esrt_jax.speech.build import align_units, build_model
from helpers_tokenizer import save_tiny_tokenizer

SR = 16000
FREQ = {"a": 300.0, "b": 700.0, "c": 1300.0, "d": 2100.0}
WORDS_TRAIN = ["ab", "ba", "cd", "dc", "abc", "cab", "bad", "dab", "acd", "dca", "bcd", "db", "ac", "ca", "bd", "da"]
WORDS_DEV = ["adc", "cba", "bda", "cdb"]

CONFIG = """
run_dir: {run}
model:
  whisper_config: {{num_mel_bins: 80, d_model: 32, encoder_layers: 1, encoder_attention_heads: 4,
                   encoder_ffn_dim: 64, max_source_positions: 32}}
  llm_config: {{model_type: qwen2, vocab_size: 320, hidden_size: 64, intermediate_size: 128,
               num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2}}
  tokenizer: {tok}
  adapter: {{num_hidden_layers: 1, hidden_size: 32, num_attention_heads: 4, intermediate_size: 64,
            num_queries: 8, attend_padding: false, window_queries: true, window_overlap: 1,
            hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0, initializer_range: 0.1}}
  align: {{upsample: 2}}
data: {{train: [{data}/train.jsonl], dev: [{data}/dev.jsonl], text_buckets: [32], n_mels: 80}}
train: {{batch_size: 8, lr: 3.0e-3, warmup_steps: 10, steps: 2, ckpt_every: 100, log_every: 5,
        eval_every: 0, decode_samples: 4, progress: false, async_ckpt: false}}
stages:
  align: {{train: {{steps: {align_steps}, decode_every: {decode_every}}}}}
"""


def _word_audio(word, seed):
    """Each letter a 0.12 s tone of its own pitch: a toy speech whose 'phones' are the letters."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(0.12 * SR)) / SR
    x = np.concatenate([0.3 * np.sin(2 * np.pi * FREQ[ch] * t) for ch in word] + [np.zeros(800)])
    return (x + 0.01 * rng.standard_normal(x.size)).astype(np.float32)


def _corpus(d):
    (d / "audio").mkdir(parents=True)
    for split, words in (("train", WORDS_TRAIN), ("dev", WORDS_DEV)):
        lines = []
        for i, w in enumerate(words):
            path = d / "audio" / f"{split}-{i}.wav"
            sf.write(path, _word_audio(w, i), SR, subtype="PCM_16")
            lines.append(json.dumps({"id": f"{split}-{i}", "audio": str(path), "src": "eng", "tgt": "deu",
                                     "asr": w.upper() + ".", "s2tt": w}))
        (d / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("align")
    _corpus(d / "data")
    save_tiny_tokenizer(d / "tok", vocab_size=320)
    return d


def _config(setup, name, align_steps=300, decode_every=100):
    p = setup / f"{name}.yaml"
    p.write_text(CONFIG.format(run=setup / name, tok=setup / "tok", data=setup / "data",
                               align_steps=align_steps, decode_every=decode_every))
    return p


def _metrics(run, stage):
    return [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines()]


def test_align_bundle_has_no_llm(setup):
    cfg = load_run_config(_config(setup, "plan")).for_stage("align")
    assert align_units(cfg) == tuple(sorted("abcd"))  # normalised: lower case, '.' dropped
    bundle = build_model(cfg)
    # The LLM is not in the stage at all: no parameter of it is trained, frozen or passed.
    assert set(bundle.trainable) == {"adapter", "ctc_head"}
    assert "llm" not in bundle.frozen
    # ... and the loss's jaxpr has no op of the LLM's size (vocab 320 x 64 embedding)
    batch = {k: np.zeros(s.shape, s.dtype) for k, s in bundle.batch_spec(2).items()}
    batch["enc_frames"][:] = 10
    jaxpr = str(jax.make_jaxpr(lambda t, f, b: bundle.loss_fn(t, f, b, None)[0])(
        bundle.trainable, bundle.frozen, batch))
    assert "320,64" not in jaxpr.replace(" ", "") and "64,320" not in jaxpr.replace(" ", "")


@pytest.fixture(scope="module")
def aligned(setup):
    """The toy align stage trained once (300 steps): (config, run dir)."""
    cfg = _config(setup, "full")
    train_main(["--config", str(cfg), "--stage", "align"])
    return cfg, setup / "full"


def test_align_learns_the_toy_speech_and_asr_starts_from_it(aligned, capfd):
    cfg, run = aligned
    m = _metrics(run, "align")
    losses = [r["loss"] for r in m if "loss" in r and "dev_cer" not in r]
    cers = [r["dev_cer"] for r in m if "dev_cer" in r]
    assert losses[-1] < 0.5 * losses[0], losses
    assert cers[-1] < cers[0] and cers[-1] < 50, cers   # held-out words (other letter orders)
    # the asr stage starts from the align stage's adapter; the CTC head is left out
    capfd.readouterr()
    train_main(["--config", str(cfg), "--stage", "asr", "--set", "train.steps=1"])
    out = "".join(capfd.readouterr())
    assert f"starting from trainable params of {run / 'align' / 'checkpoints'}" in out, out[-2000:]
    assert "are left out, e.g. ctc_head/" in out, out[-2000:]


def test_align_resume_is_exact(setup, capfd):
    """A stage killed after its step-4 checkpoint resumes there and trains steps 5-8 exactly as the
    uninterrupted run did. Then an asr command whose config lost the stages.align block says that
    it does not start from the aligned adapter."""
    import shutil

    cfg = _config(setup, "resume", align_steps=8, decode_every=0)
    train_main(["--config", str(cfg), "--stage", "align", "--set", "train.ckpt_every=4"])
    run = setup / "resume" / "align"

    def losses():
        return {r["step"]: r["loss"] for r in _metrics(setup / "resume", "align")
                if "loss" in r and "dev_loss" not in r}

    whole = losses()
    shutil.rmtree(run / "checkpoints" / "8")  # as if killed after the step-4 checkpoint
    res = train_main(["--config", str(cfg), "--stage", "align", "--set", "train.ckpt_every=4"])
    assert res[0].resumed_from == 4
    again = losses()
    assert sorted(whole) == sorted(again) == list(range(1, 9))
    np.testing.assert_allclose([again[k] for k in range(5, 9)], [whole[k] for k in range(5, 9)], rtol=1e-5)

    no_align = setup / "resume_no_align.yaml"
    no_align.write_text(cfg.read_text().split("stages:")[0])
    capfd.readouterr()
    train_main(["--config", str(no_align), "--stage", "asr", "--set", "train.steps=1"])
    out = "".join(capfd.readouterr())
    assert f"[asr] notice: {run / 'checkpoints'} has checkpoints but this config has no stages.align block" in out, out[-2000:]


def test_window_means_adapter_aligns_serves_the_asr_stage_and_exports(setup, capfd):
    """The window-means adapter (no Q-Former) learns the toy speech in the align stage, the asr
    stage starts from it, inference runs it through the edge/cloud split, and the HF export holds it
    in our adapter layout, without LLM-SRT's files (its format is a Q-Former; re-import and the
    PyTorch side: tests/test_export_window_means.py). One part per window: the toy's clips are short."""
    cfg = _config(setup, "means", align_steps=300, decode_every=300)
    means = ["--set", "model.adapter.window_means=1"]
    train_main(["--config", str(cfg), "--stage", "align", *means])
    run = setup / "means"
    cers = [r["dev_cer"] for r in _metrics(run, "align") if "dev_cer" in r]
    assert cers[-1] < 50, cers
    capfd.readouterr()
    train_main(["--config", str(cfg), "--stage", "asr", "--set", "train.steps=1", *means])
    assert "are left out, e.g. ctc_head/" in "".join(capfd.readouterr())
    # the edge half runs it and the cloud half decodes its payload
    edge, dev = setup / "means_edge.jsonl", setup / "data" / "dev.jsonl"
    assert infer_main(["--config", str(cfg), "--checkpoint", str(run), *means, "--jsonl", str(dev), "--task", "asr", "--edge-only", str(edge)]) == 0
    rc = infer_main(["--config", str(cfg), "--checkpoint", str(run), *means, "--from-embeds", str(edge), "--task", "asr", "--max-new-tokens", "4"])
    assert rc in (0, 3)  # 3: every decode empty, possible after one asr step
    assert len([x for x in capfd.readouterr().out.splitlines() if x.startswith("{")]) == len(WORDS_DEV)
    out = export_run(run, setup / "means_export", overrides=means[1:]).out
    assert {p.name for p in (out / "adapter").iterdir()} == {"model.safetensors", "config.json"}
    ec = json.loads((out / "esrt_config.json").read_text())
    assert ec["model"]["adapter"] == "window_means" and ec["adapter"]["files"]["llm_srt"] is None


def test_asr_stage_reads_the_ctc_characters_as_llm_embeddings(setup, aligned, capfd):
    """model.interface ctc_chars: the asr stage keeps the align stage's CTC head (restored, not left
    out) and the LLM reads the kept frames' character posteriors as its own embeddings of the
    characters; a dev decode and infer run on it; the edge half and the HF export refuse it."""
    import shutil

    from esrt_jax.config import ConfigError
    from esrt_jax.export.common import ExportError
    from esrt_jax.speech.load import load_edge_half
    from esrt_jax.train.checkpoint import restore_params

    _, src = aligned
    cfg = _config(setup, "soft")
    shutil.copytree(src / "align", setup / "soft" / "align")
    soft = ["--set", "model.interface=ctc_chars"]
    capfd.readouterr()
    train_main(["--config", str(cfg), "--stage", "asr", "--set", "train.steps=2", "--set", "train.decode_every=2",
                *soft])
    out = "".join(capfd.readouterr())
    assert "starting from trainable params of" in out and "left out" not in out, out[-2000:]
    bundle = build_model(load_run_config(cfg, soft[1:]).for_stage("asr"))
    assert "ctc_head" in bundle.trainable
    # two steps at lr 3e-3 x warm-up: the head is the aligned one, nearly unchanged
    head = {"ctc_head": bundle.trainable["ctc_head"]}
    aligned_head, _ = restore_params(src / "align" / "checkpoints", head, drop=("^adapter/",))
    trained_head, _ = restore_params(setup / "soft" / "asr" / "checkpoints", bundle.trainable)
    a, t = (np.asarray(h["ctc_head"]["out"]["kernel"]) for h in (aligned_head, trained_head))
    assert np.abs(a).max() > 0.1 and np.abs(t - a).max() < 0.05 * np.abs(a).max()
    assert any("dev_wer" in r for r in _metrics(setup / "soft", "asr"))
    dev = setup / "data" / "dev.jsonl"
    rc = infer_main(["--config", str(cfg), "--checkpoint", str(setup / "soft"), *soft, "--jsonl", str(dev),
                     "--task", "asr", "--max-new-tokens", "4"])
    assert rc in (0, 3)  # 3: every decode empty, possible after two asr steps
    with pytest.raises(ConfigError, match="interface ctc_chars needs the LLM's embedding table"):
        load_edge_half(cfg, setup / "soft", soft[1:])
    with pytest.raises(ExportError, match="ctc_chars"):
        export_run(setup / "soft", setup / "soft_export", overrides=soft[1:])
