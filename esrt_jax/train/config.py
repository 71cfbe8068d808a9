"""Run configuration for training: frozen dataclasses loaded from YAML + `--set` overrides.

Layout of a run config (see configs/*.yaml):

    model:  {builder: "pkg.module:function", ...}   # passed to the builder (model config)
    data:   {builder: "pkg.module:function", ...}   # passed to the data builder
    lora:   {enabled, rank, alpha, dropout, targets}
    mesh:   {data: -1, fsdp: 1, tensor: 1, rules: {logical: mesh axis or list}}
    train:  {lr, warmup_steps, schedule, steps, batch_size, grad_accum, clip_norm, ...}
    stages: {asr: {train: {...}, data: {...}}, smt: {...}, srt: {...}}   # per-stage overrides

`RunConfig.for_stage(name)` returns the config with that stage's overrides merged in and
re-validated, so every stage is checked before anything heavy starts.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import yaml

from esrt_jax.config import ConfigError, apply_overrides, check, from_dict, load_yaml, setting, to_dict
from esrt_jax.files import write_atomic
from esrt_jax.models.llm_config import LoraConfig
from esrt_jax.train.bundle import import_object

# The curriculum, in training order. The LLM stages make a servable model (a run dir is served
# from its last finished one); "align" (the adapter without the LLM, esrt_jax.speech.align) comes
# first and runs only when the config has a `stages.align` block.
LLM_STAGES = ("asr", "smt", "srt")
STAGES = ("align",) + LLM_STAGES
# The plug-ins a config gets when it names none (see `RunConfig.model_builder`).
DEFAULT_MODEL_BUILDER = "esrt_jax.speech.build:build_model"
DEFAULT_DATA_BUILDER = "esrt_jax.speech.build:build_data"
# Builder names saved in older run configs (the speech builders lived in the trainer) -> today's.
BUILDER_ALIASES = {"esrt_jax.train.speech:build_model": DEFAULT_MODEL_BUILDER,
                   "esrt_jax.train.speech:build_data": DEFAULT_DATA_BUILDER}


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh: data x fsdp x tensor. `data: -1` takes every remaining device."""
    data: int = setting(-1, help="data-parallel axis size; -1 takes every device the other axes leave")
    fsdp: int = setting(1, help="fully sharded data-parallel axis size (params and optimizer state sharded)")
    tensor: int = setting(1, help="tensor-parallel axis size (attention heads and MLP columns split)")
    rules: dict[str, Any] = setting(factory=dict, help="extra or overriding logical-axis rules (esrt_jax/sharding.py): logical name -> mesh axis, "
                "list of axes, or null (replicated)")

    def validate(self):
        check(self.data == -1 or self.data >= 1, "data", f"must be -1 (auto) or >= 1, got {self.data}")
        check(self.fsdp >= 1, "fsdp", f"must be >= 1, got {self.fsdp}")
        check(self.tensor >= 1, "tensor", f"must be >= 1, got {self.tensor}")
        for k, v in self.rules.items():
            ok = v is None or isinstance(v, str) or (
                isinstance(v, (list, tuple)) and all(isinstance(a, str) for a in v))
            check(ok, f"rules.{k}", f"must be a mesh axis name, a list of them, or null; got {v!r}")


