"""The speech LLM's blocks of a run config, typed: `model:` -> `SpeechModelConfig` (`resolve()`:
the `SpeechLLMConfig` the model is built from) and the speech-system keys of `data:` ->
`SpeechDataConfig` (the rest of `data:` is the pipeline's `DataConfig`); `generation_config()`:
the decoding settings of dev decodes, inference, the service and export.

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
    infer: {num_beams: 5, prompt_buckets: [32]}     # inference / service / export, over `decode`
    align: {upsample: 2}                            # the align stage (esrt_jax.speech.align.AlignConfig)
    interface: vectors                              # or ctc_chars: the LLM reads the align stage's CTC
                                                    #   character posteriors as its own embeddings
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from esrt_jax.config import ConfigError, from_dict, setting
from esrt_jax.convert import hf_io
from esrt_jax.data.pipeline import max_answer_tokens
from esrt_jax.infer.generate import GenerateConfig
from esrt_jax.models.llm import config_from_hf
from esrt_jax.models.llm_config import LoraConfig
from esrt_jax.models.qformer import QFormerConfig
from esrt_jax.models.speech_llm import SpeechLLMConfig
from esrt_jax.models.whisper import WhisperEncoderConfig
from esrt_jax.speech.align import AlignConfig

# What `model.decode` / `model.infer` may set: these GenerateConfig fields, and the prompt buckets.
GENERATION_KEYS = ("max_new_tokens", "num_beams", "length_penalty", "no_repeat_ngram_size", "min_new_tokens")
DECODE_KEYS = GENERATION_KEYS + ("prompt_buckets",)


def _is_local(path: str) -> bool:
    return (Path(path).expanduser() / "config.json").is_file()


@dataclass(frozen=True)
class SpeechModelConfig:
    """The run config's `model:` block of the speech LLM (see the module docstring)."""
    builder: str | None = setting(None, help="model builder 'package.module:function' (default: the speech LLM)")
    whisper: str | None = setting(None, help="local Hugging Face Whisper dir (or hub id) of the encoder")
    whisper_config: dict[str, Any] = setting(factory=dict, help="WhisperEncoderConfig keys of a random encoder "
                                                              "(used while `whisper` is absent)")
    llm: str | None = setting(None, help="local Hugging Face dir (or hub id) of the decoder LLM")
    llm_config: dict[str, Any] = setting(factory=dict, help="HF config keys of a random LLM (used while `llm` "
                                                          "is absent)")
    tokenizer: str | None = setting(None, help="tokenizer dir; default the llm dir; 'demo': a BPE trained on "
                                               "the demo corpus")
    tokenizer_vocab: int = setting(512, help="vocabulary size of the 'demo' tokenizer")
    adapter: dict[str, Any] = setting(factory=dict, help="QFormerConfig keys of the adapter (encoder and LLM "
                                                       "widths are filled in)")
    llm_dtype: str = setting("float32", help="LLM compute dtype (float32, bfloat16)")
    llm_param_dtype: str = setting("float32", help="LLM parameter dtype")
    encoder_dtype: str = setting("float32", help="Whisper encoder compute dtype")
    scan_layers: bool = setting(True, help="scan over stacked layers (one compiled layer) in encoder and LLM")
    remat: bool = setting(False, help="rematerialise LLM layers in the backward pass (less memory)")
    split: str = setting("projector", help="edge/cloud split point: after the 'qformer' or the 'projector'")
    encoder_window: str = setting("padded", help="'padded': the encoder reads Whisper's 30 s window (LLM-SRT); "
                                                 "'real': each clip's mel cut to its own length, rounded up to 1 s "
                                                 "(faster; needs adapter.attend_padding false and, to train, an encoder "
                                                 "cache built the same way)")
    seed: int = setting(0, help="seed of the randomly initialised parts")
    decode: dict[str, Any] = setting(factory=dict, help="generation settings of the dev decodes in training "
                                                      f"({', '.join(DECODE_KEYS)})")
    infer: dict[str, Any] = setting(factory=dict, help="generation settings of inference, the service and "
                                                     "export, over `decode`")
    align: dict[str, Any] = setting(factory=dict, help="the align stage's CTC head and loss: "
                                                     "esrt_jax.speech.align.AlignConfig keys")
    interface: str = setting("vectors", help="how the speech reaches the LLM: 'vectors', the adapter's outputs; "
                                             "'ctc_chars', the align stage's CTC head reads them and the LLM gets "
                                             "each kept CTC frame's character posteriors times its own embeddings "
                                             "of those characters (LegoSLM; needs the align stage's head)")

    def validate(self):
        for block in ("decode", "infer"):  # from_dict puts "model." in front
            bad = sorted(set(getattr(self, block)) - set(DECODE_KEYS))
            if bad:
                raise ConfigError(f"{block}.{bad[0]}: unknown key; valid keys here: {', '.join(DECODE_KEYS)}")
        if self.interface not in ("vectors", "ctc_chars"):
            raise ConfigError(f"interface: {self.interface!r} is not 'vectors' or 'ctc_chars'")

    @classmethod
    def of(cls, run_cfg) -> "SpeechModelConfig":
        """The typed `model:` block of a RunConfig (unknown keys refused, naming the key)."""
        return from_dict(cls, run_cfg.model, prefix="model")

    def resolve(self, lora: LoraConfig | None = None, speech_units: tuple[int, ...] = ()) -> SpeechLLMConfig:
        """-> the SpeechLLMConfig (reads only config.json files of local HF dirs); `speech_units`:
        the LLM token ids of the CTC units, with `interface: ctc_chars` (`speech.build.speech_units`)."""
        enc_rt = {"dtype": self.encoder_dtype, "scan_layers": self.scan_layers}
        if self.whisper and (_is_local(self.whisper) or not self.whisper_config):
            enc = WhisperEncoderConfig.from_hf_config(hf_io.read_config(hf_io.resolve_local_dir(self.whisper)),
                                                      **enc_rt)
        elif self.whisper_config:
            enc = from_dict(WhisperEncoderConfig, {**enc_rt, **self.whisper_config}, prefix="model.whisper_config")
        else:
            raise ConfigError("model: set model.whisper (a local HF dir) or model.whisper_config (a tiny config)")
        if self.llm and (_is_local(self.llm) or not self.llm_config):
            llm = config_from_hf(hf_io.read_config(hf_io.resolve_local_dir(self.llm)))
        elif self.llm_config:
            try:
                llm = config_from_hf(dict(self.llm_config))
            except ConfigError as e:
                raise ConfigError(f"model.{e}" if str(e).startswith("llm_config.")
                                  else f"model.llm_config: {e}") from None
        else:
            raise ConfigError("model: set model.llm (a local HF dir) or model.llm_config (HF config keys)")
        adapter = from_dict(QFormerConfig, {**self.adapter, "encoder_hidden_size": enc.d_model,
                                            "llm_dim": llm.hidden_size}, prefix="model.adapter")
        return SpeechLLMConfig(enc, adapter, llm, lora=lora, llm_dtype=self.llm_dtype,
                               llm_param_dtype=self.llm_param_dtype, scan_layers=self.scan_layers,
                               remat=self.remat, split=self.split,
                               encoder_window=self.encoder_window, speech_units=tuple(speech_units),
                               ctc_upsample=from_dict(AlignConfig, dict(self.align), prefix="model.align").upsample)

    def generation_settings(self, *, inference: bool) -> dict[str, Any]:
        """`decode` (dev decodes), with `infer` over it for inference; unset (null) keys dropped."""
        merged = {**self.decode, **(self.infer if inference else {})}
        return {k: v for k, v in merged.items() if v is not None}


