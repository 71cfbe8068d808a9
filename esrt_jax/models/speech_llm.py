"""The ESRT / LLM-SRT speech LLM: Whisper encoder (frozen) -> Q-Former adapter -> decoder LLM.

Two halves with a narrow interface:

- edge: `encode(mel (B, n_mels, 3000)) -> features`; with split "projector" (ESRT) these are the
  speech embeddings (B, Q', llm_dim); with split "qformer" the Q-Former outputs (B, Q, H) and the
  projector runs in the cloud (`speech_embeds(features, split)`).
- cloud: the LLM consumes `[speech embeddings][text tokens]`.

LLM input layout (docs/design.md): `[speech (Q')][bos?][prompt][answer][eos][pad]` for training
(right padding) and `[pad][speech (Q')][bos?][prompt]` for decoding (left padding). Padding is
masked and rotary positions count only real positions, so padding never shifts positions.
Prompt tokens are embedded with `llm.embed` (Gemma's sqrt(d) scale included); speech embeddings
enter unscaled, as the reference passes them through `inputs_embeds`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from esrt_jax.audio import log_mel_spectrogram_jax
from esrt_jax.config import check, setting, to_dict
from esrt_jax.models import ctc
from esrt_jax.models.layers import dtype_from_name
from esrt_jax.models.llm import CausalLM, LLMConfig, LoraConfig, positions_from_mask
from esrt_jax.models.qformer import QFormerConfig, SpeechAdapter
from esrt_jax.models.whisper import WhisperEncoder, WhisperEncoderConfig

Split = Literal["qformer", "projector"]


@dataclasses.dataclass(frozen=True)
class SpeechLLMConfig:
    """Shapes of the three parts plus the LLM's runtime settings."""

    encoder: WhisperEncoderConfig = setting(help="the Whisper encoder")
    adapter: QFormerConfig = setting(help="the Q-Former + projector")
    llm: LLMConfig = setting(help="the decoder LLM")
    lora: LoraConfig | None = setting(None, help="LoRA on the LLM (null: none)")
    llm_dtype: str = setting("float32", help="LLM compute dtype")
    llm_param_dtype: str = setting("float32", help="LLM parameter dtype")
    scan_layers: bool = setting(True, help="scan over the LLM's stacked layers")
    remat: bool = setting(False, help="rematerialise LLM layers in the backward pass")
    split: Split = setting("projector", help="edge/cloud split point: after the qformer or the projector")
    encoder_window: str = setting("padded", help="'padded': the encoder reads Whisper's 30 s window (LLM-SRT); "
                                                 "'real': each clip's mel cut to its own length, rounded up "
                                                 "to 1 s (needs adapter.attend_padding false)")
    speech_units: tuple[int, ...] = setting((), help="LLM token ids of the align stage's CTC units; non-empty: "
                                                     "the speech reaches the LLM as CTC unit posteriors times "
                                                     "the LLM's embeddings of those tokens (model.interface "
                                                     "ctc_chars)")
    ctc_upsample: int = setting(2, help="CTC frames per adapter output (with speech_units)")

    def __post_init__(self):
        self.validate()

    def validate(self):
        check(self.adapter.encoder_hidden_size == self.encoder.d_model, "adapter.encoder_hidden_size",
              f"{self.adapter.encoder_hidden_size} does not match the Whisper encoder's d_model "
              f"{self.encoder.d_model}")
        check(self.adapter.llm_dim == self.llm.hidden_size, "adapter.llm_dim",
              f"{self.adapter.llm_dim} does not match the LLM's hidden_size {self.llm.hidden_size}")
        check(self.split in ("qformer", "projector"), "split", f"unknown split point {self.split!r}")
        check(self.encoder_window in ("padded", "real"), "encoder_window",
              f"{self.encoder_window!r} is not 'padded' or 'real'")
        check(self.encoder_window == "padded" or not self.adapter.attend_padding, "encoder_window",
              "a 'real' window has no 30 s padding to attend to: set adapter.attend_padding: false too")
        check(not self.speech_units or self.adapter.pool_k is None, "speech_units",
              "CTC unit posteriors are read off every adapter output: set adapter.pool_k: null")

    @property
    def num_speech_tokens(self) -> int:
        if self.speech_units:
            return self.adapter.num_queries * self.ctc_upsample
        return self.adapter.num_output_tokens

    def feature_shape(self, split: Split | None = None) -> tuple[int, int]:
        """Per-utterance shape of what the edge sends for `split`."""
        if (split or self.split) == "qformer":
            return (self.adapter.num_queries, self.adapter.hidden_size)
        return (self.num_speech_tokens, self.adapter.llm_dim)


