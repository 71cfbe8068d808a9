"""CTC alignment pieces: the windowed Q-Former mask, the CTC loss and greedy decode, the head."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from esrt_jax.config import ConfigError
from esrt_jax.models import ctc
from esrt_jax.models.qformer import QFormerConfig, SpeechAdapter, window_mask
from esrt_jax.models.qformer import window_means as window_means_fn
from esrt_jax.models.whisper import WhisperEncoder, WhisperEncoderConfig


def test_window_mask_covers_real_frames_in_order():
    frames = np.array([5, 37, 200])
    T = 220
    real = jnp.arange(T)[None] < jnp.asarray(frames)[:, None]
    m = np.asarray(window_mask(16, real, overlap=0))
    assert m.shape == (3, 16, T)
    assert m.any(-1).all()                       # every query sees at least one frame
    assert not (m & ~np.asarray(real)[:, None]).any()  # never a padding frame
    for b, F in enumerate(frames):
        starts = [np.flatnonzero(row)[0] for row in m[b]]
        assert starts == sorted(starts)              # windows follow time
        if F >= 16:
            assert m[b].any(0)[:F].all()             # together they cover the clip
    wide = np.asarray(window_mask(16, real, overlap=2))
    assert (wide >= m).all() and wide.sum() > m.sum()


def _adapter(window_queries, **kw):
    cfg = QFormerConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                        encoder_hidden_size=16, num_queries=8, llm_dim=24, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attend_padding=False,
                        window_queries=window_queries, **kw)
    return SpeechAdapter(cfg, rngs=nnx.Rngs(0))


def test_window_queries_same_weights_other_mask():
    enc = jax.random.normal(jax.random.key(1), (2, 40, 16))
    frames = jnp.array([40, 24])
    plain, windowed = _adapter(False), _adapter(True)
    nnx.update(windowed, nnx.state(plain))
    a = plain(enc, enc_frames=frames)
    b = windowed(enc, enc_frames=frames)
    assert a.shape == b.shape == (2, 8, 24)
    assert not np.allclose(a, b, atol=1e-3)
    # padding frames are never read: changing them changes nothing
    noisy = enc.at[1, 24:].set(100.0)
    np.testing.assert_allclose(windowed(noisy, enc_frames=frames), b, atol=1e-5)


def test_window_queries_need_real_frames():
    with pytest.raises(ConfigError, match="attend_padding"):
        QFormerConfig(window_queries=True)


def test_window_means_adapter_reads_its_windows_in_order():
    cfg = QFormerConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                        encoder_hidden_size=16, num_queries=8, llm_dim=24, attend_padding=False, window_means=2)
    ad = SpeechAdapter(cfg, rngs=nnx.Rngs(0))
    assert ad.qformer is None and ad.query is None  # no Q-Former weights at all
    enc = jax.random.normal(jax.random.key(1), (2, 40, 16))
    frames = jnp.array([40, 24])
    out = ad(enc, enc_frames=frames)
    assert out.shape == (2, 8, 24)
    # padding frames are never read
    np.testing.assert_allclose(ad(enc.at[1, 24:].set(100.0), enc_frames=frames), out, atol=1e-5)
    # output i reads the i-th window only: a change in the last 3 real frames moves the last output alone
    moved = ad(enc.at[1, 21:24].add(5.0), enc_frames=frames)
    changed = np.abs(np.asarray(moved - out)).max(-1)[1] > 1e-4
    assert changed.tolist() == [False] * 7 + [True]
    # the means of 2 parts per window, side by side
    means = np.asarray(window_means_fn(enc, jnp.arange(40)[None] < frames[:, None], 8, 2))
    np.testing.assert_allclose(means[1, 0], np.concatenate([enc[1, 0:2].mean(0), enc[1, 1:3].mean(0)]),
                               atol=1e-5)
    with pytest.raises(ConfigError, match="attend_padding"):
        QFormerConfig(window_means=2)


def test_ctc_loss_skips_rows_that_cannot_align():
    logits = jnp.zeros((2, 4, 5))
    lab = jnp.array([[1, 2, 0, 0, 0, 0], [1, 1, 1, 2, 3, 4]])  # row 1: 6 labels > 4 frames
    lpad = jnp.array([[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], jnp.float32)
    loss, n = ctc.ctc_loss(logits, jnp.zeros((2, 4)), lab, lpad)
    assert float(n) == 1 and np.isfinite(float(loss)) and float(loss) > 0


def test_greedy_decode_collapses_and_drops_blanks():
    path = np.array([[1, 1, 0, 2, 2, 0, 2, 3]])
    logits = np.eye(5)[path]
    assert ctc.greedy_decode(logits, np.array([8])) == [[1, 2, 2, 3]]
    assert ctc.greedy_decode(logits, np.array([3])) == [[1]]


@pytest.mark.parametrize("kind", ["linear", "tied"])
def test_ctc_head_learns_a_toy_alignment(kind):
    """Frame features carry their unit (one-hot + noise); the head learns to emit the sequence."""
    rng = np.random.default_rng(0)
    U, D, N = 6, 16, 12
    protos = rng.normal(size=(U + 1, D)).astype(np.float32)
    steps = rng.integers(1, U, size=(32, 4))  # no unit twice in a row (a repeat needs a blank)
    labels = (np.cumsum(steps, axis=1) % U) + 1
    x = np.stack([np.repeat(protos[l], 3, axis=0) for l in labels]) + 0.1 * rng.normal(size=(32, N, D))
    head = ctc.CTCHead(ctc.CTCHeadConfig(in_dim=D, units=U, kind=kind), rngs=nnx.Rngs(0))
    table = jnp.asarray(protos[1:]) if kind == "tied" else None
    opt = nnx.Optimizer(head, optax.adam(0.05), wrt=nnx.Param)
    lpad = jnp.zeros(labels.shape)

    @nnx.jit
    def step(h, opt):
        def f(h):
            return ctc.ctc_loss(h(jnp.asarray(x), table), jnp.zeros((32, N)), jnp.asarray(labels), lpad)[0]
        loss, g = nnx.value_and_grad(f)(h)
        opt.update(h, g)
        return loss

    first = float(step(head, opt))
    for _ in range(150):
        last = float(step(head, opt))
    assert last < 0.3 * first
    dec = ctc.greedy_decode(np.asarray(head(jnp.asarray(x), table)), np.full(32, N))
    exact = np.mean([d == list(l) for d, l in zip(dec, labels)])
    assert exact > 0.8, exact


def test_whisper_real_length_window_matches_the_padded_stem():
    cfg = WhisperEncoderConfig(num_mel_bins=8, d_model=16, encoder_layers=1, encoder_attention_heads=2,
                               encoder_ffn_dim=32, max_source_positions=50)
    enc = WhisperEncoder(cfg, rngs=nnx.Rngs(0))
    mel = jax.random.normal(jax.random.key(0), (1, 8, 100))
    short = enc.embed(mel[..., :40])
    assert short.shape == (1, 20, 16)
    # the stem is local: the short window's frames equal the padded window's (but the last,
    # whose conv sees the cut)
    np.testing.assert_allclose(short[:, :19], enc.embed(mel)[:, :19], atol=1e-5)
    assert enc(mel[..., :40]).shape == (1, 20, 16)
    with pytest.raises(ValueError, match="shorter even number"):
        enc.embed(mel[..., :41])


def test_soft_units_keep_the_best_path_in_order_behind_zero_rows():
    path = np.array([[1, 1, 0, 2, 2, 0, 2, 3]])  # best path -> units 1, 2, 2, 3
    logits = 20.0 * jnp.asarray(np.eye(4)[path])
    table = jnp.asarray(np.random.RandomState(0).randn(3, 5), jnp.float32)  # units 1..3 -> rows 0..2
    out = np.asarray(ctc.soft_units(logits, table))[0]
    assert out.shape == (8, 5)
    np.testing.assert_array_equal(out[:4], 0.0)  # 4 frames dropped (a repeat, blanks, a repeat)
    np.testing.assert_allclose(out[4:], np.asarray(table)[[0, 1, 1, 2]], atol=1e-6)
    # a frame's embedding is its posterior mix over the units (the blank's share left out)
    soft = jnp.asarray([[[0.0, 2.0, 1.0, 0.0]]])
    p = np.exp([2.0, 1.0, 0.0]) / np.exp([2.0, 1.0, 0.0]).sum()
    np.testing.assert_allclose(np.asarray(ctc.soft_units(soft, table))[0, 0], p @ np.asarray(table), rtol=1e-5)


def test_speech_llm_with_soft_units_masks_the_dropped_frames():
    """The zero rows of `soft_units` are padding to the LLM: its logits equal those without them."""
    from esrt_jax.models.llm import config_from_hf
    from esrt_jax.models.speech_llm import SpeechLLM, SpeechLLMConfig

    llm_cfg = config_from_hf(dict(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    enc = WhisperEncoderConfig(num_mel_bins=80, d_model=32, encoder_layers=1, encoder_attention_heads=4,
                               encoder_ffn_dim=64, max_source_positions=16)
    ad = QFormerConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                       encoder_hidden_size=32, num_queries=3, llm_dim=32, attend_padding=False,
                       window_queries=True)
    model = SpeechLLM(SpeechLLMConfig(enc, ad, llm_cfg, speech_units=(5, 6, 7), ctc_upsample=2),
                      rngs=nnx.Rngs(0))
    assert model.config.feature_shape("projector") == (6, 32) and model.ctc_head is not None
    rs = np.random.RandomState(1)
    kept = jnp.asarray(rs.randn(1, 4, 32), jnp.float32)
    speech = jnp.concatenate([jnp.zeros((1, 2, 32)), kept], 1)
    tokens, mask = jnp.asarray([[3, 9, 11, 2]]), jnp.ones((1, 4), jnp.int32)
    np.testing.assert_allclose(np.asarray(model.text_logits(speech, tokens, mask)),
                               np.asarray(model.text_logits(kept, tokens, mask)), atol=1e-5)
    # the whole path: Q-Former outputs -> CTC head -> soft units on the LLM's token embeddings
    emb = model.project(jnp.asarray(rs.randn(2, 3, 32), jnp.float32))
    assert emb.shape == (2, 6, 32) and bool(jnp.all(jnp.isfinite(emb)))
