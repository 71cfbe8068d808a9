"""A tiny random speech LLM + tokenizer + Translator for serving / CLI tests (no downloads).

mel (B, 80, 64) -> Whisper encoder (d 32, 2 layers) -> Q-Former (6 queries, hidden 32) ->
projector (llm_dim 64) -> Qwen2-style LLM (vocab 320, 2 layers). Built once per process.
"""

from __future__ import annotations

import functools

import numpy as np
from flax import nnx

from helpers_tokenizer import tiny_tokenizer


@functools.lru_cache(maxsize=2)
def tiny_speech_llm(seed: int = 0, attend_padding: bool = True):
    from transformers import Qwen2Config

    from esrt_jax.models.llm import config_from_hf
    from esrt_jax.models.speech_llm import QFormerConfig, SpeechLLM, SpeechLLMConfig, WhisperEncoderConfig

    enc = WhisperEncoderConfig(num_mel_bins=80, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                               encoder_ffn_dim=64, max_source_positions=32)
    ad = QFormerConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                       encoder_hidden_size=32, num_queries=6, llm_dim=64, attend_padding=attend_padding)
    llm = config_from_hf(Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    return SpeechLLM(SpeechLLMConfig(enc, ad, llm), rngs=nnx.Rngs(seed))


def tiny_translator(split: str | None = None, max_new_tokens: int = 8, max_batch: int = 8, seed: int = 0):
    """(Translator, tokenizer, fingerprint) over the shared tiny model."""
    from esrt_jax.infer.cloud import model_fingerprint
    from esrt_jax.infer.generate import GenerateConfig
    from esrt_jax.infer.translator import Translator

    model = tiny_speech_llm(seed)
    tok = tiny_tokenizer(vocab_size=320)
    gen = GenerateConfig(max_new_tokens=max_new_tokens, eos_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id)
    tr = Translator(model, tok, gen_cfg=gen, max_batch=max_batch, prompt_buckets=(16, 32), split=split)
    return tr, tok, model_fingerprint(model)


def write_tone(path, seconds: float, freq: float, sr: int = 16000, seed: int = 0):
    """A short noisy tone as 16-bit PCM WAV (a stand-in utterance)."""
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.size)
    sf.write(str(path), x.astype(np.float32), sr, subtype="PCM_16")
    return path


RUN_CONFIG = """
run_dir: {run_dir}
model:
  whisper_config: {{num_mel_bins: 80, d_model: 32, encoder_layers: 2, encoder_attention_heads: 4,
                   encoder_ffn_dim: 64, max_source_positions: 32}}
  llm_config: {{model_type: qwen2, vocab_size: 320, hidden_size: 64, intermediate_size: 128,
               num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2}}
  tokenizer: {tok_dir}
  adapter: {{num_hidden_layers: 2, hidden_size: 32, num_attention_heads: 4, intermediate_size: 64,
            num_queries: 6}}
  seed: 3
  infer: {{max_new_tokens: 6, prompt_buckets: [16, 32]}}
data: {{text_buckets: [32]}}
train: {{steps: 5}}
"""


def save_tiny_whisper(d):
    """A tiny random HF WhisperModel (80 mels, 64 frames, d 32) saved as safetensors in `d`."""
    import torch
    from transformers import WhisperConfig, WhisperModel

    torch.manual_seed(0)
    cfg = WhisperConfig(num_mel_bins=80, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                        encoder_ffn_dim=64, max_source_positions=32, decoder_layers=1,
                        decoder_attention_heads=4, decoder_ffn_dim=64, max_target_positions=16,
                        vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        decoder_start_token_id=3)
    WhisperModel(cfg).save_pretrained(d, safe_serialization=True)
    return d


def make_tiny_run(d, whisper_dir=None, overrides=()):
    """A tiny run config (d/run.yaml, tokenizer in d/tok; `overrides` as `--set` items) and an
    srt checkpoint at step 5 (d/runs/srt/checkpoints/5) whose trainable params differ from the
    seeded init. -> (config path, run dir, the saved trainable params)."""
    import jax

    from esrt_jax.train.checkpoint import Checkpointer
    from esrt_jax.train.config import load_run_config
    from esrt_jax.speech.build import build_model
    from helpers_tokenizer import save_tiny_tokenizer

    from pathlib import Path

    d = Path(d)
    save_tiny_tokenizer(d / "tok", vocab_size=320)
    cfg_path = d / "run.yaml"
    text = RUN_CONFIG.format(run_dir=d / "runs", tok_dir=d / "tok")
    if whisper_dir is not None:  # the encoder from a local HF dir instead of a seeded random init
        head, rest = text.split("  whisper_config:", 1)
        text = head + f"  whisper: {whisper_dir}\n" + rest.split("\n", 2)[2]
    if overrides:
        import yaml

        from esrt_jax.config import apply_overrides

        text = yaml.safe_dump(apply_overrides(yaml.safe_load(text), overrides))
    cfg_path.write_text(text)
    bundle = build_model(load_run_config(cfg_path).for_stage("srt"))
    trained = jax.tree.map(lambda x: x + 0.01 * jax.numpy.sign(x), bundle.trainable)
    ck = Checkpointer(d / "runs" / "srt" / "checkpoints", async_save=False)
    ck.save(5, trained, {"count": np.zeros((), np.int32)})
    ck.close()
    return cfg_path, d / "runs", trained