class SpeechLLM(nnx.Module):
    """encoder / adapter / llm submodules; see the module docstring for the two halves."""

    def __init__(self, cfg: SpeechLLMConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.encoder = WhisperEncoder(cfg.encoder, rngs=rngs)
        self.adapter = SpeechAdapter(cfg.adapter, rngs=rngs)
        self.llm = CausalLM(cfg.llm, lora=cfg.lora, dtype=dtype_from_name(cfg.llm_dtype),
                            param_dtype=dtype_from_name(cfg.llm_param_dtype),
                            scan_layers=cfg.scan_layers, remat=cfg.remat, rngs=rngs)
        # the align stage's CTC head (same param paths: the asr stage restores it)
        self.ctc_head = (ctc.CTCHead(ctc.CTCHeadConfig(in_dim=cfg.adapter.llm_dim, units=len(cfg.speech_units),
                                                       upsample=cfg.ctc_upsample), rngs=rngs)
                         if cfg.speech_units else None)

    @classmethod
    def from_parts(cls, cfg: SpeechLLMConfig, encoder: WhisperEncoder, adapter: SpeechAdapter,
                   llm: CausalLM) -> "SpeechLLM":
        """Assemble from already loaded parts (e.g. converted HF checkpoints) without random init."""
        model = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
        model.encoder, model.adapter, model.llm = encoder, adapter, llm
        if cfg.speech_units:  # in no pretrained checkpoint: initialised here, trained by the align stage
            model.ctc_head = ctc.CTCHead(model.ctc_head.config, rngs=nnx.Rngs(0))
        return model

    # -- edge -----------------------------------------------------------------------------
    def encode(self, mel: jax.Array, *, split: Split | None = None, enc_frames: jax.Array | None = None,
               deterministic: bool = True, rngs: Any = None) -> jax.Array:
        """mel (B, n_mels, 3000) -> (B, Q', llm_dim) ("projector") or (B, Q, H) ("qformer").
        enc_frames (B,): real encoder frames, needed by an adapter with attend_padding false."""
        return self.adapt(self.encoder(mel), split=split, enc_frames=enc_frames,
                          deterministic=deterministic, rngs=rngs)

    def adapt(self, enc: jax.Array, *, split: Split | None = None, enc_frames: jax.Array | None = None,
              deterministic: bool = True, rngs: Any = None) -> jax.Array:
        """Encoder output (B, P, d_model) (e.g. from the feature cache; with attend_padding false
        P may be a prefix covering every example's enc_frames) -> what `encode` returns."""
        # No stop_gradient: gradients reach the encoder only when train.trainable names it (the
        # demo's random encoder); a frozen encoder is never differentiated, so costs nothing.
        enc = enc.astype(dtype_from_name(self.encoder.config.dtype))
        feats = self.adapter.qformer_features(enc, enc_frames=enc_frames, deterministic=deterministic,
                                              rngs=rngs)
        if (split or self.config.split) == "qformer":
            return feats
        return self.project(feats)

    def project(self, feats: jax.Array) -> jax.Array:
        """Q-Former outputs (B, Q, H) -> speech embeddings (B, Q', llm_dim): the projector, or with
        `speech_units` the CTC head's soft units (B, Q * u, llm_dim; `ctc.soft_units`)."""
        if not self.config.speech_units:
            return self.adapter.project(feats)
        units = self.llm.embed(jnp.asarray(self.config.speech_units, jnp.int32)[None])[0]
        return ctc.soft_units(self.ctc_head(self.adapter.head(feats)), units)

    def speech_embeds(self, features: jax.Array, split: Split | None = None) -> jax.Array:
        """Edge features -> speech embeddings (B, Q', llm_dim) (runs the projector if needed)."""
        if (split or self.config.split) == "qformer":
            return self.project(features.astype(self.llm.dtype))
        return features.astype(self.llm.dtype)

    # -- cloud ----------------------------------------------------------------------------
    def llm_inputs(self, speech: jax.Array, tokens: jax.Array, text_mask: jax.Array, *,
                   left_pad: bool = False) -> tuple[jax.Array, jax.Array]:
        """speech (B, Q', D), tokens (B, T), text_mask (B, T) -> embeds (B, Q'+T, D), mask (B, Q'+T).

        `left_pad` moves every padding position to the front (stable), giving the decoding layout
        `[pad][speech][prompt]`: sliding-window attention counts slots, so padding must not sit
        between the speech and the prompt.
        """
        B, Q = speech.shape[:2]
        embeds = jnp.concatenate([speech.astype(self.llm.dtype), self.llm.embed(tokens)], axis=1)
        # soft units: the frames CTC drops are zero rows (`ctc.soft_units`)
        speech_mask = jnp.any(speech != 0, -1) if self.config.speech_units else jnp.ones((B, Q), bool)
        mask = jnp.concatenate([speech_mask, text_mask.astype(bool)], axis=1)
        if left_pad:
            order = jnp.argsort(mask, axis=1, stable=True)
            embeds = jnp.take_along_axis(embeds, order[..., None], axis=1)
            mask = jnp.take_along_axis(mask, order, axis=1)
        return embeds, mask

    def text_logits(self, speech: jax.Array, tokens: jax.Array, text_mask: jax.Array, *,
                    dropout_rng: jax.Array | None = None) -> jax.Array:
        """Logits predicting each text token: (B, T, V) where [:, t] predicts tokens[:, t]."""
        return self.llm.head(self.text_hidden(speech, tokens, text_mask, dropout_rng=dropout_rng))

    def text_hidden(self, speech: jax.Array, tokens: jax.Array, text_mask: jax.Array, *,
                    dropout_rng: jax.Array | None = None) -> jax.Array:
        """Last-layer hidden states (pre-norm) predicting each text token: (B, T, D);
        `self.llm.head` of [:, t] gives the logits for tokens[:, t]."""
        Q = speech.shape[1]
        embeds, mask = self.llm_inputs(speech, tokens, text_mask)
        h, _ = self.llm(embeds, positions_from_mask(mask), mask, dropout_rng=dropout_rng, hidden_only=True)
        return h[:, Q - 1:Q - 1 + tokens.shape[1]]


class EdgeHalf(nnx.Module):
    """Only the edge's parts of a `SpeechLLM` (encoder + adapter): no LLM weights on the device.

    `encode` (and the `adapt` and `project` it calls) are `SpeechLLM`'s own, so edge features are
    computed by the same code as the one-process path.
    """

    encode = SpeechLLM.encode
    adapt = SpeechLLM.adapt
    project = SpeechLLM.project

    def __init__(self, config: SpeechLLMConfig, encoder: WhisperEncoder, adapter: SpeechAdapter):
        self.config, self.encoder, self.adapter = config, encoder, adapter


def batch_mel(batch: dict, n_mels: int, num_frames: int = 3000) -> jax.Array:
    """Host mel (`mel`) or on-device mel from raw 30 s audio (`audio`), cut to the encoder's
    first `num_frames` frames (as the edge front end does for encoders shorter than 30 s)."""
    if "mel" in batch:
        return batch["mel"][..., :num_frames]
    return log_mel_spectrogram_jax(batch["audio"], n_mels)[..., :num_frames]


LOSS_CHUNK_TOKENS = 256  # at most this many LM-head rows (positions) per chunk of the answer-only loss
# Within that cap, chunks are at most 1/LOSS_MIN_CHUNKS of the positions, so that the loop stops
# close to the last answer (the head runs on few non-answer positions), unless that leaves fewer
# than LOSS_MIN_ROWS rows (smaller matmuls would stream the head's weights once per few rows).
LOSS_MIN_CHUNKS = 4
LOSS_MIN_ROWS = 64


def loss_chunk(groups: int, n: int, chunk_tokens: int = LOSS_CHUNK_TOKENS) -> int:
    """Positions per group in one chunk of `answer_xent` for `groups` groups of `n` positions."""
    budget = max(1, chunk_tokens // groups)  # the memory cap: always respected
    return max(1, min(n, budget, max(-(-LOSS_MIN_ROWS // groups), -(-n // LOSS_MIN_CHUNKS))))


def answer_xent(head: Callable[[jax.Array], jax.Array], h: jax.Array, labels: jax.Array,
                weights: jax.Array, *, chunk_tokens: int = LOSS_CHUNK_TOKENS,
                row_groups: int = 1) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy summed over the weighted (answer) positions only, without materialising
    (B, T, V) logits.

    head: (..., D) -> (..., V) f32 logits (may close over traced params); h (B, T, D) hidden
    states; labels, weights (B, T). -> (sum of weight * ce, sum of weight * [argmax == label]),
    both f32 scalars.

    The B rows are split into G = gcd(B, row_groups) groups of consecutive rows (give the
    number of batch shards, so that each device keeps its own rows; 1 = the whole batch). Each
    group's B/G * T positions with nonzero weight are moved to its front (stable), and the head +
    cross-entropy run over chunks of c positions per group (`loss_chunk`: at most
    chunk_tokens // G; within that, a quarter of the group's positions or LOSS_MIN_ROWS rows,
    whichever is more) only until the group with the most answers is covered: a `while_loop`
    with a data-dependent trip count, so the head runs on answer positions (plus the last
    chunk's remainder and, with several groups, the shorter groups' tail) and prompt and
    padding positions cost nothing. The derivative is
    hand-written (`jax.custom_vjp`, as in fused linear-cross-entropy kernels): the forward pass
    computes each chunk's logits once, its softmax gradient and, through the head's VJP, the
    gradient of h; the backward pass only scales it. That is two head matmuls per answer row
    instead of three (forward, rematerialised forward, backward) per text row. Gradients of the
    head's own params (a trainable head) are computed by a second loop in the backward pass,
    which XLA removes when they are unused (frozen head). Peak: one (G, c, V) f32 chunk. When one
    chunk holds all positions the head simply runs on all of them (XLA already computes that
    with two head matmuls).
    """
    B, T, D = h.shape
    G = math.gcd(B, max(1, row_groups))
    N = B // G * T
    h, labels = h.reshape(G, N, D), labels.reshape(G, N)
    w = weights.astype(jnp.float32).reshape(G, N)
    c = loss_chunk(G, N, chunk_tokens)
    n = -(-N // c)
    if n == 1:  # one chunk holds every position: nothing to skip, plain autodiff is as cheap
        logits = head(h)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        hit = jax.lax.stop_gradient((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
        return (ce * w).sum(), (hit * w).sum()
    # answer positions first in each group (a differentiable gather; its transpose scatters back)
    order = jnp.argsort(w == 0, axis=1, stable=True)
    h = jnp.take_along_axis(h, order[..., None], axis=1)
    labels = jnp.take_along_axis(labels, order, axis=1)
    w = jnp.take_along_axis(w, order, axis=1)
    # non-answer positions a chunk still covers: zero inputs (whatever they held), zero weight
    h = jnp.where(w[..., None] != 0, h, jnp.zeros((), h.dtype))
    pad = n * c - N
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        labels = jnp.pad(labels, ((0, 0), (0, pad)))
        w = jnp.pad(w, ((0, 0), (0, pad)))
    # The head as an explicit function of its (hoisted) params, as custom_vjp requires.
    fn, consts = jax.closure_convert(head, h[:, :c])
    ce, hit = _chunked_xent(fn, c, consts, h, labels, w)
    return ce, jax.lax.stop_gradient(hit)


def _chunk_count(w: jax.Array, c: int) -> jax.Array:
    """Chunks of c positions that cover every group's (front-moved) weighted positions."""
    return (jnp.max(jnp.sum(w != 0, axis=1)) + c - 1) // c


def _chunk(x: jax.Array, i: jax.Array, c: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, i * c, c, axis=1)


def _chunk_stats(fn, consts, hc, lc, wc):
    """One chunk: (ce sum, hit sum, d(ce sum)/d logits (B, c, V), head VJP)."""
    out, vjp = jax.vjp(fn, hc, *consts)
    logits = out.astype(jnp.float32)
    top = jax.lax.stop_gradient(jnp.max(logits, -1, keepdims=True))
    e = jnp.exp(logits - top)  # one exp over the vocabulary, for both the loss and its gradient
    total = e.sum(-1)
    ce = jnp.log(total) + top[..., 0] - jnp.take_along_axis(logits, lc[..., None], -1)[..., 0]
    hit = (jnp.argmax(logits, -1) == lc).astype(jnp.float32)
    # softmax - one_hot(label), times the weight
    g = e * (wc / total)[..., None]
    g = jnp.where(jnp.arange(logits.shape[-1]) == lc[..., None], g - wc[..., None], g)
    return (ce * wc).sum(), (hit * wc).sum(), g.astype(out.dtype), vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked_xent(fn, c, consts, h, labels, w):
    def body(i, acc):
        ce, hit, _, _ = _chunk_stats(fn, consts, _chunk(h, i, c), _chunk(labels, i, c), _chunk(w, i, c))
        return acc[0] + ce, acc[1] + hit
    zero = jnp.zeros((), jnp.float32)
    return jax.lax.fori_loop(0, _chunk_count(w, c), body, (zero, zero))


def _chunked_xent_fwd(fn, c, consts, h, labels, w):
    def body(i, acc):
        ce, hit, dh = acc
        s_ce, s_hit, g, vjp = _chunk_stats(fn, consts, _chunk(h, i, c), _chunk(labels, i, c), _chunk(w, i, c))
        dh = jax.lax.dynamic_update_slice_in_dim(dh, vjp(g)[0].astype(dh.dtype), i * c, axis=1)
        return ce + s_ce, hit + s_hit, dh
    zero = jnp.zeros((), jnp.float32)
    ce, hit, dh = jax.lax.fori_loop(0, _chunk_count(w, c), body, (zero, zero, jnp.zeros_like(h)))
    return (ce, hit), (consts, h, labels, w, dh)


def _chunked_xent_bwd(fn, c, res, ct):
    consts, h, labels, w, dh = res
    g_ce = ct[0]  # the hit count is not differentiable

    def body(i, acc):
        _, _, g, vjp = _chunk_stats(fn, consts, _chunk(h, i, c), _chunk(labels, i, c), _chunk(w, i, c))
        return jax.tree.map(jnp.add, acc, vjp(g)[1:])
    # the head's param gradients; dead code (removed by XLA) when the head is frozen
    d_consts = jax.lax.fori_loop(0, _chunk_count(w, c), body,
                                 tuple(jnp.zeros_like(x) for x in consts))
    d_consts = [(d * g_ce).astype(x.dtype) for d, x in zip(d_consts, consts)]
    return (d_consts, (dh * g_ce).astype(h.dtype), None, None)


_chunked_xent.defvjp(_chunked_xent_fwd, _chunked_xent_bwd)


def loss_fn(model: SpeechLLM, batch: dict, *, dropout_rng: jax.Array | None = None,
            full_logits: bool = False, chunk_tokens: int = LOSS_CHUNK_TOKENS,
            row_groups: int = 1) -> tuple[jax.Array, dict]:
    """Mean next-token cross-entropy over answer+eos tokens (f32) and token accuracy.

    batch: mel (B, n_mels, 3000), audio (B, 480000) or cached encoder output enc (B, P, d_model),
    tokens/loss_mask/attention_mask (B, T); enc_frames (B,) real encoder frames (used by an
    adapter with attend_padding false, which needs it); optional input_tokens (B, T): the tokens fed to the
    LLM when they differ from the targets (token dropout, see esrt_jax.speech.build).
    The LM head runs only on the answer positions, in chunks (`answer_xent`; `row_groups`: the
    number of batch shards, so that each keeps its rows); `full_logits`
    computes the (B, T, V) logits at once instead (the reference the chunked loss is tested
    against, and the baseline of bench/bench_train.py).
    """
    train = dropout_rng is not None
    rngs = None
    if train:
        dropout_rng, adapter_rng = jax.random.split(dropout_rng)
        rngs = nnx.Rngs(dropout=adapter_rng)
    frames = batch.get("enc_frames")
    if "enc" in batch:  # the feature cache: the frozen encoder does not run
        speech = model.adapt(batch["enc"], split="projector", enc_frames=frames,
                             deterministic=not train, rngs=rngs)
    else:
        enc = model.config.encoder
        speech = model.encode(batch_mel(batch, enc.num_mel_bins, enc.num_frames), split="projector",
                              enc_frames=frames, deterministic=not train, rngs=rngs)
    inputs = batch.get("input_tokens", batch["tokens"])
    w = batch["loss_mask"].astype(jnp.float32)
    n = jnp.maximum(w.sum(), 1.0)
    if full_logits:
        logits = model.text_logits(speech, inputs, batch["attention_mask"], dropout_rng=dropout_rng)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["tokens"])
        ce_sum = (ce * w).sum()
        hits = ((jnp.argmax(logits, -1) == batch["tokens"]) * w).sum()
    else:
        h = model.text_hidden(speech, inputs, batch["attention_mask"], dropout_rng=dropout_rng)
        ce_sum, hits = answer_xent(model.llm.head, h, batch["tokens"], w, chunk_tokens=chunk_tokens,
                                   row_groups=row_groups)
    loss = ce_sum / n
    return loss, {"loss": loss, "accuracy": hits / n, "tokens": w.sum()}


def fingerprint(cfg: SpeechLLMConfig, params: Any = None) -> str:
    """Short id of the model an edge payload is for: config (+ adapter weights when given)."""
    h = hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode())
    if params is not None:
        for leaf in jax.tree.leaves(params):
            h.update(np.asarray(jax.device_get(leaf)).tobytes())
    return h.hexdigest()[:16]
