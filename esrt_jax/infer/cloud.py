"""The cloud half as a service backend, and loading a trained model for inference.

`CloudBackend(translator, fingerprint)` implements `esrt_jax.serve.Backend`: it tells the service
which payloads it accepts (model fingerprint, split point, per-utterance feature shape) and decodes
a batch of features with the `Translator` (bucketed, jitted; SRT output split into transcription
and translation).

`load_model(config, checkpoint, overrides)` rebuilds the speech LLM from a run config (the same
YAML `train.py` takes) and restores the trained params of a stage checkpoint; `load_backend` wraps
it in a `Translator` + `CloudBackend`. The edge client and the inference CLI use `load_model` too,
so both ends compute the same `model_fingerprint`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from esrt_jax.infer.translator import Translator
from esrt_jax.models.speech_llm import SpeechLLM, fingerprint as config_fingerprint

STAGE_ORDER = ("srt", "smt", "asr")  # a run dir is served from its last finished stage


def model_fingerprint(model: SpeechLLM) -> str:
    """Id of the (config, trained adapter weights) pair a payload belongs to.

    The adapter (Q-Former + projector) is what training changes on the edge side, and both ends
    hold it, so edge and cloud compute the same id from the same checkpoint.
    """
    return config_fingerprint(model.config, nnx.state(model.adapter, nnx.Param))


class CloudBackend:
    """`serve.Backend` over a `Translator`: (B, *feature_shape) features -> [(asr, s2tt)]."""

    def __init__(self, translator: Translator, fingerprint: str, task: str = "srt",
                 languages: Sequence[str] | None = None):
        self.translator = translator
        self.fingerprint = fingerprint
        self.task = task
        self.split = translator.split
        self.feature_shape = tuple(translator.feature_shape)
        self.languages = tuple(languages) if languages else None

    def warmup_batches(self) -> tuple[int, ...]:
        return self.translator.batch_buckets()

    def warm(self, batch_size: int) -> None:
        from esrt_jax import languages as L

        codes = self.languages or tuple(L.ESRT_LANGS)
        self.translator.warm(batch_size, [(s, t) for s in codes for t in codes if s != t] or
                             [(codes[0], codes[0])], self.task)

    def decode_batch(self, features: np.ndarray, src: Sequence[str], tgt: Sequence[str]
                     ) -> list[tuple[str, str]]:
        feats = np.asarray(features, np.float32)
        if feats.ndim != 1 + len(self.feature_shape) or feats.shape[1:] != self.feature_shape:
            raise ValueError(f"features of shape {feats.shape} do not match (B, {self.feature_shape})")
        outs: list[tuple[str, str]] = []
        step = self.translator.max_batch  # a burst larger than the biggest batch bucket is split
        for i in range(0, len(feats), step):
            res = self.translator.decode(feats[i:i + step], list(src[i:i + step]),
                                         list(tgt[i:i + step]), task=self.task)
            outs += [(r["asr"], r["s2tt"]) for r in res]
        return outs


# ----------------------------------------------------------------------------- loading


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


def _is_step_dir(p: Path) -> bool:
    return p.is_dir() and p.name.isdigit()


def resolve_checkpoint(checkpoint: str | Path) -> tuple[Path, str | None, int | None]:
    """A run dir, stage dir, stage `checkpoints/` dir or step dir -> (checkpoints dir, stage, step).

    A run dir resolves to its last stage (srt, then smt, then asr) that holds a checkpoint.
    """
    p = Path(checkpoint).expanduser().absolute()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    if _is_step_dir(p):
        ck, step = p.parent, int(p.name)
    elif p.name == "checkpoints":
        ck, step = p, None
    elif (p / "checkpoints").is_dir():
        ck, step = p / "checkpoints", None
    else:
        for stage in STAGE_ORDER:
            d = p / stage / "checkpoints"
            if d.is_dir() and any(_is_step_dir(c) for c in d.iterdir()):
                ck, step = d, None
                break
        else:
            raise FileNotFoundError(
                f"{p} is not a checkpoint: expected a run dir with <stage>/checkpoints/<step>/ "
                f"(stages {list(STAGE_ORDER)}), a stage dir, a checkpoints dir or a step dir")
    if not any(_is_step_dir(c) for c in ck.iterdir()) and step is None:
        raise FileNotFoundError(f"checkpoint folder {ck} holds no step folders")
    stage = ck.parent.name if ck.parent.name in STAGE_ORDER else None
    return ck, stage, step


def merge_params(model: nnx.Module, trained: Any) -> None:
    """Write a nested dict of trained arrays (paths as in `nnx.state(model)`) into `model`."""
    state = nnx.state(model)
    flat = dict(nnx.to_flat_state(state))
    n = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(trained)[0]:
        key = tuple(_key_of(k) for k in path)
        var = flat.get(key)
        if var is None:  # orbax may give int keys back as strings
            key = tuple(int(k) if isinstance(k, str) and k.isdigit() else k for k in key)
            var = flat.get(key)
        if var is None:
            raise KeyError(f"checkpoint param {'/'.join(map(str, key))} does not exist in the model")
        if tuple(var.shape) != tuple(np.shape(leaf)):
            raise ValueError(f"checkpoint param {'/'.join(map(str, key))} has shape {np.shape(leaf)}, "
                             f"the model's is {tuple(var.shape)}")
        var.set_value(jax.numpy.asarray(leaf, var.dtype)) if hasattr(var, "set_value") else \
            setattr(var, "value", jax.numpy.asarray(leaf, var.dtype))
        n += 1
    nnx.update(model, nnx.from_flat_state(flat))
    if n == 0:
        raise ValueError("the checkpoint holds no params")


def _key_of(k):
    return getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))


def restore_adapter(cfg, ck: Path, step: int | None = None) -> Any:
    """Only the trained adapter params of a checkpoint (nested dict under `adapter/`)."""
    from esrt_jax.train.bundle import import_object
    from esrt_jax.train.checkpoint import restore_params
    from esrt_jax.train.run import DEFAULT_MODEL_BUILDER

    builder = import_object(cfg.model.get("builder", DEFAULT_MODEL_BUILDER), "model.builder")
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev),
                          builder(cfg, abstract=True).trainable)
    trained, _ = restore_params(ck, target, step)
    if "adapter" not in trained:
        raise KeyError(f"checkpoint {ck} holds no adapter params (trainable: {sorted(trained)})")
    return trained["adapter"]


def load_model(config: str | Path, checkpoint: str | Path | None, overrides: Sequence[str] = (),
               *, stage: str | None = None) -> LoadedModel:
    """Rebuild the model of a run config and restore trained params from `checkpoint`.

    The config's model builder module must provide `build_inference(cfg) -> (SpeechLLM,
    tokenizer)` (the model with its pretrained/frozen weights, e.g. converted HF parts or the
    demo's seeded random init); the trainable params saved by training are then written over it.
    `checkpoint=None` serves the builder's model as is (no trained params).
    """
    from esrt_jax.train.bundle import import_object
    from esrt_jax.train.checkpoint import restore_params
    from esrt_jax.train.config import load_run_config
    from esrt_jax.train.run import DEFAULT_MODEL_BUILDER

    ck = step = None
    if checkpoint is not None:
        ck, ck_stage, step = resolve_checkpoint(checkpoint)
        stage = stage or ck_stage
    stage = stage or "srt"
    cfg = load_run_config(config, overrides).for_stage(stage)
    spec = cfg.model.get("builder", DEFAULT_MODEL_BUILDER)
    builder = import_object(spec, "model.builder")
    module = __import__(builder.__module__, fromlist=["_"])
    infer_builder = getattr(module, "build_inference", None)
    if infer_builder is None:
        raise ImportError(f"model.builder module {builder.__module__!r} has no build_inference(cfg) "
                          f"-> (SpeechLLM, tokenizer); cannot rebuild the model for inference")
    model, tokenizer = infer_builder(cfg)
    if ck is not None:
        bundle = builder(cfg, abstract=True)
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev),
                              bundle.trainable)
        trained, step = restore_params(ck, target, step)
        merge_params(model, trained)
    return LoadedModel(model, tokenizer, cfg, stage, step, ck, trained_languages(cfg, ck))


def trained_languages(cfg, ck: Path | None) -> tuple[str, ...] | None:
    """The model's language set: `data.languages` of the config saved with the run
    (RUN_DIR/config.yaml, written by train.py) when the checkpoint lies in a run dir, else of `cfg`."""
    from esrt_jax import languages as L

    data = cfg.data
    saved = ck.parent.parent / "config.yaml" if ck is not None else None
    if saved is not None and saved.is_file():
        import yaml

        data = (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).get("data") or {}
    langs = data.get("languages")
    return tuple(L.get(c).code for c in langs) if langs else None


def translator_for(loaded: LoadedModel, *, split: str | None = None, max_batch: int = 8,
                   gen_overrides: dict | None = None) -> Translator:
    """A `Translator` with the run config's `model.decode` / `model.infer` generation settings
    (max_new_tokens, num_beams, length_penalty, no_repeat_ngram_size, min_new_tokens,
    prompt_buckets) and `gen_overrides` on top."""
    from esrt_jax.infer.generate import GenerateConfig
    from esrt_jax.data.tasks import TaskTokenizer

    tt = TaskTokenizer(loaded.tokenizer)
    m = loaded.run_config.model  # `decode` (dev decodes in training), overridden by `infer`
    infer_cfg = {**(m.get("decode", {}) or {}), **(m.get("infer", {}) or {})}
    gen_kw = {k: infer_cfg[k] for k in ("max_new_tokens", "num_beams", "length_penalty",
                                        "no_repeat_ngram_size", "min_new_tokens") if infer_cfg.get(k) is not None}
    gen_kw.update(gen_overrides or {})
    if "max_new_tokens" not in gen_kw:  # no cap given: the longest text the model was trained on
        from esrt_jax.train.speech import max_answer_tokens

        gen_kw["max_new_tokens"] = max_answer_tokens(loaded.run_config)
    gen_cfg = GenerateConfig(eos_ids=(tt.eos_id,), pad_id=tt.pad_id, **gen_kw)
    kw = {"prompt_buckets": tuple(infer_cfg["prompt_buckets"])} if "prompt_buckets" in infer_cfg else {}
    return Translator(loaded.model, loaded.tokenizer, gen_cfg=gen_cfg, max_batch=max_batch,
                      split=split, **kw)


def load_backend(config: str | Path, checkpoint: str | Path | None, overrides: Sequence[str] = (),
                 *, split: str | None = None, max_batch: int = 8) -> CloudBackend:
    """Run config + checkpoint -> a `CloudBackend` ready for `serve.make_app`."""
    loaded = load_model(config, checkpoint, overrides)
    return CloudBackend(translator_for(loaded, split=split, max_batch=max_batch), loaded.fingerprint,
                        languages=loaded.languages)
