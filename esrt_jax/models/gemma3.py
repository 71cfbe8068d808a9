"""Gemma-3 text decoder config (`gemma3_text`; also the text part of multimodal `gemma3`).

Gemma specifics, all config flags of the shared `esrt_jax.models.llm.CausalLM`: RMSNorm as
`norm(x) * (1 + w)`, four norms per block (sandwich), QK-norm, embeddings times sqrt(D),
attention scale `query_pre_attn_scalar ** -0.5`, GeLU-tanh MLP, per-layer sliding/global
attention (`layer_types`, or the older `sliding_window_pattern`) where sliding layers use their
own rope base (`rope_local_base_freq` / `rope_parameters['sliding_attention']`) without scaling
and global layers the (possibly linearly scaled) `rope_theta`; optional final logit soft-capping
(None in released Gemma-3 configs). `attn_logit_softcapping` is read but NOT applied, exactly as in
transformers' Gemma3Attention (which never passes it to the attention kernel); the shared layer
supports attention soft-capping for families that do use it.

Multimodal `gemma3` checkpoints (ESRT-4B/12B start from gemma-3-4b/12b) keep the text model
under `language_model.model.` (hub files) or `model.language_model.` (transformers 5 saves);
`llm.detect_hf_prefix` finds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from esrt_jax.config import ConfigError, hf_dict
from esrt_jax.models.llm_config import LLMConfig, eos_tuple, rope_from_hf


@dataclass(frozen=True)
class Gemma3TextConfig(LLMConfig):
    """Gemma-3 text model (`model_type='gemma3_text'`, or `'gemma3'` via its `text_config`)."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("gemma3_text", "gemma3")

    @classmethod
    def from_hf_config(cls, hf: Any) -> "Gemma3TextConfig":
        d = hf_dict(hf)
        mt = d.get("model_type")
        if mt == "gemma3":
            tc = d.get("text_config")
            if tc is None:
                raise ConfigError("gemma3 config has no text_config")
            d = hf_dict(tc)
            mt = "gemma3_text"
        if mt not in cls.MODEL_TYPES:
            raise ConfigError(f"Gemma3TextConfig: model_type {mt!r} is not one of {list(cls.MODEL_TYPES)}")
        if d.get("use_bidirectional_attention"):
            raise ConfigError("gemma3_text: use_bidirectional_attention=True is not supported")
        n_layers = int(d.get("num_hidden_layers", 26))
        layer_types = d.get("layer_types")
        if not layer_types:
            pattern = int(d.get("sliding_window_pattern", 6))
            layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                           for i in range(n_layers)]
        glob = rope_from_hf(d, key="full_attention", default_theta=1_000_000.0)
        rp = d.get("rope_parameters") or {}
        if isinstance(rp.get("sliding_attention"), dict):
            local = rope_from_hf(d, key="sliding_attention", default_theta=10_000.0)
            if local["rope_type"] != "default":
                raise ConfigError("gemma3_text: scaled rope on sliding layers is not supported")
            local_theta = local["rope_theta"]
        else:
            local_theta = float(d.get("rope_local_base_freq", 10_000.0))
        bias = bool(d.get("attention_bias", False))
        heads = int(d.get("num_attention_heads", 8))
        return cls(
            model_type="gemma3_text", vocab_size=int(d.get("vocab_size", 262_208)),
            hidden_size=int(d.get("hidden_size", 2304)),
            intermediate_size=int(d.get("intermediate_size", 9216)), num_hidden_layers=n_layers,
            num_attention_heads=heads, num_key_value_heads=int(d.get("num_key_value_heads", 4)),
            head_dim=int(d.get("head_dim", 256)),
            hidden_act=d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh",
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), norm_plus_one=True,
            local_rope_theta=local_theta,
            max_position_embeddings=int(d.get("max_position_embeddings", 131_072)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            qkv_bias=bias, o_bias=bias, qk_norm=True, sandwich_norm=True, embed_scale=True,
            query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", 256)),
            # transformers' Gemma-3 never passes attn_logit_softcapping to its attention (only
            # Gemma-2 does); we follow the reference implementation, so it is not applied.
            attn_logit_softcapping=None,
            final_logit_softcapping=d.get("final_logit_softcapping"),
            sliding_window=d.get("sliding_window", 4096), layer_types=tuple(layer_types),
            bos_token_id=d.get("bos_token_id", 2), eos_token_id=eos_tuple(d.get("eos_token_id", 1)),
            pad_token_id=d.get("pad_token_id", 0), **glob)

    def to_hf_config(self) -> dict:
        return {
            **self._hf_common("gemma3_text", "Gemma3ForCausalLM"),
            "head_dim": self.head_dim, "hidden_activation": self.hidden_act,
            "attention_bias": self.qkv_bias,
            "query_pre_attn_scalar": (int(self.query_pre_attn_scalar)
                                      if float(self.query_pre_attn_scalar).is_integer()
                                      else self.query_pre_attn_scalar),
            "sliding_window": self.sliding_window, "layer_types": list(self.layer_types),
            "final_logit_softcapping": self.final_logit_softcapping,
            "attn_logit_softcapping": self.attn_logit_softcapping,
            "rope_parameters": {
                "full_attention": self.rope_parameters_hf(),
                "sliding_attention": {"rope_type": "default", "rope_theta": self.local_rope_theta},
            },
        }