@dataclass(frozen=True)
class RunLoraConfig(LoraConfig):
    """The run config's `lora:` block: the model's `LoraConfig` (one definition of the fields,
    defaults and checks) plus whether the run uses LoRA at all."""
    enabled: bool = setting(False, help="train LoRA factors on the LLM (per stage too, e.g. `stages.smt.lora.enabled`)")

    def model_lora(self) -> LoraConfig | None:
        """The `LoraConfig` the model is built with, or None when LoRA is off."""
        if not self.enabled:
            return None
        return LoraConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LoraConfig)})


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and loop settings of one stage."""
    steps: int = setting(1000, help="optimizer steps of the stage")
    batch_size: int = setting(8, help="global batch: all processes and all micro-batches together")
    grad_accum: int = setting(1, help="micro-batches per optimizer step (a scan inside the jitted step); batch_size must divide by it")
    lr: float = setting(1e-4, help="peak learning rate")
    warmup_steps: int = setting(1000, help="linear warm-up steps from 0 to lr")
    schedule: Literal["linear", "cosine", "constant"] = setting("linear", help="decay after the warm-up: linear, cosine or constant")
    end_lr: float = setting(0.0, help="learning rate at the end of the decay")
    weight_decay: float = setting(0.01, help="AdamW weight decay")
    b1: float = setting(0.9, help="AdamW beta1")
    b2: float = setting(0.999, help="AdamW beta2")
    eps: float = setting(1e-8, help="AdamW epsilon")
    clip_norm: float = setting(1.0, help="global-norm gradient clipping; 0 disables")
    trainable: tuple[str, ...] = setting((), help="regexes over '/'-joined param paths that train; empty: the model builder's default set "
                "(the adapter, + LoRA when enabled)")
    lr_scale: dict[str, float] = setting(factory=dict, help="per-group learning rates: regex over param paths -> factor on the lr (and weight decay), "
                "e.g. {\"/lora_[ab]$\": 0.1}; the first matching regex wins, others x1; a regex matching no "
                "trainable param is an error")
    frozen_dtype: Literal["float32", "bfloat16"] = setting("float32", help="dtype of the frozen weights on the device: float32 or bfloat16")
    seed: int = setting(0, help="seed of the training RNG (dropout, token dropout)")
    ckpt_every: int = setting(500, help="write a checkpoint every N steps (and always at the end)")
    keep: int = setting(3, help="checkpoints kept per stage")
    async_ckpt: bool = setting(True, help="write checkpoints in the background (Orbax async)")
    log_every: int = setting(10, help="log train loss, lr and throughput every N steps")
    eval_every: int = setting(0, help="dev loss (with and without shuffled speech) every N steps; 0: only at the end")
    eval_batches: int = setting(4, help="dev batches per dev-loss evaluation")
    decode_every: int = setting(0, help="dev decode (BLEU/WER, swapped audio, distinct) every N steps; 0: only at the end")
    decode_samples: int = setting(4, help="dev records decoded per dev decode; 0: no dev decode (it compiles generation)")
    progress: bool = setting(True, help="show the progress bar")
    token_dropout: float = setting(0.0, help="share of answer tokens replaced by `<pad>` in the LLM's input while training (targets "
                "unchanged), so that the text prefix alone cannot predict the answer; 0 = off, as in the papers")

    def validate(self):
        check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.grad_accum >= 1, "grad_accum", f"must be >= 1, got {self.grad_accum}")
        check(self.batch_size % self.grad_accum == 0, "batch_size",
              f"{self.batch_size} is not divisible by grad_accum={self.grad_accum}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(self.end_lr >= 0, "end_lr", f"must be >= 0, got {self.end_lr}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(self.clip_norm >= 0, "clip_norm", f"must be >= 0, got {self.clip_norm}")
        check(self.ckpt_every >= 1, "ckpt_every", f"must be >= 1, got {self.ckpt_every}")
        check(self.keep >= 1, "keep", f"must be >= 1, got {self.keep}")
        check(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        check(self.eval_every >= 0, "eval_every", f"must be >= 0, got {self.eval_every}")
        check(self.decode_every >= 0, "decode_every", f"must be >= 0, got {self.decode_every}")
        check(self.decode_samples >= 0, "decode_samples", f"must be >= 0, got {self.decode_samples}")
        for pat, f in self.lr_scale.items():
            check(f > 0, f"lr_scale.{pat}", f"must be > 0, got {f}")
            try:
                re.compile(pat)
            except re.error as e:
                raise ConfigError(f"lr_scale.{pat}: not a regular expression ({e})") from None
        check(0.0 <= self.token_dropout < 1.0, "token_dropout", f"must be in [0, 1), got {self.token_dropout}")


@dataclass(frozen=True)
class StageConfig:
    """Per-stage overrides, deep-merged over the top-level blocks."""
    train: dict[str, Any] = setting(factory=dict, help="keys of `train` to override in this stage")
    data: dict[str, Any] = setting(factory=dict, help="keys of `data` to override in this stage")
    model: dict[str, Any] = setting(factory=dict, help="keys of `model` to override in this stage")
    lora: dict[str, Any] = setting(factory=dict, help="keys of `lora` to override in this stage")


@dataclass(frozen=True)
class RunConfig:
    """A run: the model and data blocks (read by their builders), LoRA, mesh, optimisation and the
    per-stage overrides of the curriculum."""
    model: dict[str, Any] = setting(factory=dict, help=(
        "the model, read by `model.builder` (default: the speech LLM, esrt_jax/speech/build.py; its keys: "
        "esrt_jax.speech.config.SpeechModelConfig): local HF folders `whisper`/`llm` or tiny "
        "`whisper_config`/`llm_config`, `adapter`, `tokenizer`, `decode`, dtypes"))
    data: dict[str, Any] = setting(factory=dict, help=(
        "the data, read by `data.builder` (default: the speech data pipeline, SpeechDataConfig + "
        "esrt_jax.data.pipeline.DataConfig): sources `train`/`dev` or `demo`, `tasks` weights, `schedule`, "
        "`temperature`, `languages`, `text_buckets`, `encoder_cache`, `augment` (docs/data.md)"))
    lora: RunLoraConfig = setting(RunLoraConfig(), help="LoRA on the LLM (`lora` section below)")
    mesh: MeshConfig = setting(MeshConfig(), help="the device mesh (`mesh` section below)")
    train: TrainConfig = setting(TrainConfig(), help="optimisation and loop settings (`train` section below)")
    stages: dict[str, StageConfig] = setting(factory=dict, help=(
        "per-stage overrides, `align` (runs only when given), `asr`, `smt`, `srt` -> {train, data, model, "
        "lora}, deep-merged over the top-level blocks"))
    run_dir: str = setting("runs/default", help="output folder (`--run-dir` overrides it)")
    stage: str | None = setting(None, help="set by the trainer to the stage being run; not for configs")

    def validate(self):
        for name in self.stages:
            check(name in STAGES, f"stages.{name}", f"unknown stage; valid stages: {list(STAGES)}")
        langs = self.data.get("languages")  # read raw in several places: a string would be iterated
        check(langs is None or (isinstance(langs, (list, tuple)) and all(isinstance(c, str) for c in langs)),
              "data.languages", f"expected a list of language codes, e.g. [{langs}], got {langs!r}"
              if isinstance(langs, str) else f"expected a list of language codes, got {langs!r}")
        for key, block in (("model", self.model), ("data", self.data)):
            b = block.get("builder")
            check(b is None or (isinstance(b, str) and ":" in b), f"{key}.builder",
                  f"must be 'package.module:function', got {b!r}")

    def curriculum(self) -> tuple[str, ...]:
        """The stages `--stage=all` runs, in order: align when configured, then the LLM stages."""
        return tuple(s for s in STAGES if s != "align" or "align" in self.stages)

    def previous_stage(self, name: str) -> str | None:
        """The stage `name` starts from (None: the first of the curriculum)."""
        order = self.curriculum()
        i = order.index(name) if name in order else STAGES.index(name)
        return order[i - 1] if i > 0 else None

    def model_builder(self) -> Callable:
        """`model.builder` (default: the speech LLM): fn(cfg, *, abstract) -> TrainBundle."""
        name = self.model.get("builder", DEFAULT_MODEL_BUILDER)
        return import_object(BUILDER_ALIASES.get(name, name), "model.builder")

    def data_builder(self) -> Callable:
        """`data.builder` (default: the speech data pipeline)."""
        name = self.data.get("builder", DEFAULT_DATA_BUILDER)
        return import_object(BUILDER_ALIASES.get(name, name), "data.builder")

    def for_stage(self, name: str) -> "RunConfig":
        """This config with stage `name`'s overrides merged and validated."""
        if name not in STAGES:
            raise ConfigError(f"unknown stage {name!r}; valid stages: {list(STAGES)}")
        base = to_dict(self)
        ov = self.stages.get(name, StageConfig())
        for block in ("train", "data", "model", "lora"):
            base[block] = deep_merge(base[block], getattr(ov, block))
        base["stage"] = name
        try:
            return from_dict(RunConfig, base)
        except ConfigError as e:
            raise ConfigError(f"stages.{name}: {e}") from None


def deep_merge(a: dict, b: dict) -> dict:
    """Recursive dict merge; values of `b` win."""
    out = copy.deepcopy(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def save_run_config(run_dir: str | Path, cfg: RunConfig) -> Path:
    """RUN_DIR/config.yaml: the resolved config (what export/eval/serve read), written atomically and
    only when it changed (rerunning a finished run on a read-only run dir writes nothing).
    Raises the OSError of a failed write."""
    path = Path(run_dir) / "config.yaml"
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True).encode("utf-8")
    if path.is_file() and path.read_bytes() == text:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, text)


def load_run_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """YAML (optional) + 'a.b=value' overrides -> validated RunConfig (all stages checked)."""
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    try:
        cfg = from_dict(RunConfig, data)
    except ConfigError as e:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{e}") from None
    for s in STAGES:  # fail fast on a bad per-stage override
        cfg.for_stage(s)
    return cfg

