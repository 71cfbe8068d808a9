"""Phi-3, an LLM family whose checkpoints fuse q/k/v (`qkv_proj`) and gate/up (`gate_up_proj`).

Adding it took its family file (`esrt_jax/models/phi3.py`: the config, its HF form and the
`HF_FUSED` table of fused tensors) and its entry in `models/llm.py` `FAMILIES`; the name maps,
loader, export and sharding are the shared ones (`hf_names.fuse_rows` / `join_rows` read and write
row ranges of a fused tensor). Tiny random `Phi3ForCausalLM`s (2 layers, hidden 64, 4 query heads
over 2 KV heads), fp32: logits vs transformers on a left-padded batch (max abs diff <= 1e-4), and
HF -> ours -> HF gives the same tensors bit for bit.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from esrt_jax.config import ConfigError  # noqa: E402
from esrt_jax.convert.llm import export_hf, load_hf_model  # noqa: E402
from esrt_jax.convert.peft import export_peft_adapter  # noqa: E402
from esrt_jax.models import llm  # noqa: E402
from esrt_jax.models.layers import LoraParam  # noqa: E402
from esrt_jax.sharding import DEFAULT_RULES, make_mesh  # noqa: E402
from helpers_llm import left_padded_batch, tiny_hf_pair  # noqa: E402

B, T, V = 3, 16, 256
CONFIGS = {
    "full": dict(),
    "sliding": dict(sliding_window=4),  # window 4 < sequence 16: every layer slides
}


def _hf_config(**kw):
    return transformers.Phi3Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                                   **kw)


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    """name -> (torch model, saved dir, our config, our model)."""
    out = {}
    for name, kw in CONFIGS.items():
        out[name] = tiny_hf_pair(transformers.Phi3ForCausalLM, _hf_config(**kw), tmp_path_factory.mktemp(name))
    return out


def _ours(model, ids, mask, pos):
    g, s = nnx.split(model)

    @jax.jit
    def fwd(s, ids, pos, mask):
        m = nnx.merge(g, s)
        return m(m.embed(ids), pos, mask)[0]
    return np.asarray(fwd(s, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask)))


def _torch(tm, ids, mask, pos):
    with torch.no_grad():
        return tm(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask.astype(np.int64)),
                  position_ids=torch.tensor(pos, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_parity_left_padded(phi3, name):
    tm, _, cfg, model = phi3[name]
    assert type(cfg).__name__ == "Phi3Config" and cfg.num_key_value_heads < cfg.num_attention_heads
    ids, mask, pos = left_padded_batch(B, T, V)
    diff = np.abs(_ours(model, ids, mask, pos) - _torch(tm, ids, mask, pos))[mask].max()
    print(f"phi3 {name}: logits max abs diff {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hf_ours_hf_round_trip(phi3, name, tmp_path):
    tm, src, cfg, model = phi3[name]
    # the fused tensors are split into our separate projections ...
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    q = np.asarray(flat[("layers", "self_attn", "q_proj", "kernel")].get_value())[1]  # (D, H, Dh)
    np.testing.assert_array_equal(q.reshape(64, -1).T, sd["model.layers.1.self_attn.qkv_proj.weight"][:64])
    up = np.asarray(flat[("layers", "mlp", "up_proj", "kernel")].get_value())[0]  # (D, F)
    np.testing.assert_array_equal(up.T, sd["model.layers.0.mlp.gate_up_proj.weight"][128:])
    # ... and joined again on export: the same tensors, config and logits in transformers
    out = export_hf(model, tmp_path / "out", source_dir=src)
    back = load_file(str(out / "model.safetensors"))
    assert set(back) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    hf = json.loads((out / "config.json").read_text())
    assert hf["architectures"] == ["Phi3ForCausalLM"] and llm.config_from_hf(hf) == cfg
    assert llm.config_from_hf(transformers.AutoConfig.for_model(**cfg.to_hf_config())) == cfg
    tm2 = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids, mask, pos = left_padded_batch(B, T, V)
    np.testing.assert_array_equal(_torch(tm2, ids, mask, pos)[mask], _torch(tm, ids, mask, pos)[mask])


def test_lora_merges_into_the_fused_tensor_and_sharded_load(phi3, tmp_path):
    """LoRA on q_proj / up_proj merges into the rows of qkv_proj / gate_up_proj it belongs to; a
    fused tensor loads onto a mesh like any other; PEFT has no name for a fused part."""
    tm, src, cfg, _ = phi3["full"]
    lora = llm.LoraConfig(targets=("q_proj", "up_proj"), rank=2, alpha=4.0, dropout=0.0)
    model = load_hf_model(src, cfg=cfg, lora=lora)
    flat = dict(nnx.to_flat_state(nnx.state(model, LoraParam)))
    rng = np.random.default_rng(1)
    upd = {p: v.replace(jnp.asarray(rng.normal(size=v.get_value().shape).astype(np.float32) * 0.1))
           for p, v in flat.items() if p[-1] == "lora_b"}
    nnx.update(model, nnx.from_flat_state(upd))
    ids, mask, pos = left_padded_batch(B, T, V)
    ours = _ours(model, ids, mask, pos)
    assert np.abs(ours - _torch(tm, ids, mask, pos))[mask].max() > 1e-3  # the LoRA changes the output
    merged = transformers.AutoModelForCausalLM.from_pretrained(export_hf(model, tmp_path / "merged"),
                                                               attn_implementation="eager").eval()
    assert np.abs(_torch(merged, ids, mask, pos) - ours)[mask].max() <= 1e-4
    with pytest.raises(ValueError, match=r"LoRA on layers/\w+/(q|up)_proj has no PEFT form for phi3: its "
                                         r"checkpoints fuse"):
        export_peft_adapter(model, tmp_path / "adapter")
    sharded = load_hf_model(src, cfg=cfg, mesh=make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), rules=DEFAULT_RULES)
    np.testing.assert_allclose(_ours(sharded, ids, mask, pos), _ours(phi3["full"][3], ids, mask, pos), atol=1e-5)


def test_unsupported_phi3_variants_are_config_errors():
    base = _hf_config().to_dict()
    with pytest.raises(ConfigError, match="partial_rotary_factor 0.75 is not supported"):
        llm.config_from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                        "partial_rotary_factor": 0.75}})
    with pytest.raises(ConfigError, match="rope type 'longrope' is not supported"):
        llm.config_from_hf({**base, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4,
                                                        "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}})
