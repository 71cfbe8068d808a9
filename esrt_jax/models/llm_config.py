"""Decoder LLM configs: the family-independent `LLMConfig`, `LoraConfig`, and HF rope parsing.

Families (`qwen`, `gemma3`, `llama`) subclass `LLMConfig` with `from_hf_config` / `to_hf_config`;
`esrt_jax.models.llm.config_from_hf` picks the family by `model_type`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from esrt_jax.config import ConfigError, check, setting
from esrt_jax.models.layers import RopeSpec

LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA on the LLM projections. targets: any of q_proj k_proj v_proj o_proj gate_proj up_proj
    down_proj. scale = alpha / rank. Dropout acts on the LoRA input only, only with a dropout rng."""
    targets: tuple[str, ...] = setting(("q_proj", "v_proj"),
                                     help="LLM projections that get LoRA factors: any of q_proj k_proj v_proj "
                                          "o_proj gate_proj up_proj down_proj")
    rank: int = setting(16, help="LoRA rank r")
    alpha: float = setting(32.0, help="LoRA alpha; the update is scaled by alpha / rank")
    dropout: float = setting(0.05, help="dropout on the LoRA input while training (only with a dropout rng), "
                                        "in [0, 1)")

    TARGETS: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "o_proj",
                                          "gate_proj", "up_proj", "down_proj")

    def validate(self):
        check(self.rank > 0, "rank", f"must be > 0, got {self.rank}")
        check(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.targets if t not in self.TARGETS]
        check(not bad, "targets", f"unknown LoRA target(s) {bad}; choose from {list(self.TARGETS)}")
        check(len(self.targets) > 0, "targets", "at least one target is needed")

    def __post_init__(self):
        self.validate()


