"""`Translator`: the one inference front door (CLI, cloud service, eval, dev decodes).

Edge half: `encode(mel (B, n_mels, 3000)) -> features` (numpy, per split point).
Cloud half: `decode(features, src, tgt, task)` builds the task prompts, left-pads them to a
bucket length, pads the batch to a bucket size, and runs embedding + generation in ONE jitted
call, so a warm translator never recompiles for prompts or batches within its buckets.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from esrt_jax.audio import real_window
from esrt_jax.config import ConfigError
from esrt_jax.data.tasks import DEFAULT_TASK, TaskTokenizer, bucket_for, get_task
from esrt_jax.infer import generate as gen
from esrt_jax.models.speech_llm import SpeechLLM


@partial(jax.jit, static_argnames=("graphdef", "split"))
def _encode(graphdef, state, mel, split, frames=None):
    return nnx.merge(graphdef, state).encode(mel, split=split, enc_frames=frames)


@partial(jax.jit, static_argnames=("graphdef", "split"))
def _adapt(graphdef, state, enc, split, frames=None):
    return nnx.merge(graphdef, state).adapt(enc, split=split, enc_frames=frames)


@partial(jax.jit, static_argnames=("graphdef", "split", "cfg"))
def _decode(graphdef, state, feats, tokens, mask, split, cfg: gen.GenerateConfig):
    model = nnx.merge(graphdef, state)
    embeds, full_mask = model.llm_inputs(model.speech_embeds(feats, split), tokens, mask, left_pad=True)
    if cfg.num_beams == 1:
        return gen.greedy(model.llm, embeds, full_mask, cfg)
    return gen.beam_search(model.llm, embeds, full_mask, cfg)[0]


def _pow2_bucket(n: int, cap: int) -> int:
    b = 1
    while b < n:
        b *= 2
    return min(max(b, 1), max(cap, n))


def encode_batch(graphdef, state, mel: np.ndarray, split: str, max_batch: int, *,
                 from_encoder: bool = False, enc_frames: np.ndarray | None = None,
                 window: str = "padded") -> np.ndarray:
    """The edge computation: (B, n_mels, frames) -> features (B, *feature_shape) float32, the
    batch padded to a power-of-2 bucket so that a warm model never recompiles. Shared by
    `Translator.encode` and the edge client (`esrt_jax.edge.EdgeModel`, encoder + adapter only).
    `from_encoder`: the input is already the encoder output (B, P, d_model) (the feature cache).
    `enc_frames` (B,): real encoder frames per row (`audio.encoder_frames`), needed by an adapter
    with attend_padding false (the callers that know the audio's length pass it).
    `window` "real" (`SpeechLLMConfig.encoder_window`): each row's mel is cut to its own
    `audio.real_window` before the encoder (rows of one window run together; needs enc_frames), so
    a clip's features never depend on its batch."""
    x = np.asarray(mel, np.float32)
    f = None if enc_frames is None else np.asarray(enc_frames, np.int32)
    if f is not None and f.shape != x.shape[:1]:
        raise ValueError(f"enc_frames holds {f.size} length(s) for {x.shape[0]} clip(s): give one real "
                         f"encoder frame count per clip (shape (B,))")
    if window == "real" and not from_encoder:
        if f is None:
            raise ValueError("this model's encoder reads real-length windows (model.encoder_window: real) "
                             "and needs each clip's real frames (enc_frames)")
        wins = np.array([real_window([n], x.shape[-1]) for n in f])
        out = None
        for w in sorted(set(wins.tolist())):
            rows = np.flatnonzero(wins == w)
            part = encode_batch(graphdef, state, x[rows, :, :w], split, max_batch, enc_frames=f[rows])
            out = np.zeros((len(x), *part.shape[1:]), np.float32) if out is None else out
            out[rows] = part
        return out
    B = x.shape[0]
    Bp = _pow2_bucket(B, max_batch)
    if Bp != B:
        x = np.concatenate([x, np.zeros((Bp - B,) + x.shape[1:], np.float32)])
        f = None if f is None else np.concatenate([f, np.ones(Bp - B, np.int32)])
    out = (_adapt if from_encoder else _encode)(graphdef, state, jnp.asarray(x), split,
                                                None if f is None else jnp.asarray(f))
    return np.asarray(jax.device_get(out), np.float32)[:B]


class Translator:
    """Wraps a `SpeechLLM` + tokenizer for batched, bucketed, jitted inference."""

    def __init__(self, model: SpeechLLM, tokenizer, *, gen_cfg: gen.GenerateConfig | None = None,
                 prompt_buckets: Sequence[int] = (16, 32, 64, 128, 256), max_batch: int = 64,
                 add_bos: bool | None = None, split: str | None = None):
        self.task_tok = TaskTokenizer(tokenizer, add_bos=add_bos)
        self.tokenizer = tokenizer
        self.gen_cfg = gen_cfg or gen.GenerateConfig(eos_ids=(self.task_tok.eos_id,),
                                                     pad_id=self.task_tok.pad_id)
        self.prompt_buckets = tuple(sorted(prompt_buckets))
        self.max_batch = max_batch
        self.config = model.config
        self.split = split or model.config.split
        self.graphdef, self.state = nnx.split(model)

    @property
    def feature_shape(self) -> tuple[int, int]:
        return self.config.feature_shape(self.split)

    def batch_buckets(self) -> tuple[int, ...]:
        """Every padded batch size `decode` can run (1..max_batch map onto these)."""
        return tuple(sorted({_pow2_bucket(n, self.max_batch) for n in range(1, self.max_batch + 1)}))

    def warm(self, batch_size: int, pairs: Sequence[tuple[str, str]], task: str = DEFAULT_TASK) -> int:
        """Compile the decode of `batch_size` rows for each prompt bucket the (src, tgt) `pairs`
        reach, by decoding zero features once -> how many prompt buckets were compiled."""
        by_bucket: dict[int, tuple[str, str]] = {}
        for s, t in pairs:
            P = bucket_for(len(self.task_tok.prompt_ids(task, s, t, "")), self.prompt_buckets)
            by_bucket.setdefault(P, (s, t))
        feats = np.zeros((batch_size, *self.feature_shape), np.float32)
        for s, t in by_bucket.values():
            self.generate_ids(feats, [s] * batch_size, [t] * batch_size, task)
        return len(by_bucket)

    # -- edge -----------------------------------------------------------------------------
    def encode(self, mel: np.ndarray, enc_frames: np.ndarray | None = None) -> np.ndarray:
        """(B, n_mels, 3000) -> features (B, *feature_shape) float32 (batch padded to a bucket);
        enc_frames (B,): see `encode_batch`."""
        return encode_batch(self.graphdef, self.state, mel, self.split, self.max_batch, enc_frames=enc_frames,
                            window=self.config.encoder_window)

    def adapt(self, enc: np.ndarray, enc_frames: np.ndarray | None = None) -> np.ndarray:
        """Cached encoder output (B, P, d_model) -> features, as `encode` without the encoder."""
        return encode_batch(self.graphdef, self.state, enc, self.split, self.max_batch, from_encoder=True,
                            enc_frames=enc_frames)

    # -- cloud ----------------------------------------------------------------------------
    def prompts(self, src: Sequence[str], tgt: Sequence[str], task: str = DEFAULT_TASK,
                transcriptions: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded prompt ids (B, P) and mask, P the smallest fitting bucket."""
        ids = [self.task_tok.prompt_ids(task, s, t, (transcriptions or [""] * len(src))[i])
               for i, (s, t) in enumerate(zip(src, tgt))]
        try:
            P = bucket_for(max(len(x) for x in ids), self.prompt_buckets)
        except ValueError as e:
            raise ConfigError(f"prompt too long: {e}; add a larger bucket to model.infer.prompt_buckets") from None
        tokens = np.full((len(ids), P), self.task_tok.pad_id, np.int32)
        mask = np.zeros((len(ids), P), bool)
        for i, x in enumerate(ids):
            if x:
                tokens[i, P - len(x):], mask[i, P - len(x):] = x, True
        return tokens, mask

    def generate_ids(self, features: np.ndarray, src: Sequence[str], tgt: Sequence[str],
                     task: str = DEFAULT_TASK, transcriptions: Sequence[str] | None = None,
                     gen_cfg: gen.GenerateConfig | None = None) -> list[list[int]]:
        """Token ids per row, cut at EOS."""
        cfg = gen_cfg or self.gen_cfg
        feats = np.asarray(features, np.float32)
        B = feats.shape[0]
        if feats.shape[1:] != self.feature_shape:
            raise ValueError(f"features of shape {feats.shape[1:]} do not match the model's "
                             f"{self.feature_shape} for split {self.split!r}")
        tokens, mask = self.prompts(src, tgt, task, transcriptions)
        Bp = _pow2_bucket(B, self.max_batch)
        if Bp != B:  # pad rows: a copy of row 0, results dropped
            idx = np.r_[np.arange(B), np.zeros(Bp - B, int)]
            feats, tokens, mask = feats[idx], tokens[idx], mask[idx]
        out = _decode(self.graphdef, self.state, jnp.asarray(feats), jnp.asarray(tokens),
                      jnp.asarray(mask), self.split, cfg)
        return gen.trim(out, cfg)[:B]

    def decode(self, features: np.ndarray, src: Sequence[str], tgt: Sequence[str], task: str = DEFAULT_TASK,
               transcriptions: Sequence[str] | None = None,
               gen_cfg: gen.GenerateConfig | None = None) -> list[dict]:
        """Features -> [{"response", "transcription", "translation"}] per row (the output parsed by `Task.parse`:
        SRT's split at the marker)."""
        ids = self.generate_ids(features, src, tgt, task, transcriptions, gen_cfg)
        parse = get_task(task).parse
        out = []
        for row, s, t in zip(ids, src, tgt):
            text = self.task_tok.answer_text(row)
            p = parse(text, s, t)
            out.append({"response": text, **p})
        return out

    def translate(self, mel: np.ndarray, src: Sequence[str], tgt: Sequence[str], *,
                  enc_frames: np.ndarray | None = None, **kw) -> list[dict]:
        """Both halves in one process: mel -> results."""
        return self.decode(self.encode(mel, enc_frames), src, tgt, **kw)
