"""Phi-3 config (`model_type='phi3'`, `Phi3ForCausalLM`; model code: `esrt_jax.models.llm.CausalLM`).

A Llama-like decoder whose checkpoints store q/k/v as one `self_attn.qkv_proj` and gate/up as one
`mlp.gate_up_proj` (rows in that order). The model keeps separate projections; `HF_FUSED` tells the
name maps which row ranges of the fused tensors they are (`hf_names.fuse_rows`), so loading, export
and sharding need nothing else. No biases; every layer slides when `sliding_window` is set. The
rotary embedding must cover the whole head (`partial_rotary_factor` 1; Phi-4-mini's 0.75 is not
supported) and `longrope` is not implemented (Phi-3's 128k checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from esrt_jax.config import ConfigError, hf_dict, setting
from esrt_jax.models.llm_config import LLMConfig, eos_tuple, rope_from_hf


@dataclass(frozen=True)
class Phi3Config(LLMConfig):
    """Phi-3 (`model_type='phi3'`)."""
    original_max_position_embeddings: int = setting(4096, help="HF original_max_position_embeddings (kept "
                                                                "for the round trip)")

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("phi3",)
    HF_FUSED: ClassVar[dict[str, tuple[str, ...]]] = {
        "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                      "self_attn.v_proj.weight"),
        "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    }

    @classmethod
    def from_hf_config(cls, hf: Any) -> "Phi3Config":
        d = hf_dict(hf)
        if d.get("model_type") not in cls.MODEL_TYPES:
            raise ConfigError(f"Phi3Config: model_type {d.get('model_type')!r} is not 'phi3'")
        hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
        rp = d.get("rope_parameters") or d.get("rope_scaling") or {}
        partial = float(rp.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) or 1.0)
        if partial != 1.0:
            raise ConfigError(f"phi3: partial_rotary_factor {partial} is not supported (rotary over the "
                              f"whole head only)")
        n_layers = int(d["num_hidden_layers"])
        sw = d.get("sliding_window")
        return cls(
            model_type="phi3", vocab_size=int(d["vocab_size"]), hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]), num_hidden_layers=n_layers,
            num_attention_heads=heads, num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or hidden // heads),
            hidden_act=d.get("hidden_act", "silu"), rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            original_max_position_embeddings=int(d.get("original_max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            sliding_window=sw, layer_types=("sliding_attention" if sw else "full_attention",) * n_layers,
            bos_token_id=d.get("bos_token_id"), eos_token_id=eos_tuple(d.get("eos_token_id")),
            pad_token_id=d.get("pad_token_id"), **rope_from_hf(d, default_theta=10000.0))

    def to_hf_config(self) -> dict:
        if self.head_dim != self.hidden_size // self.num_attention_heads:
            raise ConfigError(f"phi3 derives head_dim from hidden_size / heads; {self.head_dim} cannot be "
                              f"expressed in a Phi-3 config")
        return {
            **self._hf_common("phi3", "Phi3ForCausalLM"),
            "hidden_act": self.hidden_act, "rope_parameters": self.rope_parameters_hf(),
            "sliding_window": self.sliding_window,
            "original_max_position_embeddings": self.original_max_position_embeddings,
        }
