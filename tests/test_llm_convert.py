"""HF <-> ours conversion of decoder LLMs: round trips through transformers, sharded and bf16
checkpoints, LoRA merged export and PEFT adapters (loaded by `peft`), mesh placement, errors.

Each family is a tiny random transformers model saved with `save_pretrained` (plus the tiny
offline tokenizer), so nothing is downloaded.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from esrt_jax.config import ConfigError  # noqa: E402
from esrt_jax.convert import hf_io  # noqa: E402
from esrt_jax.convert.llm import export_hf, load_hf_model, model_from_hf_state, param_shardings  # noqa: E402
from esrt_jax.convert.peft import (export_peft_adapter, load_peft_adapter,  # noqa: E402
                                   read_peft_config)
from esrt_jax.models.layers import LoraParam  # noqa: E402
from esrt_jax.models.llm import LoraConfig, positions_from_mask  # noqa: E402
from esrt_jax.convert.tokenizer import TokenizerError  # noqa: E402
from esrt_jax.sharding import (DEFAULT_RULES, UnruledAxisError, fit_spec, logical_to_mesh, make_mesh,  # noqa: E402
                               variable_axes)

from helpers_tokenizer import save_tiny_tokenizer  # noqa: E402

T = transformers
P = jax.sharding.PartitionSpec
COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)


def hf_config(family: str):
    if family == "qwen2":  # untied, q/k/v biases, spare vocab rows (384 > 320 tokens)
        return T.Qwen2Config(vocab_size=384, tie_word_embeddings=False, **COMMON)
    if family == "qwen3":  # tied, QK-norm, explicit head_dim
        return T.Qwen3Config(vocab_size=320, head_dim=8, tie_word_embeddings=True, **COMMON)
    if family == "gemma3_text":  # tied, sliding (window 4 < sequence) + global layer
        return T.Gemma3TextConfig(vocab_size=320, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                                  layer_types=["sliding_attention", "full_attention"], **COMMON)
    if family == "llama":  # untied
        return T.LlamaConfig(vocab_size=320, tie_word_embeddings=False, **COMMON)
    raise ValueError(family)


FAMILIES = ("qwen2", "qwen3", "gemma3_text", "llama")


def _randomize(model):
    # HF inits norms to 1 / 0 and some biases to 0: perturb everything so the mapping is tested.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """family -> (dir, HF torch model) of a saved tiny random model with a tokenizer."""
    out = {}
    for fam in FAMILIES:
        torch.manual_seed(0)
        m = _randomize(T.AutoModelForCausalLM.from_config(hf_config(fam), dtype=torch.float32)).eval()
        d = tmp_path_factory.mktemp(fam)
        m.save_pretrained(d)
        save_tiny_tokenizer(d, add_bos=fam == "gemma3_text")
        out[fam] = (d, m)
    return out


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 320, size=(2, 10)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding
    ids[1, :3] = 0
    return ids, mask


def hf_logits(model, ids, mask, **kw):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **kw
                     ).logits.float().numpy()


def our_logits(model, ids, mask):
    m = jnp.asarray(mask, bool)
    logits, _ = model(model.embed(jnp.asarray(ids, jnp.int32)), positions_from_mask(m), m)
    return np.asarray(logits)


def _valid(x, mask):
    return x[mask.astype(bool)]


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_hf_ours_hf(family, hf_dirs, tmp_path):
    src, ref_model = hf_dirs[family]
    ids, mask = _batch()
    ref = hf_logits(ref_model, ids, mask)

    model = load_hf_model(src)
    assert model.config.model_type == family
    ours = our_logits(model, ids, mask)
    assert np.abs(_valid(ours, mask) - _valid(ref, mask)).max() <= 1e-4

    out = export_hf(model, tmp_path / "out", source_dir=src)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == family and cfg["dtype"] == "float32"
    assert (out / "generation_config.json").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    names = set(hf_io.weight_files(out))
    assert ("lm_head.weight" in names) == (not ref_model.config.tie_word_embeddings)

    back = T.AutoModelForCausalLM.from_pretrained(out).eval()
    want = ref_model.state_dict()
    for k, v in back.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert np.abs(hf_logits(back, ids, mask) - ref).max() <= 1e-5
    tok = T.AutoTokenizer.from_pretrained(out)
    assert len(tok) == 320 and tok.eos_token == "</s>"


def test_sharded_checkpoint_in_and_out(hf_dirs, tmp_path):
    _, ref_model = hf_dirs["qwen2"]
    src = tmp_path / "sharded_src"
    ref_model.save_pretrained(src, max_shard_size="20KB")
    assert (src / hf_io.INDEX).is_file() and len(list(src.glob("model-*.safetensors"))) > 2

    model = load_hf_model(src)
    out = export_hf(model, tmp_path / "sharded_out", source_dir=src, max_shard_bytes=20_000)
    index = json.loads((out / hf_io.INDEX).read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert not (out / hf_io.SINGLE).exists()

    back = T.AutoModelForCausalLM.from_pretrained(out).eval()
    ids, mask = _batch()
    assert np.abs(hf_logits(back, ids, mask) - hf_logits(ref_model, ids, mask)).max() <= 1e-5


def test_bf16_checkpoint_loads_and_exports(hf_dirs, tmp_path):
    _, ref_model = hf_dirs["qwen3"]
    bf = T.AutoModelForCausalLM.from_config(ref_model.config, dtype=torch.float32)
    bf.load_state_dict(ref_model.state_dict())
    bf = bf.to(torch.bfloat16).eval()
    src = tmp_path / "bf16"
    bf.save_pretrained(src)
    with safe_open(str(src / hf_io.SINGLE), "np") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"

    model = load_hf_model(src, param_dtype=jnp.float32)
    emb = model.embed_tokens.embedding.get_value()
    assert emb.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(emb),
                                  bf.model.embed_tokens.weight.detach().float().numpy())

    out = export_hf(model, tmp_path / "bf16_out", dtype=jnp.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    back = T.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    for k, v in back.state_dict().items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, bf.state_dict()[k]), k


def _nonzero_lora(model, seed=1):
    flat = dict(nnx.to_flat_state(nnx.state(model, LoraParam)))
    key = jax.random.key(seed)
    new = {p: v.replace(0.2 * jax.random.normal(jax.random.fold_in(key, i), v.get_value().shape))
           for i, (p, v) in enumerate(sorted(flat.items()))}
    nnx.update(model, nnx.from_flat_state(new))
    return model


@pytest.mark.parametrize("family", ["qwen2", "gemma3_text"])
def test_lora_merged_export_and_peft_adapter(family, hf_dirs, tmp_path):
    src, ref_model = hf_dirs[family]
    lora = LoraConfig(targets=("q_proj", "v_proj", "o_proj", "down_proj"), rank=4, alpha=8.0,
                      dropout=0.05)
    model = _nonzero_lora(load_hf_model(src, lora=lora))
    ids, mask = _batch()
    unmerged = our_logits(model, ids, mask)
    base_ref = hf_logits(ref_model, ids, mask)
    assert np.abs(_valid(unmerged, mask) - _valid(base_ref, mask)).max() > 1e-2  # LoRA matters

    merged_dir = export_hf(model, tmp_path / "merged", source_dir=src)
    merged = T.AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert np.abs(_valid(hf_logits(merged, ids, mask), mask) - _valid(unmerged, mask)).max() <= 1e-4

    adapter = export_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(src))
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and conf["lora_alpha"] == 8
    assert conf["target_modules"] == sorted(lora.targets) and conf["lora_dropout"] == 0.05
    with safe_open(str(adapter / "adapter_model.safetensors"), "np") as f:
        keys = set(f.keys())
        assert f.get_tensor("base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight").shape == (4, 32)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 4 * 2  # A and B x 4 targets x 2 layers

    base = T.AutoModelForCausalLM.from_pretrained(src).eval()
    pm = peft.PeftModel.from_pretrained(base, adapter).eval()
    assert np.abs(_valid(hf_logits(pm, ids, mask), mask) - _valid(unmerged, mask)).max() <= 1e-4

    again = load_peft_adapter(load_hf_model(src, lora=read_peft_config(adapter)), adapter)
    np.testing.assert_allclose(our_logits(again, ids, mask), unmerged, atol=1e-6)

    # Base-only export (LoRA not merged) + adapter is the other deployment form.
    base_dir = export_hf(model, tmp_path / "base_only", merge_lora=False)
    plain = T.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    assert np.abs(hf_logits(plain, ids, mask) - base_ref).max() <= 1e-5


def test_mesh_placement_on_8_devices(hf_dirs, tmp_path):
    src, ref_model = hf_dirs["qwen2"]
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    lora = LoraConfig(rank=4, alpha=8.0)
    model = load_hf_model(src, mesh=mesh, rules=DEFAULT_RULES, lora=lora)
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    q = flat[("layers", "self_attn", "q_proj", "kernel")].get_value()  # (L, D, H, Dh)
    assert q.sharding.spec == P(None, "fsdp", "tensor") and len(q.sharding.device_set) == 8
    emb = flat[("embed_tokens", "embedding")].get_value()  # (V, D)
    assert emb.sharding.spec == P("tensor", "fsdp")
    head = flat[("lm_head", "kernel")].get_value()  # (D, V)
    assert head.sharding.spec == P("fsdp", "tensor")
    k = flat[("layers", "self_attn", "k_proj", "kernel")].get_value()  # (L, D, KV=2, Dh)
    assert k.sharding.spec == P(None, "fsdp", "tensor")
    for path, var in flat.items():
        arr = var.get_value()
        want = fit_spec(logical_to_mesh(variable_axes(var), DEFAULT_RULES, mesh), arr.shape, mesh)
        assert arr.sharding.spec == want, path
        assert arr.sharding.mesh.shape == mesh.shape, path
    assert param_shardings(model, mesh)[("layers", "self_attn", "q_proj", "kernel")].spec == q.sharding.spec

    plain = load_hf_model(src, lora=lora)
    ids, mask = _batch()
    np.testing.assert_allclose(our_logits(model, ids, mask), our_logits(plain, ids, mask), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(
        dict(nnx.to_flat_state(nnx.state(plain)))[("layers", "self_attn", "q_proj", "kernel")].get_value()))
    # Export gathers sharded params tensor by tensor.
    back = T.AutoModelForCausalLM.from_pretrained(export_hf(model, tmp_path / "from_mesh")).eval()
    assert np.abs(hf_logits(back, ids, mask) - hf_logits(ref_model, ids, mask)).max() <= 1e-5


def test_in_memory_state_dict_matches_directory(hf_dirs):
    src, ref_model = hf_dirs["llama"]
    state = {k: v.numpy() for k, v in ref_model.state_dict().items()}
    model, cfg = model_from_hf_state(ref_model.config, state)
    ids, mask = _batch()
    np.testing.assert_array_equal(our_logits(model, ids, mask), our_logits(load_hf_model(src), ids, mask))


def test_logical_to_mesh_rules():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = (("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"), ("batch", ("data", "fsdp")),
             ("layers", None), ("head_dim", None))
    assert logical_to_mesh(("layers", "embed", "heads", "head_dim"), rules) == P(None, "fsdp", "tensor")
    assert logical_to_mesh(("embed", "embed"), rules) == P("fsdp")  # a mesh axis used once
    assert logical_to_mesh(("batch", None), rules, mesh) == P(("data", "fsdp"))
    assert logical_to_mesh(("heads", "mlp"), dict(rules)) == P("tensor")  # mapping form too
    assert logical_to_mesh(("embed",), rules, make_mesh({"data": 8})) == P()  # absent axis dropped
    assert fit_spec(P(None, "tensor"), (4, 3), mesh) == P()  # 3 not divisible by 2: replicate
    with pytest.raises(ValueError, match="twice"):
        logical_to_mesh(("embed",), (("embed", "fsdp"), ("embed", None)))
    # a logical axis without a rule is an error for the loaders as for the trainer, not replicated
    with pytest.raises(UnruledAxisError, match="logical axis 'kv_heads' has no sharding rule"):
        logical_to_mesh(("embed", "kv_heads"), rules, mesh)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

def test_missing_tensor_is_named(hf_dirs, tmp_path):
    src, _ = hf_dirs["llama"]
    bad = tmp_path / "missing"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    with safe_open(str(src / hf_io.SINGLE), "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "model.layers.1.mlp.up_proj.weight"}
    hf_io.save_sharded(tensors, bad)
    with pytest.raises(hf_io.CheckpointError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf_model(bad)


def test_unsupported_model_type(tmp_path):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 32}))
    with pytest.raises(ConfigError, match=r"model_type 'gpt2' is not supported.*qwen2"):
        load_hf_model(d)


def test_hub_id_is_not_fetched():
    with pytest.raises(hf_io.CheckpointError, match="hf download Qwen/Qwen2.5-3B"):
        load_hf_model("Qwen/Qwen2.5-3B")


def test_tokenizer_vocab_mismatch(hf_dirs, tmp_path):
    _, ref_model = hf_dirs["llama"]
    small = T.LlamaConfig(vocab_size=300, tie_word_embeddings=False, **COMMON)
    d = tmp_path / "small_vocab"
    T.AutoModelForCausalLM.from_config(small).save_pretrained(d)
    save_tiny_tokenizer(d)  # 320 tokens > 300 rows
    with pytest.raises(TokenizerError, match=r"tokenizer/vocab-size mismatch.*320 tokens.*300 rows"):
        load_hf_model(d)
    load_hf_model(d, check_tokenizer=False)  # explicit opt-out still loads the weights


def test_gemma3_multimodal_checkpoint_loads_text_part(tmp_path):
    """ESRT's bases (gemma-3-4b/12b) are Gemma3ForConditionalGeneration checkpoints: the text
    model lives under `language_model.model.` next to a vision tower; we load the text part and
    export it as a text-only Gemma3ForCausalLM."""
    tc = dict(vocab_size=320, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
              layer_types=["sliding_attention", "full_attention"], **COMMON)
    vc = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
              image_size=28, patch_size=14)
    torch.manual_seed(0)
    mm = _randomize(T.Gemma3ForConditionalGeneration(T.Gemma3Config(
        text_config=tc, vision_config=vc, mm_tokens_per_image=4, image_token_index=300,
        boi_token_index=301, eoi_token_index=302))).eval()
    src = tmp_path / "gemma3_mm"
    mm.save_pretrained(src)
    model = load_hf_model(src)
    assert model.config.model_type == "gemma3_text" and model.config.sliding_window == 4
    ids, mask = _batch()
    ref = hf_logits(mm, ids, mask)
    assert np.abs(_valid(our_logits(model, ids, mask), mask) - _valid(ref, mask)).max() <= 1e-4
    back = T.AutoModelForCausalLM.from_pretrained(export_hf(model, tmp_path / "text")).eval()
    assert type(back).__name__ == "Gemma3ForCausalLM"
    assert np.abs(hf_logits(back, ids, mask) - ref).max() <= 1e-5
