"""Batched greedy and beam-search decoding, fully jitted, over a pre-allocated KV cache.

Both decoders start from `inputs_embeds (B, P, D)` + `attention_mask (B, P)` (the speech
embeddings and the prompt, see `speech_llm.py`) and run inside one `jax.lax.while_loop`, so a
batch costs one compile per (B, P, config) shape; callers pad P to a few bucket lengths.

Semantics follow `transformers.generate` for decoder-only models fed `inputs_embeds` (as the
LLM-SRT reference does): the "generated sequence" seen by the logits processors is only the new
tokens, `no_repeat_ngram_size` bans n-grams inside it, `min_new_tokens` masks EOS, greedy pads
finished rows with `pad_id`, and beam search is HF's vectorised beam search (early_stopping=True,
length penalty on the generated length, 2 * num_beams candidates kept per step).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from esrt_jax.config import check, setting
from esrt_jax.models.llm import positions_from_mask

NEG_INF = -1.0e9


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """Decoding settings (defaults as LLM-SRT's inference: beam 1 greedy, no-repeat 5-grams)."""

    max_new_tokens: int = setting(300, help="longest answer generated")
    num_beams: int = setting(1, help="beam width (1: greedy)")
    length_penalty: float = setting(1.0, help="beam score = log-prob / length ** this")
    no_repeat_ngram_size: int = setting(5, help="ban repeated n-grams of this size (0: off)")
    min_new_tokens: int = setting(0, help="EOS is banned before this many tokens")
    eos_ids: tuple[int, ...] = setting((), help="token ids that end an answer")
    pad_id: int = setting(0, help="token id of padding")

    def validate(self):
        check(self.max_new_tokens > 0, "max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        check(self.num_beams >= 1, "num_beams", f"must be >= 1, got {self.num_beams}")
        check(self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size", "must be >= 0")
        check(0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens",
              f"must be in [0, max_new_tokens], got {self.min_new_tokens}")
        check(len(self.eos_ids) > 0, "eos_ids", "at least one EOS token id is required")


def banned_ngram_mask(seq: jax.Array, t: jax.Array, n: int, vocab: int) -> jax.Array:
    """Tokens that would repeat an n-gram of `seq[:, :t]`: (N, M) int32 -> (N, vocab) bool.

    Mirrors HF's NoRepeatNGramLogitsProcessor: the last n-1 tokens are looked up among all
    complete n-grams of the generated prefix; applies once t >= n - 1.
    """
    N, M = seq.shape
    if n <= 0 or M < n:
        return jnp.zeros((N, vocab), bool)
    starts = jnp.arange(M - n + 1)
    if n > 1:
        prefix = jax.lax.dynamic_slice_in_dim(seq, jnp.maximum(t - n + 1, 0), n - 1, axis=1)  # (N, n-1)
        windows = seq[:, starts[:, None] + jnp.arange(n - 1)[None, :]]  # (N, W, n-1)
        match = jnp.all(windows == prefix[:, None, :], axis=-1)
    else:
        match = jnp.ones((N, starts.shape[0]), bool)
    match = match & (starts <= t - n)[None, :] & (t >= n - 1)
    nxt = seq[:, starts + n - 1]  # (N, W)
    rows = jnp.broadcast_to(jnp.arange(N)[:, None], nxt.shape)
    return jnp.zeros((N, vocab), bool).at[rows, nxt].max(match)


def _process(scores: jax.Array, seq: jax.Array, t: jax.Array, cfg: GenerateConfig) -> jax.Array:
    """Apply no-repeat-ngram and min-length processors to (N, V) scores."""
    if cfg.no_repeat_ngram_size:
        banned = banned_ngram_mask(seq, t, cfg.no_repeat_ngram_size, scores.shape[-1])
        scores = jnp.where(banned, -jnp.inf, scores)
    if cfg.min_new_tokens:
        eos = jnp.zeros(scores.shape[-1], bool).at[jnp.array(cfg.eos_ids)].set(True)
        scores = jnp.where(eos[None] & (t < cfg.min_new_tokens), -jnp.inf, scores)
    return scores


def reorder_cache(cache: dict, idx: jax.Array) -> dict:
    """Gather cache rows: k/v (L, N, S, KV, Dh) on axis 1, mask (N, S) on axis 0; index shared."""
    return {"k": cache["k"][:, idx], "v": cache["v"][:, idx], "mask": cache["mask"][idx],
            "index": cache["index"]}


def _is_eos(tok: jax.Array, cfg: GenerateConfig) -> jax.Array:
    return jnp.isin(tok, jnp.array(cfg.eos_ids, dtype=tok.dtype))


def _prefill(model, inputs_embeds, attention_mask, max_new_tokens):
    """Run the prompt through the model into a fresh cache; returns last logits, cache, next position."""
    B, P, _ = inputs_embeds.shape
    cache = model.init_cache(B, P + max_new_tokens, inputs_embeds.dtype)
    logits, cache = model(inputs_embeds, positions_from_mask(attention_mask), attention_mask, cache=cache,
                          last_logits_only=True)
    next_pos = jnp.sum(attention_mask, axis=-1).astype(jnp.int32)  # (B,)
    return logits[:, -1].astype(jnp.float32), cache, next_pos


def _step(model, tokens, pos, cache):
    """Feed one token per row: tokens (N,), pos (N,) -> logits (N, V), cache."""
    emb = model.embed(tokens[:, None])
    logits, cache = model(emb, pos[:, None], jnp.ones_like(tokens, bool)[:, None], cache=cache)
    return logits[:, 0].astype(jnp.float32), cache


def greedy(model, inputs_embeds: jax.Array, attention_mask: jax.Array, cfg: GenerateConfig) -> jax.Array:
    """Greedy decoding. (B, P, D), (B, P) -> tokens (B, max_new_tokens), `pad_id` after EOS."""
    B = inputs_embeds.shape[0]
    M = cfg.max_new_tokens
    logits, cache, pos = _prefill(model, inputs_embeds, attention_mask, M)
    seq = jnp.full((B, M), cfg.pad_id, jnp.int32)

    def pick(t, seq, done, logits):
        tok = jnp.argmax(_process(logits, seq, t, cfg), axis=-1).astype(jnp.int32)
        tok = jnp.where(done, cfg.pad_id, tok)
        seq = jax.lax.dynamic_update_slice_in_dim(seq, tok[:, None], t, axis=1)
        return tok, seq, done | _is_eos(tok, cfg)

    tok, seq, done = pick(jnp.int32(0), seq, jnp.zeros((B,), bool), logits)

    def cond(state):
        t, _, _, done, *_ = state
        return (t < M) & ~jnp.all(done)

    def body(state):  # feed the previous token, then pick the next: no forward is wasted
        t, tok, seq, done, pos, cache = state
        logits, cache = _step(model, tok, pos, cache)
        tok, seq, done = pick(t, seq, done, logits)
        return t + 1, tok, seq, done, pos + 1, cache

    state = (jnp.int32(1), tok, seq, done, pos, cache)
    return jax.lax.while_loop(cond, body, state)[2]


def beam_search(model, inputs_embeds: jax.Array, attention_mask: jax.Array, cfg: GenerateConfig
                ) -> tuple[jax.Array, jax.Array]:
    """HF-equivalent beam search. Returns best sequences (B, M) and their scores (B,)."""
    B = inputs_embeds.shape[0]
    K, M = cfg.num_beams, cfg.max_new_tokens
    keep = max(2, 1 + len(cfg.eos_ids)) * K
    reorder = reorder_cache
    logits, cache, pos = _prefill(model, inputs_embeds, attention_mask, M)
    # Expand every row to K beams (HF expands the inputs; the prefill is identical per beam).
    rep = jnp.repeat(jnp.arange(B), K)
    logits, cache, pos = logits[rep], reorder(cache, rep), pos[rep]
    V = logits.shape[-1]

    state = dict(
        t=jnp.int32(0),
        run_seq=jnp.full((B, K, M), cfg.pad_id, jnp.int32),
        run_score=jnp.zeros((B, K)).at[:, 1:].set(NEG_INF),
        seq=jnp.full((B, K, M), cfg.pad_id, jnp.int32),
        score=jnp.full((B, K), NEG_INF),
        finished=jnp.zeros((B, K), bool),
        open_=jnp.ones((B, 1), bool),  # HF: is_early_stop_heuristic_unsatisfied
        hits=jnp.zeros((B, keep), bool),
        logits=logits, pos=pos, cache=cache,
    )
    top_mask = jnp.arange(keep) < K

    def gather(x, idx):  # x (B, K', ...), idx (B, K'') -> (B, K'', ...)
        return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

    def cond(s):
        more = jnp.any(s["open_"]) & ~jnp.all(s["finished"]) & ~jnp.all(s["hits"])
        return (s["t"] < M) & more

    def body(s):
        t = s["t"]
        logp = jax.nn.log_softmax(s["logits"], axis=-1)
        logp = _process(logp, s["run_seq"].reshape(B * K, M), t, cfg)
        logp = logp.reshape(B, K, V) + s["run_score"][:, :, None]
        top_lp, top_idx = jax.lax.top_k(logp.reshape(B, K * V), keep)
        top_beam, top_tok = top_idx // V, (top_idx % V).astype(jnp.int32)
        top_seq = gather(s["run_seq"], top_beam)
        top_seq = jax.lax.dynamic_update_slice_in_dim(top_seq, top_tok[..., None], t, axis=2)
        hits = _is_eos(top_tok, cfg) | (t + 1 >= M)

        # Running beams for the next step: best K candidates that did not stop.
        run_lp = top_lp + hits * NEG_INF
        _, nxt = jax.lax.top_k(run_lp, K)
        run_seq, run_score = gather(top_seq, nxt), gather(run_lp, nxt)
        parent = gather(top_beam, nxt)  # (B, K) index of the previous beam

        # Finished hypotheses: merge the newly stopped top-K candidates, keep the best K.
        just = hits & top_mask[None]
        fin_lp = top_lp / ((t + 1).astype(jnp.float32) ** cfg.length_penalty)
        fin_lp += jnp.all(s["finished"], axis=-1, keepdims=True) * NEG_INF
        fin_lp += (~s["open_"]) * NEG_INF
        fin_lp += (~just) * NEG_INF
        m_seq = jnp.concatenate([s["seq"], top_seq], axis=1)
        m_score = jnp.concatenate([s["score"], fin_lp], axis=1)
        m_fin = jnp.concatenate([s["finished"], just], axis=1)
        _, best = jax.lax.top_k(m_score, K)
        seq, score, finished = gather(m_seq, best), gather(m_score, best), gather(m_fin, best)

        flat_parent = (parent + jnp.arange(B)[:, None] * K).reshape(-1)
        cache = reorder(s["cache"], flat_parent)
        pos = s["pos"][flat_parent]
        tok = jax.lax.dynamic_slice_in_dim(run_seq, t, 1, axis=2).reshape(-1)
        logits, cache = _step(model, tok, pos, cache)

        t1 = t + 1
        best_run = run_score[:, :1] / (t1.astype(jnp.float32) ** cfg.length_penalty)
        worst_fin = jnp.where(finished, jnp.min(score, axis=1, keepdims=True), NEG_INF)
        open_ = s["open_"] & jnp.any(best_run > worst_fin, axis=-1, keepdims=True)
        return dict(t=t1, run_seq=run_seq, run_score=run_score, seq=seq, score=score,
                    finished=finished, open_=open_, hits=hits, logits=logits, pos=pos + 1, cache=cache)

    s = jax.lax.while_loop(cond, body, state)
    return s["seq"][:, 0], s["score"][:, 0]


@partial(jax.jit, static_argnames=("graphdef", "cfg"))
def generate(graphdef: nnx.GraphDef, params: Any, inputs_embeds: jax.Array, attention_mask: jax.Array,
             cfg: GenerateConfig) -> jax.Array:
    """Jitted entry point: LLM (graphdef, params) + (B, P, D) embeds -> tokens (B, max_new_tokens)."""
    model = nnx.merge(graphdef, params)
    if cfg.num_beams == 1:
        return greedy(model, inputs_embeds, attention_mask, cfg)
    return beam_search(model, inputs_embeds, attention_mask, cfg)[0]


def trim(tokens, cfg: GenerateConfig) -> list[list[int]]:
    """Host-side: cut each row at its first EOS (excluded) -> python lists of ids."""
    out = []
    for row in jax.device_get(tokens).tolist():
        cut = next((i for i, tok in enumerate(row) if tok in cfg.eos_ids), len(row))
        out.append(row[:cut])
    return out
