"""The answer-only chunked loss (`speech_llm.answer_xent`) equals the full-logits loss, and so
do its gradients, on every LLM family, tied and untied heads, Gemma's soft-capping, LoRA with
dropout; and the compiled step never holds the (B, Q'+T, V) / (B, T, V) logits."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from esrt_jax.models.llm import LoraConfig, config_from_hf
from esrt_jax.models.qformer import QFormerConfig
from esrt_jax.models.speech_llm import SpeechLLM, SpeechLLMConfig, answer_xent, loss_fn
from esrt_jax.models.whisper import WhisperEncoderConfig

B, T, N_MELS, FRAMES = 3, 24, 16, 32
COMMON = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8)
FAMILIES = {
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=False),
    "qwen3": dict(model_type="qwen3", tie_word_embeddings=True),
    "llama": dict(model_type="llama", tie_word_embeddings=False),
    "gemma3_text": dict(model_type="gemma3_text", tie_word_embeddings=True, sliding_window=4,
                        layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=5.0),
}


def _model(family: str, lora: bool = False) -> SpeechLLM:
    enc = WhisperEncoderConfig(num_mel_bins=N_MELS, d_model=16, encoder_layers=1, encoder_attention_heads=2,
                               encoder_ffn_dim=32, max_source_positions=FRAMES // 2)
    ad = QFormerConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                       encoder_hidden_size=16, num_queries=4, llm_dim=32)
    llm = config_from_hf({**COMMON, **FAMILIES[family]})
    lcfg = LoraConfig(targets=("q_proj", "v_proj"), rank=4, dropout=0.1) if lora else None
    return SpeechLLM(SpeechLLMConfig(enc, ad, llm, lora=lcfg), rngs=nnx.Rngs(3))


def _batch(seed: int = 0) -> dict:
    rs = np.random.RandomState(seed)
    lens = np.array([T, 15, 7])                  # full row, padded rows
    starts = np.array([5, 3, 6])                 # answer starts after a prompt
    attn = (np.arange(T)[None] < lens[:, None]).astype(np.int32)
    loss = ((np.arange(T)[None] >= starts[:, None]) & (attn > 0)).astype(np.int32)
    return {"mel": jnp.asarray(rs.randn(B, N_MELS, FRAMES), jnp.float32),
            "tokens": jnp.asarray(rs.randint(0, 300, (B, T)) * attn, jnp.int32),
            "attention_mask": jnp.asarray(attn), "loss_mask": jnp.asarray(loss)}


def _both(model, batch, rng):
    """(full-logits (loss, aux), grads), (chunked (loss, aux), grads) in one compile."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def vg(**kw):
        f = lambda p: loss_fn(nnx.merge(graphdef, p, rest), batch, dropout_rng=rng, **kw)  # noqa: E731
        return jax.value_and_grad(f, has_aux=True)(params)
    # 15 positions per chunk (the budget): several chunks, a padded last one, and (the 32 answers
    # moved to the front) only 3 of the 5 chunks run; 3 row groups (one per row) too; plus the
    # undifferentiated loss (dev loss)
    plain = lambda: loss_fn(nnx.merge(graphdef, params, rest), batch, dropout_rng=rng, chunk_tokens=15)[0]  # noqa: E731
    return jax.jit(lambda: (vg(full_logits=True), vg(chunk_tokens=15), plain(),
                            vg(chunk_tokens=15, row_groups=3)))()


@pytest.mark.parametrize("family,lora", [(f, False) for f in FAMILIES] + [("qwen2", True)])
def test_chunked_loss_and_grads_match_full_logits(family, lora):
    model = _model(family, lora)
    batch = _batch()
    rng = jax.random.key(7) if lora else None
    ((l_full, a_full), g_full), ((l_chunk, a_chunk), g_chunk), l_plain, ((l_g, _), g_g) = _both(model, batch, rng)
    assert abs(float(l_full) - float(l_chunk)) <= 1e-5, (float(l_full), float(l_chunk))
    assert abs(float(l_full) - float(l_plain)) <= 1e-5, (float(l_full), float(l_plain))
    assert float(a_full["accuracy"]) == float(a_chunk["accuracy"])
    assert float(a_full["tokens"]) == float(a_chunk["tokens"]) == float(batch["loss_mask"].sum())
    flat_f, flat_c = nnx.to_flat_state(g_full), nnx.to_flat_state(g_chunk)
    worst = max(float(jnp.max(jnp.abs(a.get_value() - b.get_value()))) for (_, a), (_, b) in zip(flat_f, flat_c))
    scale = max(float(jnp.max(jnp.abs(a.get_value()))) for _, a in flat_f)
    assert scale > 0 and worst <= 1e-5, (family, worst, scale)
    assert abs(float(l_full) - float(l_g)) <= 1e-5
    worst_g = max(float(jnp.max(jnp.abs(a.get_value() - b.get_value())))
                  for (_, a), (_, b) in zip(flat_f, nnx.to_flat_state(g_g)))
    assert worst_g <= 1e-5, (family, worst_g, scale)


