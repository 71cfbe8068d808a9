"""Tokenizers: the tiny offline test tokenizer, loading from local dirs, language tags as text or
as added tokens (with embedding resize by the mean of existing rows), vocab checks, export."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from esrt_jax import languages
from esrt_jax.convert.hf_io import CheckpointError
from esrt_jax.models import llm
from esrt_jax.convert.tokenizer import (TokenizerError, add_language_tags, check_vocab, load_tokenizer,
                                       resize_token_embeddings, tag_ids)

from helpers_tokenizer import save_tiny_tokenizer, tiny_tokenizer


def tiny_llm(vocab: int, tie: bool):
    cfg = llm.config_from_hf(dict(model_type="llama", vocab_size=vocab, hidden_size=16,
                                  intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1, tie_word_embeddings=tie))
    return llm.CausalLM(cfg, rngs=nnx.Rngs(0))


def test_tiny_tokenizer_from_directory(tmp_path):
    save_tiny_tokenizer(tmp_path, add_bos=True)
    tok = load_tokenizer(tmp_path)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) == 320
    ids = tok.encode("Der schnelle braune Fuchs")
    assert ids[0] == 1 and max(ids) < 320
    assert tok.decode(ids, skip_special_tokens=True) == "Der schnelle braune Fuchs"
    # Deterministic: the same ids every time it is built.
    assert tiny_tokenizer().encode("hello world") == tok.encode("hello world", add_special_tokens=False)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="holds no tokenizer files"):
        load_tokenizer(tmp_path)
    with pytest.raises(CheckpointError, match="not a local directory"):
        load_tokenizer("google/gemma-3-4b-it")


def test_language_tags_as_text_leave_everything_alone():
    tok = tiny_tokenizer()
    n = len(tok)
    assert add_language_tags(tok, "text") == []
    assert len(tok) == n
    assert len(tag_ids(tok, ["deu"])[0]) > 1  # several sub-word tokens (LLM-SRT behaviour)


def test_language_tags_as_added_tokens():
    tok = tiny_tokenizer()
    new = add_language_tags(tok, "added")
    assert len(new) == len(languages.ESRT_LANGS) and new == list(range(320, 320 + len(new)))
    assert all(len(ids) == 1 for ids in tag_ids(tok, ["deu", "eng", "cmn"]))
    text = "Hallo Welt<|deu|><|eng|>Hello world"
    ids = tok.encode(text, add_special_tokens=False)
    # Not special: decoding with skip_special_tokens keeps them, so the SRT split works.
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert add_language_tags(tok, "added") == []  # idempotent
    llm_srt = tiny_tokenizer()
    assert len(add_language_tags(llm_srt, "added", languages.LLM_SRT_LANGS)) == len(languages.LLM_SRT_LANGS)
    with pytest.raises(TokenizerError, match="unknown mode"):
        add_language_tags(tok, "special")


def test_check_vocab():
    tok = tiny_tokenizer()
    check_vocab(tok, 320)
    check_vocab(tok, 384)  # padded tables (Qwen) are fine
    with pytest.raises(TokenizerError, match=r"ckpt: tokenizer/vocab-size mismatch: the tokenizer has 320"):
        check_vocab(tok, 300, where="ckpt")


@pytest.mark.parametrize("tie", [False, True])
def test_resize_grows_table_with_mean_rows(tie):
    model = tiny_llm(320, tie)
    tok = tiny_tokenizer()
    new = add_language_tags(tok, "added")
    with pytest.raises(TokenizerError, match="mismatch"):
        check_vocab(tok, model.config.vocab_size)
    old_emb = np.asarray(model.embed_tokens.embedding.get_value())
    old_head = None if tie else np.asarray(model.lm_head.kernel.get_value())

    resized = resize_token_embeddings(model, tok, new, pad_to_multiple_of=8)
    V = 368  # 365 rounded up to a multiple of 8
    assert resized.config.vocab_size == V and model.config.vocab_size == 320  # input model untouched
    check_vocab(tok, resized.config.vocab_size)
    emb = np.asarray(resized.embed_tokens.embedding.get_value())
    assert emb.shape == (V, 16)
    np.testing.assert_array_equal(emb[:320], old_emb)
    np.testing.assert_allclose(emb[new], np.broadcast_to(old_emb.mean(0), (len(new), 16)), atol=1e-7)
    if not tie:
        head = np.asarray(resized.lm_head.kernel.get_value())
        assert head.shape == (16, V)
        np.testing.assert_array_equal(head[:, :320], old_head)
        np.testing.assert_allclose(head[:, new].T, np.broadcast_to(old_head.mean(1), (len(new), 16)),
                                   atol=1e-7)
    # The resized model runs and the new tag ids are valid inputs.
    ids = jnp.asarray([tok.encode("hi<|deu|><|eng|>", add_special_tokens=False)], jnp.int32)
    mask = jnp.ones(ids.shape, bool)
    logits, _ = resized(resized.embed(ids), llm.positions_from_mask(mask), mask)
    assert logits.shape == (1, ids.shape[1], V) and bool(jnp.all(jnp.isfinite(logits)))


def test_resize_reuses_spare_rows():
    model = tiny_llm(384, False)  # Qwen-style padded table: 384 rows, 320 tokens
    tok = tiny_tokenizer()
    new = add_language_tags(tok, "added", ["deu", "eng"])
    resized = resize_token_embeddings(model, tok, new)
    assert resized.config.vocab_size == 384
    emb = np.asarray(resized.embed_tokens.embedding.get_value())
    old = np.asarray(model.embed_tokens.embedding.get_value())
    np.testing.assert_allclose(emb[new], np.broadcast_to(old[:320].mean(0), (2, 16)), atol=1e-7)
    np.testing.assert_array_equal(np.delete(emb, new, 0), np.delete(old, new, 0))


def test_export_with_added_tags_loads_in_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from esrt_jax.convert.llm import export_hf

    model = tiny_llm(320, True)
    tok = tiny_tokenizer()
    model = resize_token_embeddings(model, tok, add_language_tags(tok, "added"))
    out = export_hf(model, tmp_path / "tagged", tokenizer=tok)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 365
    tok2 = transformers.AutoTokenizer.from_pretrained(out)
    assert tok2.encode("<|yue|>", add_special_tokens=False) == tok.encode("<|yue|>", add_special_tokens=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.asarray([tok.encode("a<|deu|><|eng|>b", add_special_tokens=False)])
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits.numpy()
    mask = jnp.ones(ids.shape, bool)
    ours, _ = model(model.embed(jnp.asarray(ids, jnp.int32)), llm.positions_from_mask(mask), mask)
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-4
    jax.clear_caches()
