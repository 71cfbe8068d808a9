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
def tiny_speech_llm(seed: int = 0):
    from transformers import Qwen2Config

    from esrt_jax.models.llm import config_from_hf
    from esrt_jax.models.speech_llm import QFormerConfig, SpeechLLM, SpeechLLMConfig, WhisperEncoderConfig

    enc = WhisperEncoderConfig(num_mel_bins=80, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                               encoder_ffn_dim=64, max_source_positions=32)
    ad = QFormerConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                       encoder_hidden_size=32, num_queries=6, llm_dim=64)
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
