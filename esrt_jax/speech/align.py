"""The align stage (`python train.py --stage=align`): the adapter learns the speech without the LLM.

The speech adapter (a Q-Former, best with `window_queries`: outputs in time order) and a small CTC
head over its projector outputs are trained with CTC against the transcript's characters, on the
frozen encoder's output (the feature cache, or the encoder run on the mel). The LLM is never
built into this stage's bundle: an align step costs the adapter only (~50x cheaper per example
than a speech-LLM step), and the asr stage starts from the aligned adapter (the CTC head is
dropped there). Run config:

    model:  align: {upsample: 2}            # CTC frames per speech vector (characters > Q)
    stages: align: {train: {steps: N}}      # present -> `--stage=all` runs align first

Units: the characters of the training transcripts after Whisper's text normaliser (`char_units`,
`data.pipeline.ctc_text`),
recomputed from the sources (deterministic), so a resumed run gets the same head.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from esrt_jax.config import check, setting
from esrt_jax.data.pipeline import ctc_text
from esrt_jax.metrics import asr_error, distinct_share
from esrt_jax.models import ctc
from esrt_jax.models.qformer import SpeechAdapter
from esrt_jax.models.speech_llm import batch_mel
from esrt_jax.models.whisper import WhisperEncoder
from esrt_jax.pytree import merge_trees, swap_partners, swap_rows

TRAINABLE = ("^adapter/", "^ctc_head/")
SPEECH_KEYS = ("mel", "audio", "enc", "enc_frames")


@dataclasses.dataclass(frozen=True)
class AlignConfig:
    """The run config's `model.align` block."""
    upsample: int = setting(2, help="CTC frames per adapter output (characters outnumber the queries)")

    def __post_init__(self):
        check(self.upsample >= 1, "model.align.upsample", f"must be >= 1, got {self.upsample}")


def char_units(texts: Iterable[str]) -> tuple[str, ...]:
    """The sorted characters of the normalised texts: the CTC label units (unit 0 is the blank)."""
    units = sorted({ch for t in texts for ch in ctc_text(t)})
    if not units:
        raise ValueError("no characters in the training transcripts: the align stage needs ASR records")
    return tuple(units)


class AlignModel(nnx.Module):
    """Encoder (None when batches carry cached encoder output) + adapter + CTC head.

    Param paths `adapter/...` equal the speech LLM's, so the asr stage restores them directly."""

    def __init__(self, encoder: WhisperEncoder | None, adapter: SpeechAdapter, cfg: AlignConfig,
                 units: int, *, rngs: nnx.Rngs):
        self.encoder, self.adapter = encoder, adapter
        self.ctc_head = ctc.CTCHead(ctc.CTCHeadConfig(in_dim=adapter.config.llm_dim, units=units,
                                                      upsample=cfg.upsample), rngs=rngs)

    def logits(self, batch: dict, *, rngs=None) -> jax.Array:
        """batch {enc | mel | audio, enc_frames} -> CTC logits (B, Q * upsample, units + 1)."""
        if "enc" in batch:
            enc = batch["enc"]
        else:
            e = self.encoder.config
            enc = self.encoder(batch_mel(batch, e.num_mel_bins, e.num_frames))
        a = self.adapter
        q = a.qformer_features(enc.astype(jnp.float32), enc_frames=batch["enc_frames"],
                               deterministic=rngs is None, rngs=rngs)
        return self.ctc_head(a.head(q))  # the projector, before pooling: one vector per query


def loss(model: AlignModel, batch: dict, rng) -> tuple[jax.Array, dict]:
    """Mean CTC loss per character; aux: label units and aligned examples (rows whose labels fit)."""
    logits = model.logits(batch, rngs=rng)
    value, aligned = ctc.ctc_loss(logits, jnp.zeros(logits.shape[:2]), batch["ctc_labels"],
                                  batch["ctc_paddings"])
    return value, {"tokens": jnp.sum(1.0 - batch["ctc_paddings"]), "examples": aligned}


def decoder(graphdef, state_template, units: Sequence[str], dev_batches: Callable[[int], tuple[dict, list[str]]]):
    """decode_fn(trainable, frozen, n) -> {'cer', 'wer', 'cer_swapped', 'cer_gain', 'distinct',
    'samples'}: greedy CTC decodes of the first n dev clips, and the same with each clip's speech
    taken from another clip's (`pytree.swap_partners`; the listening check: a head that ignores the
    audio gains nothing)."""
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), state_template)

    @jax.jit
    def run(state, batch):
        return nnx.merge(graphdef, state).logits(batch)

    def text(ids):
        return "".join(units[i - 1] for i in ids)

    def decode(trainable, frozen, n):
        st = jax.tree.map(lambda x: x, template)
        nnx.replace_by_pure_dict(st, merge_trees(trainable, frozen))
        batch, refs = dev_batches(n)  # rows == refs

        def hyps(b):
            logits = np.asarray(run(st, b))
            return [text(d) for d in ctc.greedy_decode(logits, np.full(len(logits), logits.shape[1]))]

        out = hyps(batch)
        swapped = hyps(swap_rows(batch, SPEECH_KEYS, swap_partners([ctc_text(r) for r in refs])))
        cer, cer_sw = asr_error(refs, out, "cer"), asr_error(refs, swapped, "cer")
        return {"cer": cer, "wer": asr_error(refs, out, "wer"), "cer_swapped": cer_sw, "cer_gain": cer_sw - cer,
                "distinct": distinct_share(len(set(out)), len(set(refs))),
                "samples": [f"align ref: {ctc_text(r)}\n      hyp: {h}" for r, h in zip(refs, out)]}

    return decode