def test_compiled_loss_never_holds_the_full_logits():
    """Every vocabulary-sized buffer of the compiled grad(loss) (65k vocabulary, T = 96): the
    full-logits loss has (B, T, V) f32 ones; the chunked loss none larger than one (B, c, V)
    chunk or the (V, D) embedding (its gradient)."""
    V, t = 65536, 96
    m = _model("qwen2")
    llm = config_from_hf({**COMMON, **FAMILIES["gemma3_text"], "vocab_size": V})
    model = SpeechLLM(SpeechLLMConfig(m.config.encoder, m.config.adapter, llm), rngs=nnx.Rngs(0))
    batch = {"mel": _batch()["mel"], "tokens": jnp.ones((B, t), jnp.int32),
             "attention_mask": jnp.ones((B, t), jnp.int32),
             "loss_mask": jnp.asarray(np.arange(t)[None].repeat(B, 0) >= 8, jnp.int32)}
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def largest_vocab_buffer(**kw):
        f = jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), batch, **kw)[0])
        hlo = jax.jit(f).lower(params).compile().as_text()
        shapes = re.findall(r"[a-z]+\d+\[([0-9,]*\b%d\b[0-9,]*)\]" % V, hlo)
        return max(math.prod(int(d) for d in s.split(",")) for s in shapes)

    assert largest_vocab_buffer(full_logits=True) >= B * t * V
    assert largest_vocab_buffer(chunk_tokens=12) <= max(12 * V, V * COMMON["hidden_size"])


def test_answer_xent_never_runs_the_head_on_non_answer_positions():
    """Answers are moved to the front of each row and only the chunks holding them run: NaN
    hidden states at every prompt/padding position leave the loss and all gradients finite and
    equal to the plain cross-entropy over the answer positions (tied head with soft-capping)."""
    rs = np.random.RandomState(0)
    Bn, Tn, D, V = 2, 12, 8, 50
    emb = jnp.asarray(rs.randn(V, D), jnp.float32)
    h = jnp.asarray(rs.randn(Bn, Tn, D), jnp.float32)
    labels = jnp.asarray(rs.randint(0, V, (Bn, Tn)), jnp.int32)
    w = np.zeros((Bn, Tn), np.float32)
    w[0, [2, 5, 9]] = 1.0
    w[1, [0, 7, 11]] = 1.0
    w = jnp.asarray(w)
    h_nan = jnp.where(w[..., None] > 0, h, jnp.nan)

    def loss(h, emb, chunk_tokens):
        head = lambda x: jnp.tanh(x @ emb.T / 5.0) * 5.0  # noqa: E731
        return answer_xent(head, h, labels, w, chunk_tokens=chunk_tokens)[0]

    def reference(h, emb):
        logits = jnp.tanh(h @ emb.T / 5.0) * 5.0
        ce = -jax.nn.log_softmax(logits)[jnp.arange(Bn)[:, None], jnp.arange(Tn)[None], labels]
        return jnp.where(w > 0, ce, 0.0).sum()

    ref, (gh_ref, ge_ref) = jax.value_and_grad(reference, (0, 1))(h, emb)
    # 6 positions per chunk: one of the 4 chunks runs
    val, (gh, ge) = jax.jit(jax.value_and_grad(loss, (0, 1)), static_argnums=2)(h_nan, emb, 6)
    assert abs(float(val) - float(ref)) <= 1e-5
    assert np.isfinite(np.asarray(gh)).all() and np.isfinite(np.asarray(ge)).all()
    np.testing.assert_allclose(np.asarray(gh), np.where(np.asarray(w)[..., None] > 0, gh_ref, 0.0), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ge), np.asarray(ge_ref), atol=1e-5)
    # one chunk holding every position (plain path) gives the same on finite inputs
    val1, (gh1, ge1) = jax.jit(jax.value_and_grad(loss, (0, 1)), static_argnums=2)(h, emb, 256)
    assert abs(float(val1) - float(ref)) <= 1e-5
    np.testing.assert_allclose(np.asarray(ge1), np.asarray(ge_ref), atol=1e-5)


def test_default_chunks_skip_non_answer_rows_at_short_texts():
    """With the default chunk budget the train bench's shape (B 4 x T 64) is cut into chunks of
    64 positions over the whole batch, answers first: 150 answers run 3 chunks, never the 4th;
    NaN at every non-answer position leaves loss and gradient finite and exact."""
    from esrt_jax.models.speech_llm import loss_chunk

    assert loss_chunk(1, 4 * 64) == 64 and loss_chunk(8, 32 * 256 // 8) == 32 and loss_chunk(1, 16) == 16
    assert loss_chunk(1, 72, 15) == 15  # the memory budget (chunk_tokens // groups) always caps it
    rs = np.random.RandomState(1)
    Bn, Tn, D, V = 4, 64, 8, 50
    emb = jnp.asarray(rs.randn(V, D), jnp.float32)
    h = jnp.asarray(rs.randn(Bn, Tn, D), jnp.float32)
    labels = jnp.asarray(rs.randint(0, V, (Bn, Tn)), jnp.int32)
    w = jnp.asarray((np.arange(Tn)[None] >= np.array([16, 20, 30, 40])[:, None]), jnp.float32)
    head = lambda e, x: x @ e.T  # noqa: E731
    ref = jax.value_and_grad(lambda h, e: (-jax.nn.log_softmax(head(e, h))[
        jnp.arange(Bn)[:, None], jnp.arange(Tn)[None], labels] * w).sum(), (0, 1))(h, emb)
    for groups in (1, 2, 4):
        val, (gh, ge) = jax.jit(jax.value_and_grad(
            lambda h, e: answer_xent(lambda x: head(e, x), h, labels, w, row_groups=groups)[0], (0, 1)))(
            jnp.where(w[..., None] > 0, h, jnp.nan), emb)
        assert abs(float(val) - float(ref[0])) <= 1e-5 * abs(float(ref[0])), groups
        np.testing.assert_allclose(np.asarray(gh), np.asarray(ref[1][0]), atol=1e-5)
        np.testing.assert_allclose(np.asarray(ge), np.asarray(ref[1][1]), atol=1e-4)