def speech_config(cfg) -> SpeechLLMConfig:
    """RunConfig -> SpeechLLMConfig (reads only config.json files of local HF dirs)."""
    return SpeechModelConfig.of(cfg).resolve(cfg.lora.model_lora())


def generation_config(cfg, eos_id: int, pad_id: int = 0, *, inference: bool = True,
                      overrides: Mapping[str, Any] | None = None) -> GenerateConfig:
    """The one GenerateConfig of a run config: `model.decode` (dev decodes, `inference=False`) or
    `model.decode` + `model.infer` (inference, the service, export), `overrides` on top (command
    flags); no `max_new_tokens`: the longest text the data allows (`data.text_buckets`)."""
    gen = {k: v for k, v in SpeechModelConfig.of(cfg).generation_settings(inference=inference).items()
           if k in GENERATION_KEYS}
    gen.update(overrides or {})
    if not gen.get("max_new_tokens"):
        gen["max_new_tokens"] = max_answer_tokens(cfg.data)
    return GenerateConfig(eos_ids=(eos_id,), pad_id=pad_id, **gen)


@dataclass(frozen=True)
class SpeechDataConfig:
    """The speech system's keys of the run config's `data:` block; the other keys are the
    pipeline's `esrt_jax.data.pipeline.DataConfig`."""
    builder: str | None = setting(None, help="data builder 'package.module:function' (default: the speech "
                                             "data pipeline)")
    dev: tuple[str, ...] = setting((), help="dev sources for the dev loss and dev decodes")
    dev_task: str | None = setting(None, help="task of the dev loss/decodes (default: the stage's most "
                                              "weighted task)")
    demo: bool = setting(False, help="train and dev on the offline demo corpus (built on first use)")
    demo_dir: str | None = setting(None, help="folder of the demo corpus (default: a cache folder named by "
                                              "its settings)")
    demo_voices: int = setting(2, help="espeak voices per language in the demo corpus")
    demo_heldout_clips: bool = setting(False, help="hold each training sentence out in one voice (eval) and "
                                                   "a second one (dev)")
    demo_sentences: int | None = setting(None, help="with demo_heldout_clips: train on the first n sentences")

    @classmethod
    def split(cls, run_cfg) -> tuple["SpeechDataConfig", dict[str, Any]]:
        """`data:` -> (its typed speech-system keys, the rest: the pipeline's DataConfig keys)."""
        names = cls.__dataclass_fields__
        own = {k: v for k, v in run_cfg.data.items() if k in names}
        return from_dict(cls, own, prefix="data"), {k: v for k, v in run_cfg.data.items() if k not in names}

    @classmethod
    def of(cls, run_cfg) -> "SpeechDataConfig":
        return cls.split(run_cfg)[0]
