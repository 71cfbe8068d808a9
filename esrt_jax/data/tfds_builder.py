"""Write records as a TFDS `array_record` data set that Grain reads without TensorFlow.

    python -m esrt_jax.data.tfds_builder --src DIR/train.jsonl --src DIR/dev.jsonl --out OUT
        [--embed-audio]

writes `OUT/esrt_records/1.0.0/` (dataset_info.json, features.json and one
`esrt_records-<split>.array_record-*` file per split; the split is the source's file stem or
`--src path:split`). Read it back with `esrt_jax.data.TfdsSource(OUT, split)` (which uses
`tfds.builder_from_directory(...).as_data_source(split)`), or `open_source("OUT:train")`.

Features: id, audio (absolute path), src, tgt, transcription, translation, source (text) and
audio_bytes (the encoded audio file with `--embed-audio`, else empty): embedding makes the data
set self-contained, e.g. for reading from a bucket on a TPU pod. Record order is preserved
(`disable_shuffling`), so the TFDS records equal the source's records one by one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import tensorflow_datasets as tfds

from esrt_jax.data.records import Record, SourceError

__all__ = ["EsrtRecords", "write_tfds"]

NAME = "esrt_records"


class EsrtRecords(tfds.core.GeneratorBasedBuilder):
    """ESRT records (one utterance x target language each); see the module docstring."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Records of esrt_jax.data.records.Record."}

    # TFDS looks for a checksums file next to the builder's code through `importlib_resources`,
    # a package it does not declare; we download nothing, so there is no code path to look in.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return None

    def __init__(self, *, records_by_split: Mapping[str, Iterable[Record]] | None = None,
                 embed_audio: bool = False, **kwargs):
        self._records_by_split = records_by_split or {}
        self._embed_audio = embed_audio
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "id": text, "audio": text, "src": text, "tgt": text, "transcription": text,
                "translation": text, "source": text,
                "audio_bytes": tfds.features.Tensor(shape=(), dtype=np.object_),
            }),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(recs) for split, recs in self._records_by_split.items()}

    def _generate_examples(self, recs: Iterable[Record]):
        for i, r in enumerate(recs):
            data = r.audio_bytes or b""
            if self._embed_audio and not data:
                try:
                    data = Path(r.audio).read_bytes()
                except OSError as e:
                    raise SourceError(f"record {r.id}: cannot embed audio {r.audio}: {e}") from e
            yield i, {"id": r.id, "audio": r.audio, "src": r.src, "tgt": r.tgt,
                      "transcription": r.transcription, "translation": r.translation,
                      "source": r.source, "audio_bytes": data}


def write_tfds(records_by_split: Mapping[str, Iterable[Record]], out_dir: str | os.PathLike,
               embed_audio: bool = False) -> Path:
    """Write the splits; returns the version folder (`out_dir/esrt_records/1.0.0`)."""
    out_dir = Path(out_dir)
    version_dir = out_dir / NAME / str(EsrtRecords.VERSION)
    if version_dir.exists():
        raise SourceError(f"{version_dir} already exists; remove it or choose another --out")
    builder = EsrtRecords(records_by_split=records_by_split, embed_audio=embed_audio,
                          data_dir=str(out_dir), file_format="array_record")
    builder.download_and_prepare(download_dir=str(out_dir / ".tfds_downloads"))
    return version_dir


if __name__ == "__main__":  # the command is esrt_jax.cli.tfds_builder (commands live in the top layer)
    import runpy
    import sys

    # TFDS registers a builder class once per process: the command's import must find this module.
    sys.modules.setdefault("esrt_jax.data.tfds_builder", sys.modules[__name__])

    runpy.run_module("esrt_jax.cli.tfds_builder", run_name="__main__", alter_sys=True)
