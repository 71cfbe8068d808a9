"""Loading a trained speech run for inference: run config + stage checkpoint -> model.

`load_model(config, checkpoint, overrides)` rebuilds the speech LLM from a run config (the same
YAML `train.py` takes) through its model builder and restores the trained params of a stage
checkpoint; `load_edge_half` does the same for the encoder + adapter only; `load_backend` wraps a
loaded model in a `Translator` + `infer.cloud.CloudBackend`. The service, the edge client, the
inference and evaluation CLIs and export all load through here, so both ends of the edge/cloud
split compute the same `model_fingerprint`. The generic parts (finding a checkpoint, restoring
and merging params) are `esrt_jax.train.restore`.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Sequence

from flax import nnx

from esrt_jax import languages
from esrt_jax.config import ConfigError, load_yaml
from esrt_jax.convert.whisper import load_whisper_encoder
from esrt_jax.data.tasks import TaskTokenizer
from esrt_jax.infer import cloud
from esrt_jax.infer.cloud import model_fingerprint
from esrt_jax.infer.translator import Translator
from esrt_jax.models.qformer import SpeechAdapter
from esrt_jax.models.speech_llm import EdgeHalf, SpeechLLM
from esrt_jax.speech.config import SpeechModelConfig, generation_config
from esrt_jax.train.config import load_run_config
from esrt_jax.train.restore import merge_params, resolve_checkpoint, restore_trainable


@dataclasses.dataclass
class LoadedModel:
    model: SpeechLLM
    tokenizer: Any
    run_config: Any            # esrt_jax.train.config.RunConfig of the stage served
    stage: str
    step: int | None           # checkpoint step restored (None: no trained params found)
    checkpoint_dir: Path | None
    languages: tuple[str, ...] | None = None  # what it was trained on (None: not known)

    @property
    def fingerprint(self) -> str:
        return model_fingerprint(self.model)


def inference_builder(cfg):
    """`build_inference(cfg) -> (SpeechLLM, tokenizer)` of the config's model-builder module: the
    model with its pretrained / frozen weights (converted HF parts or a seeded random init)."""
    builder = cfg.model_builder()
    fn = getattr(sys.modules[builder.__module__], "build_inference", None)
    if fn is None:
        raise ImportError(f"model.builder module {builder.__module__!r} has no build_inference(cfg) "
                          f"-> (SpeechLLM, tokenizer); cannot rebuild the model for inference")
    return fn


def load_model(config: str | Path, checkpoint: str | Path | None, overrides: Sequence[str] = (),
               *, stage: str | None = None) -> LoadedModel:
    """Rebuild the model of a run config and restore trained params from `checkpoint`.

    The config's model builder module must provide `build_inference(cfg) -> (SpeechLLM,
    tokenizer)` (the model with its pretrained/frozen weights, e.g. converted HF parts or the
    demo's seeded random init); the trainable params saved by training are then written over it.
    `checkpoint=None` serves the builder's model as is (no trained params).
    """
    ck = step = None
    if checkpoint is not None:
        ck, ck_stage, step = resolve_checkpoint(checkpoint)
        stage = stage or ck_stage
    stage = stage or "srt"
    cfg = load_run_config(config, overrides).for_stage(stage)
    model, tokenizer = inference_builder(cfg)(cfg)
    if ck is not None:
        trained, step = restore_trainable(cfg, ck, step)
        merge_params(model, trained)
    return LoadedModel(model, tokenizer, cfg, stage, step, ck, trained_languages(cfg, ck))


def load_edge_half(config: str | Path, checkpoint: str | Path | None, overrides: Sequence[str] = ()
                   ) -> tuple[EdgeHalf, str]:
    """Run config + checkpoint -> (the edge half: encoder + trained adapter, model fingerprint)
    without loading the LLM.

    With `model.whisper` (a local HF dir) the encoder is read from it and the trained adapter (and
    encoder, when `train.trainable` names it) from the checkpoint; the LLM is never built. A config whose encoder is a seeded random init (the
    demo) is rebuilt with the whole model (tiny), so that the encoder weights are the same.
    """
    ck = step = stage = None
    if checkpoint is not None:
        ck, stage, step = resolve_checkpoint(checkpoint)
    cfg = load_run_config(config, overrides).for_stage(stage or "srt")
    m = SpeechModelConfig.of(cfg)
    if m.interface != "vectors":  # its speech embeddings are the LLM's own token embeddings
        raise ConfigError(f"{config}: model.interface {m.interface} needs the LLM's embedding table, which the "
                          "edge half does not hold: run infer / eval on the whole model instead")
    if not m.whisper:
        m = load_model(config, checkpoint, overrides).model
        half = EdgeHalf(m.config, m.encoder, m.adapter)
    else:
        scfg = m.resolve(cfg.lora.model_lora())
        enc = load_whisper_encoder(m.whisper, dtype=scfg.encoder.dtype, scan_layers=scfg.encoder.scan_layers)
        half = EdgeHalf(scfg, enc, SpeechAdapter(scfg.adapter, rngs=nnx.Rngs(m.seed)))
        if ck is not None:  # the trained adapter, and the encoder too where training tuned it
            trained, _ = restore_trainable(cfg, ck, step)
            if "adapter" not in trained:
                raise KeyError(f"checkpoint {ck} holds no adapter params (trainable: {sorted(trained)})")
            merge_params(half, {k: v for k, v in trained.items() if k in ("encoder", "adapter")})
    return half, model_fingerprint(half)


def trained_languages(cfg, ck: Path | None) -> tuple[str, ...] | None:
    """The model's language set: `data.languages` of the config saved with the run
    (RUN_DIR/config.yaml, written by train.py) when the checkpoint lies in a run dir, else of `cfg`."""
    data = cfg.data
    saved = ck.parent.parent / "config.yaml" if ck is not None else None
    if saved is not None and saved.is_file():
        data = load_yaml(saved).get("data") or {}  # a damaged one: a one-line ConfigError naming it
    langs = data.get("languages")
    if isinstance(langs, str) or not isinstance(langs, (list, tuple, type(None))):
        raise ConfigError(f"{saved}: data.languages must be a list of language codes, got {langs!r}")
    return tuple(languages.get(c).code for c in langs) if langs else None


def load_backend(config: str | Path, checkpoint: str | Path | None, overrides: Sequence[str] = (),
                 *, split: str | None = None, max_batch: int = 8) -> cloud.CloudBackend:
    """Run config + checkpoint -> a `CloudBackend` ready for `serve.make_app`."""
    loaded = load_model(config, checkpoint, overrides)
    return cloud.CloudBackend(translator_for(loaded, split=split, max_batch=max_batch), loaded.fingerprint,
                              languages=loaded.languages)


def translator_for(loaded: LoadedModel, *, split: str | None = None, max_batch: int = 8,
                   gen_overrides: dict | None = None) -> Translator:
    """A `Translator` for `loaded` with the run config's inference generation settings
    (`generation_config`: `model.decode`, `model.infer` over it, `gen_overrides` on top) and
    `model.infer.prompt_buckets` (or `model.decode`'s)."""
    tt = TaskTokenizer(loaded.tokenizer)
    cfg = loaded.run_config
    gen_cfg = generation_config(cfg, tt.eos_id, tt.pad_id, inference=True, overrides=gen_overrides)
    settings = SpeechModelConfig.of(cfg).generation_settings(inference=True)
    kw = {"prompt_buckets": tuple(settings["prompt_buckets"])} if "prompt_buckets" in settings else {}
    return Translator(loaded.model, loaded.tokenizer, gen_cfg=gen_cfg, max_batch=max_batch, split=split, **kw)
