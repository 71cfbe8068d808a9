"""The speech LLM's `model:` block of a run config -> `SpeechLLMConfig`.

Model block of a run config (`model:`):

    whisper: /models/whisper-large-v3        # local HF dir, or
    whisper_config: {num_mel_bins: 80, d_model: 64, ...}    # tiny random encoder
    llm: /models/gemma-3-4b-it               # local HF dir, or
    llm_config: {model_type: qwen2, vocab_size: 512, ...}   # tiny random LLM (HF config keys)
    # With both a dir and a *_config, the config is used only while the dir is absent: that
    # lets `--dry-run` plan a real model on a machine without its weights.
    tokenizer: /models/gemma-3-4b-it         # default: the llm dir; "demo": a byte-level BPE
    tokenizer_vocab: 512                     #   trained on the demo corpus text (offline)
    adapter: {num_queries: 80, pool_k: null, ...}   # QFormerConfig (encoder/llm dims filled in)
    llm_dtype: bfloat16   llm_param_dtype: float32   encoder_dtype: float32
    scan_layers: true   remat: false   split: projector   seed: 0
    decode: {num_beams: 1, max_new_tokens: N}       # dev decodes during training; N defaults to the
                                                    #   longest text the data allows (data.text_buckets)
"""

from __future__ import annotations

from pathlib import Path

from esrt_jax.config import ConfigError, from_dict
from esrt_jax.convert import hf_io
from esrt_jax.models.llm import config_from_hf
from esrt_jax.models.qformer import QFormerConfig
from esrt_jax.models.speech_llm import SpeechLLMConfig
from esrt_jax.models.whisper import WhisperEncoderConfig
from esrt_jax.train.config import RunConfig

MODEL_KEYS = {"builder", "whisper", "whisper_config", "llm", "llm_config", "tokenizer", "tokenizer_vocab",
              "adapter", "llm_dtype", "llm_param_dtype", "encoder_dtype", "scan_layers", "remat", "split",
              "seed", "decode", "infer"}


def check_keys(block: dict, allowed: set, where: str) -> None:
    bad = sorted(set(block) - allowed)
    if bad:
        raise ConfigError(f"unknown key(s) {', '.join(f'{where}.{k}' for k in bad)}; "
                          f"valid keys here: {', '.join(sorted(allowed))}")


def _is_local(path: str) -> bool:
    return (Path(path).expanduser() / "config.json").is_file()


def speech_config(cfg: RunConfig):
    """RunConfig -> SpeechLLMConfig (reads only config.json files of local HF dirs)."""
    m = cfg.model
    check_keys(m, MODEL_KEYS, "model")
    enc_rt = {"dtype": m.get("encoder_dtype", "float32"), "scan_layers": m.get("scan_layers", True)}
    if m.get("whisper") and (_is_local(m["whisper"]) or not m.get("whisper_config")):
        enc = WhisperEncoderConfig.from_hf_config(hf_io.read_config(hf_io.resolve_local_dir(m["whisper"])),
                                                  **enc_rt)
    elif m.get("whisper_config"):
        enc = from_dict(WhisperEncoderConfig, {**enc_rt, **m["whisper_config"]}, prefix="model.whisper_config")
    else:
        raise ConfigError("model: set model.whisper (a local HF dir) or model.whisper_config (a tiny config)")
    if m.get("llm") and (_is_local(m["llm"]) or not m.get("llm_config")):
        llm = config_from_hf(hf_io.read_config(hf_io.resolve_local_dir(m["llm"])))
    elif m.get("llm_config"):
        llm = config_from_hf(dict(m["llm_config"]))
    else:
        raise ConfigError("model: set model.llm (a local HF dir) or model.llm_config (HF config keys)")
    adapter = from_dict(QFormerConfig, {**m.get("adapter", {}), "encoder_hidden_size": enc.d_model,
                                        "llm_dim": llm.hidden_size}, prefix="model.adapter")
    return SpeechLLMConfig(enc, adapter, llm, lora=cfg.lora.model_lora(), llm_dtype=m.get("llm_dtype", "float32"),
                           llm_param_dtype=m.get("llm_param_dtype", "float32"),
                           scan_layers=m.get("scan_layers", True), remat=m.get("remat", False),
                           split=m.get("split", "projector"))
