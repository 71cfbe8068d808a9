"""Qwen2 / Qwen2.5 and Qwen3 configs (model code: `esrt_jax.models.llm.CausalLM`).

Differences handled by config flags: Qwen2 has biases on q/k/v (not o); Qwen3 has none (unless
`attention_bias`), an explicit `head_dim` and RMSNorm on q and k per head (QK-norm). Optional
sliding-window layers follow HF (`use_sliding_window`, layers >= `max_window_layers`, or an
explicit `layer_types`). HF tensor names: `LLMConfig.hf_layer_names` / `llm.hf_to_ours`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from esrt_jax.config import ConfigError, hf_dict, setting
from esrt_jax.models.llm_config import LLMConfig, eos_tuple, rope_from_hf


@dataclass(frozen=True)
class QwenConfig(LLMConfig):
    """Qwen2/Qwen2.5 (`model_type='qwen2'`) and Qwen3 (`'qwen3'`)."""
    max_window_layers: int | None = setting(None, help="HF max_window_layers (kept for the round trip)")

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("qwen2", "qwen3")

    @classmethod
    def from_hf_config(cls, hf: Any) -> "QwenConfig":
        d = hf_dict(hf)
        mt = d.get("model_type")
        if mt not in cls.MODEL_TYPES:
            raise ConfigError(f"QwenConfig: model_type {mt!r} is not one of {list(cls.MODEL_TYPES)}")
        qwen3 = mt == "qwen3"
        hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
        n_layers = int(d["num_hidden_layers"])
        head_dim = d.get("head_dim") or (128 if qwen3 and "head_dim" in d else hidden // heads)
        sw = d.get("sliding_window") if d.get("use_sliding_window", False) else None
        mwl = d.get("max_window_layers", 28)
        layer_types = d.get("layer_types")
        if not layer_types:
            layer_types = ["sliding_attention" if sw is not None and i >= mwl else "full_attention"
                           for i in range(n_layers)]
        bias = bool(d.get("attention_bias", False))
        return cls(
            model_type=mt, vocab_size=int(d["vocab_size"]), hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]), num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads), head_dim=int(head_dim),
            hidden_act=d.get("hidden_act", "silu"), rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=bias if qwen3 else True, o_bias=bias if qwen3 else False, qk_norm=qwen3,
            sliding_window=sw, layer_types=tuple(layer_types), max_window_layers=mwl,
            bos_token_id=d.get("bos_token_id"), eos_token_id=eos_tuple(d.get("eos_token_id")),
            pad_token_id=d.get("pad_token_id"), **rope_from_hf(d, default_theta=10000.0))

    def to_hf_config(self) -> dict:
        qwen3 = self.model_type == "qwen3"
        d = {
            **self._hf_common(self.model_type, "Qwen3ForCausalLM" if qwen3 else "Qwen2ForCausalLM"),
            "hidden_act": self.hidden_act,
            "rope_parameters": self.rope_parameters_hf(),
            "use_sliding_window": self.sliding_window is not None,
            "sliding_window": self.sliding_window,
            "max_window_layers": self.max_window_layers if self.max_window_layers is not None
            else self.num_hidden_layers,
            "layer_types": list(self.layer_types),
        }
        if qwen3:
            d["head_dim"] = self.head_dim
            d["attention_bias"] = self.qkv_bias
        elif self.head_dim != self.hidden_size // self.num_attention_heads:
            raise ConfigError(f"qwen2 derives head_dim from hidden_size / heads; {self.head_dim} "
                              f"cannot be expressed in a Qwen2 config")
        return d
