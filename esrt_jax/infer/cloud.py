"""The cloud half as a service backend.

`CloudBackend(translator, fingerprint)` implements `esrt_jax.serve.Backend`: it tells the service
which payloads it accepts (model fingerprint, split point, per-utterance feature shape) and decodes
a batch of features with the `Translator` (bucketed, jitted; SRT output split into transcription
and translation). `esrt_jax.speech.load.translator_for(loaded)` builds that `Translator` from a
restored model with the run config's generation settings.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from flax import nnx

from esrt_jax import languages as L
from esrt_jax.data.tasks import DEFAULT_TASK
from esrt_jax.infer.translator import Translator
from esrt_jax.models.speech_llm import SpeechLLM, fingerprint as config_fingerprint

def model_fingerprint(model: SpeechLLM) -> str:
    """Id of the (config, trained adapter weights) pair a payload belongs to.

    The adapter (Q-Former + projector) is what training changes on the edge side, and both ends
    hold it, so edge and cloud compute the same id from the same checkpoint.
    """
    return config_fingerprint(model.config, nnx.state(model.adapter, nnx.Param))


class CloudBackend:
    """`serve.Backend` over a `Translator`: (B, *feature_shape) features -> [(transcription, translation)]."""

    def __init__(self, translator: Translator, fingerprint: str, task: str = DEFAULT_TASK,
                 languages: Sequence[str] | None = None):
        self.translator = translator
        self.fingerprint = fingerprint
        self.task = task
        self.split = translator.split
        self.feature_shape = tuple(translator.feature_shape)
        self.languages = tuple(languages) if languages else None

    def warmup_batches(self) -> tuple[int, ...]:
        return self.translator.batch_buckets()

    def warm(self, batch_size: int) -> None:
        codes = self.languages or tuple(L.ESRT_LANGS)
        self.translator.warm(batch_size, [(s, t) for s in codes for t in codes if s != t] or
                             [(codes[0], codes[0])], self.task)

    def decode_batch(self, features: np.ndarray, src: Sequence[str], tgt: Sequence[str]
                     ) -> list[tuple[str, str]]:
        feats = np.asarray(features, np.float32)
        if feats.ndim != 1 + len(self.feature_shape) or feats.shape[1:] != self.feature_shape:
            raise ValueError(f"features of shape {feats.shape} do not match (B, {self.feature_shape})")
        outs: list[tuple[str, str]] = []
        step = self.translator.max_batch  # a burst larger than the biggest batch bucket is split
        for i in range(0, len(feats), step):
            res = self.translator.decode(feats[i:i + step], list(src[i:i + step]),
                                         list(tgt[i:i + step]), task=self.task)
            outs += [(r["transcription"], r["translation"]) for r in res]
        return outs
