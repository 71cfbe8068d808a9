"""Llama-family config (Llama 2/3/3.x; model code: `esrt_jax.models.llm.CausalLM`).

`attention_bias` puts biases on q/k/v/o, `mlp_bias` on the MLP; rope scaling types default,
linear, dynamic (NTK) and llama3. HF tensor names: `LLMConfig.hf_layer_names` / `llm.hf_to_ours`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from esrt_jax.config import ConfigError, hf_dict
from esrt_jax.models.llm_config import LLMConfig, eos_tuple, rope_from_hf


@dataclass(frozen=True)
class LlamaConfig(LLMConfig):
    """Llama (`model_type='llama'`)."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("llama",)

    @classmethod
    def from_hf_config(cls, hf: Any) -> "LlamaConfig":
        d = hf_dict(hf)
        if d.get("model_type") not in cls.MODEL_TYPES:
            raise ConfigError(f"LlamaConfig: model_type {d.get('model_type')!r} is not 'llama'")
        hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
        bias = bool(d.get("attention_bias", False))
        return cls(
            model_type="llama", vocab_size=int(d["vocab_size"]), hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]), num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or hidden // heads),
            hidden_act=d.get("hidden_act", "silu"), rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=bias, o_bias=bias, mlp_bias=bool(d.get("mlp_bias", False)),
            bos_token_id=d.get("bos_token_id"), eos_token_id=eos_tuple(d.get("eos_token_id")),
            pad_token_id=d.get("pad_token_id"), **rope_from_hf(d, default_theta=10000.0))

    def to_hf_config(self) -> dict:
        return {
            **self._hf_common("llama", "LlamaForCausalLM"),
            "head_dim": self.head_dim, "hidden_act": self.hidden_act,
            "attention_bias": self.qkv_bias, "mlp_bias": self.mlp_bias,
            "rope_parameters": self.rope_parameters_hf(),
        }