@dataclass(frozen=True)
class LLMConfig:
    """Architecture of a decoder LLM, family-independent (hashable: static under jit).

    Families subclass it (`QwenConfig`, `Gemma3TextConfig`, `LlamaConfig`) and add
    `from_hf_config` / `to_hf_config` plus their HF tensor names.
    """
    model_type: str = setting(help="HF model_type of the family (qwen2, gemma3_text, llama, ...)")
    vocab_size: int = setting(help="vocabulary size")
    hidden_size: int = setting(help="model width")
    intermediate_size: int = setting(help="MLP width")
    num_hidden_layers: int = setting(help="decoder layers")
    num_attention_heads: int = setting(help="query heads")
    num_key_value_heads: int = setting(help="key/value heads (grouped-query attention)")
    head_dim: int = setting(help="width of one head")
    hidden_act: str = setting("silu", help="MLP activation")
    rms_norm_eps: float = setting(1e-6, help="RMSNorm epsilon")
    norm_plus_one: bool = setting(False, help="Gemma: norm(x) * (1 + w)")
    rope_theta: float = setting(10000.0, help="rotary base (global layers)")
    rope_type: str = setting("default",
                           help="rotary scaling: default | linear | llama3 | dynamic | yarn (global layers)")
    rope_factor: float = setting(1.0, help="rotary scaling factor")
    rope_low_freq_factor: float = setting(1.0, help="llama3 rotary low-frequency factor")
    rope_high_freq_factor: float = setting(4.0, help="llama3 rotary high-frequency factor")
    rope_original_max_position_embeddings: int | None = setting(None,
                                                              help="context length the rotary scaling extends")
    rope_attention_factor: float = setting(1.0, help="yarn attention factor (from attention_factor or mscale)")
    rope_beta_fast: float = setting(32.0, help="yarn beta_fast")
    rope_beta_slow: float = setting(1.0, help="yarn beta_slow")
    rope_truncate: bool = setting(True, help="yarn: truncate the correction range")
    local_rope_theta: float | None = setting(None, help="Gemma-3 sliding layers: rotary base (default rope)")
    max_position_embeddings: int = setting(32768, help="longest context")
    tie_word_embeddings: bool = setting(False, help="output head shares the embedding matrix")
    qkv_bias: bool = setting(False, help="biases on q, k, v")
    o_bias: bool = setting(False, help="bias on the attention output")
    mlp_bias: bool = setting(False, help="biases in the MLP")
    qk_norm: bool = setting(False, help="Qwen3, Gemma-3: RMSNorm over head_dim on q and k")
    sandwich_norm: bool = setting(False, help="Gemma: post-attention / pre-FFN / post-FFN norms")
    embed_scale: bool = setting(False, help="Gemma: embeddings * sqrt(hidden_size)")
    query_pre_attn_scalar: float | None = setting(None, help="attention scale = this ** -0.5 (default head_dim)")
    attn_logit_softcapping: float | None = setting(None, help="soft cap of attention logits")
    final_logit_softcapping: float | None = setting(None, help="soft cap of output logits")
    sliding_window: int | None = setting(None, help="window of sliding-attention layers")
    layer_types: tuple[str, ...] = setting((),
                                         help="per layer: full_attention | sliding_attention (default: all full)")
    bos_token_id: int | None = setting(None, help="BOS token id of the checkpoint")
    eos_token_id: tuple[int, ...] = setting((), help="EOS token id(s) of the checkpoint")
    pad_token_id: int | None = setting(None, help="pad token id of the checkpoint")

    # Family registry hooks (class-level).
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ()
    # HF tensors (suffix under `layers.{i}.`) that a family's checkpoints store fused, -> the
    # `hf_layer_names` parts they hold, in row order (Phi-3: qkv_proj, gate_up_proj). The model
    # keeps separate projections; the name maps read / write row ranges (`hf_names.fuse_rows`).
    HF_FUSED: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full_attention",) * self.num_hidden_layers)
        self.validate()

    def validate(self):
        check(self.hidden_size > 0 and self.num_hidden_layers > 0, "hidden_size",
              "hidden_size and num_hidden_layers must be positive")
        check(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
              f"{self.num_key_value_heads} must divide num_attention_heads={self.num_attention_heads}")
        check(self.head_dim % 2 == 0, "head_dim", f"must be even for rotary embeddings, got {self.head_dim}")
        check(len(self.layer_types) == self.num_hidden_layers, "layer_types",
              f"has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        check(not bad, "layer_types", f"unsupported layer type(s) {bad}; supported: {list(LAYER_TYPES)}")
        check(self.sliding_window is not None or "sliding_attention" not in self.layer_types,
              "sliding_window", "sliding_attention layers need a sliding_window")
        check(self.rope_type in RopeSpec.SUPPORTED, "rope_type",
              f"unsupported rope type {self.rope_type!r}; supported: {list(RopeSpec.SUPPORTED)}")

    # -- derived --------------------------------------------------------------------------
    @property
    def is_sliding(self) -> tuple[bool, ...]:
        return tuple(t == "sliding_attention" for t in self.layer_types)

    @property
    def attn_scale(self) -> float:
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def rope_spec(self, local: bool = False) -> RopeSpec:
        if local and self.local_rope_theta is not None:
            return RopeSpec(head_dim=self.head_dim, theta=self.local_rope_theta)
        return RopeSpec(head_dim=self.head_dim, theta=self.rope_theta, rope_type=self.rope_type,
                        factor=self.rope_factor, low_freq_factor=self.rope_low_freq_factor,
                        high_freq_factor=self.rope_high_freq_factor,
                        original_max_position_embeddings=self.rope_original_max_position_embeddings,
                        max_position_embeddings=self.max_position_embeddings,
                        attention_factor=self.rope_attention_factor, beta_fast=self.rope_beta_fast,
                        beta_slow=self.rope_beta_slow, truncate=self.rope_truncate)

    def rope_parameters_hf(self) -> dict:
        """The global rope settings in HF's `rope_parameters` form."""
        d: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type in ("linear", "dynamic", "llama3", "yarn"):
            d["factor"] = self.rope_factor
        if self.rope_type == "yarn":
            d.update(original_max_position_embeddings=self.rope_original_max_position_embeddings,
                     attention_factor=self.rope_attention_factor, beta_fast=self.rope_beta_fast,
                     beta_slow=self.rope_beta_slow, truncate=self.rope_truncate)
        if self.rope_type == "llama3":
            d.update(low_freq_factor=self.rope_low_freq_factor, high_freq_factor=self.rope_high_freq_factor,
                     original_max_position_embeddings=self.rope_original_max_position_embeddings)
        return d

    # -- HF conversion: implemented per family ---------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: Any) -> "LLMConfig":
        raise NotImplementedError(f"{cls.__name__} is the family-independent base; use config_from_hf")

    def to_hf_config(self) -> dict:
        raise NotImplementedError(f"{type(self).__name__} has no HF form; use a family config")

    def _hf_common(self, model_type: str, architecture: str) -> dict:
        """The HF config keys every family shares; families add their own on top."""
        eos = self.eos_token_id
        return {
            "model_type": model_type, "architectures": [architecture],
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id, "pad_token_id": self.pad_token_id,
            "eos_token_id": list(eos) if len(eos) > 1 else (eos[0] if eos else None),
        }

    def hf_layer_names(self) -> list[tuple[str, tuple[str, ...], str]]:
        """(HF suffix under `layers.{i}.`, our path under `layers`, kind) for one layer."""
        names = [("input_layernorm.weight", ("input_layernorm", "scale"), "vector")]
        for p in ("q", "k", "v"):
            names.append((f"self_attn.{p}_proj.weight", ("self_attn", f"{p}_proj", "kernel"), f"{p}_in"))
            if self.qkv_bias:
                names.append((f"self_attn.{p}_proj.bias", ("self_attn", f"{p}_proj", "bias"), f"{p}_bias"))
        names.append(("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), "o_in"))
        if self.o_bias:
            names.append(("self_attn.o_proj.bias", ("self_attn", "o_proj", "bias"), "vector"))
        if self.qk_norm:
            names += [("self_attn.q_norm.weight", ("self_attn", "q_norm", "scale"), "vector"),
                      ("self_attn.k_norm.weight", ("self_attn", "k_norm", "scale"), "vector")]
        names.append(("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), "vector"))
        if self.sandwich_norm:
            names += [("pre_feedforward_layernorm.weight", ("pre_feedforward_layernorm", "scale"), "vector"),
                      ("post_feedforward_layernorm.weight", ("post_feedforward_layernorm", "scale"), "vector")]
        for p in ("gate", "up", "down"):
            names.append((f"mlp.{p}_proj.weight", ("mlp", f"{p}_proj", "kernel"), "linear"))
            if self.mlp_bias:
                names.append((f"mlp.{p}_proj.bias", ("mlp", f"{p}_proj", "bias"), "vector"))
        return names


def rope_from_hf(d: Mapping, key: str | None = None, default_theta: float = 10000.0) -> dict:
    """Normalise HF rope settings (5.x `rope_parameters`, or 4.x `rope_theta` + `rope_scaling`)
    into our config fields. `key` picks a per-layer-type entry (Gemma-3)."""
    rp = d.get("rope_parameters")
    if rp and key is not None and key in rp:
        rp = rp[key]
    elif rp and key is not None and isinstance(next(iter(rp.values()), None), Mapping):
        rp = None
    if not rp:
        rp = dict(d.get("rope_scaling") or {})
        rp.setdefault("rope_theta", d.get("rope_theta", default_theta))
    rt = rp.get("rope_type", rp.get("type", "default")) or "default"
    if rt not in RopeSpec.SUPPORTED:
        raise ConfigError(f"rope type {rt!r} is not supported; supported: {list(RopeSpec.SUPPORTED)}")
    out = {"rope_theta": float(rp.get("rope_theta", default_theta)), "rope_type": rt}
    if "factor" in rp and rp["factor"] is not None:
        out["rope_factor"] = float(rp["factor"])
    if rt == "llama3":
        out["rope_low_freq_factor"] = float(rp["low_freq_factor"])
        out["rope_high_freq_factor"] = float(rp["high_freq_factor"])
        out["rope_original_max_position_embeddings"] = int(rp["original_max_position_embeddings"])
    if rt == "yarn":
        orig = int(rp["original_max_position_embeddings"])
        factor = rp.get("factor")
        if factor is None:
            factor = d.get("max_position_embeddings", orig) / orig
        factor = float(factor)

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        af = rp.get("attention_factor")
        if af is None:
            ms, msa = rp.get("mscale"), rp.get("mscale_all_dim")
            af = mscale(factor, ms) / mscale(factor, msa) if ms and msa else mscale(factor)
        out.update(rope_factor=factor, rope_original_max_position_embeddings=orig,
                   rope_attention_factor=float(af),
                   rope_beta_fast=float(rp.get("beta_fast") or 32.0),
                   rope_beta_slow=float(rp.get("beta_slow") or 1.0),
                   rope_truncate=bool(rp.get("truncate", True)))
    return out


def eos_tuple(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, (list, tuple)):
        return tuple(int(x) for x in v)
    return (int(v),)
