"""The one record type every data source produces, and the sources.

A `Record` is one utterance paired with one target language:

    id             unique id of the (utterance, target) pair
    audio          absolute path of the audio file (or, when `audio_bytes` carries the encoded
                   file, the name it had where it came from)
    src, tgt       ISO 639-3 codes as written in the data (`zho` stays `zho`)
    transcription  what is said, in `src`
    translation    the reference translation into `tgt` ("" for ASR-only data)
    source         name of the data set the record came from (e.g. `fleurs`)
    audio_bytes    the encoded audio file when the data set embeds it (HF datasets, TFDS with
                   `embed_audio`); not part of equality, so the same data stored by path or by
                   bytes gives equal records

Sources (all random access: `len(src)`, `src[i] -> Record`, `src.index()`); `open_source(spec)`
picks the kind from the table `SOURCE_KINDS`:

(a) `JsonlSource`: one JSON object a line, either the ESRT/MSRT schema
    `{id, audio, src, tgt, asr, s2tt, source}` (extra keys ignored) or LLM-SRT's
    `{audio, source, prompt, gt[, key]}` where `prompt` is `<|src|><|tgt|>` (or just `<|src|>`
    for ASR-only data), `gt` is `transcription<|src|><|tgt|>translation` and `source` is
    `{dataset}_{src}_{tgt}` or a free name. `audio` is relative to the JSONL's folder unless
    absolute. This is how the public LLM-SRT code reads its data (`srt_dataset.py`: languages
    from the `source`/`prompt`, the ASR target is `gt.split(prompt)[0]`, the translation what
    follows the tags); where a line has no `key` its id is `<file stem>:<line number>`.
(b) `HFSource`: a Hugging Face `datasets` folder written by `save_to_disk` (a Dataset or one
    split of a DatasetDict) or parquet file(s) with an audio column (`{"bytes", "path"}` as
    `datasets.Audio` stores it, or a plain path string). The audio column is never decoded by
    `datasets` (no torchcodec): we cast it to `Audio(decode=False)` and decode with soundfile.
(c) `TfdsSource`: a TFDS `array_record` data set written by `esrt_jax.data.tfds_builder`, read
    with `tfds.builder_from_directory(...).as_data_source(split)` (no TensorFlow needed).

A JSONL manifest is read by ONE reader, `read_jsonl`, for training (`JsonlSource`), eval
(`eval.decode.read_items`) and inference (`infer.batch.utterances`): one `JsonlLine` per non-blank
line, with its `path:line`, the parsed object and its `Record`, or what is wrong with it. Malformed
lines (not UTF-8, bad JSON, missing keys, an LLM-SRT `gt` without its tags) are not fatal there:
`JsonlSource` keeps them in `load_errors` as `(where, reason)` and the pipeline counts them
against the bad-record budget (`strict=True` raises instead); eval reports them by line and skips
them; inference stops with the first one (`path:line: what`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import soundfile as sf

from esrt_jax import audio as audio_lib
from esrt_jax import languages

log = logging.getLogger(__name__)

__all__ = [
    "Record",
    "JSON_KEYS",
    "RecordIndex",
    "RecordSource",
    "ListSource",
    "JsonlSource",
    "HFSource",
    "TfdsSource",
    "ConcatSource",
    "SourceError",
    "SourceKind",
    "SOURCE_KINDS",
    "open_source",
    "record_from_json",
    "JsonlLine",
    "read_jsonl",
    "load_audio_of",
]


JSON_KEYS = {"transcription": "asr", "translation": "s2tt"}  # the two texts' keys in the ESRT JSONL


class SourceError(ValueError):
    """A data source that cannot be read at all (missing file, unknown layout, bad line)."""


@dataclasses.dataclass(frozen=True)
class Record:
    id: str
    audio: str
    src: str
    tgt: str
    transcription: str
    translation: str
    source: str
    audio_bytes: bytes | None = dataclasses.field(default=None, compare=False, repr=False)

    def to_json(self, relative_to: str | os.PathLike | None = None) -> dict:
        """The ESRT JSONL form (`asr`, `s2tt`); `audio` relative to `relative_to` if given."""
        audio = self.audio
        if relative_to is not None:
            audio = os.path.relpath(audio, os.fspath(relative_to))
        return {"id": self.id, "audio": audio, "src": self.src, "tgt": self.tgt,
                JSON_KEYS["transcription"]: self.transcription, JSON_KEYS["translation"]: self.translation,
                "source": self.source}


@dataclasses.dataclass(frozen=True)
class RecordIndex:
    """Per-record metadata the mixture needs without reading audio: arrays of length N.

    `audio_key` identifies the utterance (ASR de-duplicates records that share it).
    """

    src: np.ndarray
    tgt: np.ndarray
    audio_key: np.ndarray

    def __len__(self) -> int:
        return len(self.src)


def load_audio_of(record: Record, sr: int = 16000) -> np.ndarray:
    """Decode a record's audio to mono float32 at `sr`: (T,). Raises `audio.AudioError`."""
    if record.audio_bytes:
        try:
            data, file_sr = sf.read(io.BytesIO(record.audio_bytes), dtype="float32", always_2d=True)
        except Exception as e:
            raise audio_lib.AudioError(
                f"{record.audio}: cannot decode embedded audio ({type(e).__name__}: {e})") from e
        return audio_lib.prepare_audio(data, file_sr, source=record.audio, sr=sr)
    return audio_lib.load_audio(record.audio, sr=sr)


class RecordSource:
    """Random-access collection of records. Subclasses define `__len__` and `__getitem__`."""

    name: str = "records"
    load_errors: list[tuple[str, str]] = []

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, i: int) -> Record:  # pragma: no cover - abstract
        raise NotImplementedError

    def __iter__(self) -> Iterator[Record]:
        for i in range(len(self)):
            yield self[i]

    def index(self) -> RecordIndex:
        """Metadata of every record (default: reads every record once)."""
        recs = list(self)
        return RecordIndex(
            src=np.array([r.src for r in recs], dtype=object),
            tgt=np.array([r.tgt for r in recs], dtype=object),
            audio_key=np.array([r.audio for r in recs], dtype=object),
        )


class ListSource(RecordSource):
    """Records held in memory."""

    def __init__(self, records: Sequence[Record], name: str = "records",
                 load_errors: Sequence[tuple[str, str]] = ()):
        self.records = list(records)
        self.name = name
        self.load_errors = list(load_errors)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Record:
        return self.records[i]


# ----------------------------------------------------------------------------- JSONL

_TAG = re.compile(r"<\|([A-Za-z0-9_-]+)\|>")


def _resolve(audio: str, base: str) -> str:
    if not isinstance(audio, str) or not audio:
        raise KeyError("audio")
    return os.path.normpath(audio if os.path.isabs(audio) else os.path.join(base, audio))


def record_from_json(obj: Mapping[str, Any], base_dir: str, default_id: str, *, references: bool = True
                     ) -> Record:
    """One JSONL object (either schema) -> Record. Raises ValueError/KeyError naming the problem.
    `references=False` (inference input): an ESRT line may lack `asr` (the transcription is then "")."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "prompt" in obj and "gt" in obj and "src" not in obj:
        # LLM-SRT lines may also carry `asr` (an ASR hypothesis for its cascaded SMT mode);
        # the reference transcription is the part of `gt` before the tags.
        return _record_from_llm_srt(obj, base_dir, default_id)
    t_key, s_key = JSON_KEYS["transcription"], JSON_KEYS["translation"]  # "asr", "s2tt"
    missing = [k for k in ("audio", "src", "tgt") + ((t_key,) if references else ()) if k not in obj]
    if missing:
        raise KeyError(f"missing key(s) {', '.join(missing)} (ESRT schema needs id, audio, src, "
                       f"tgt, {t_key}, {s_key}, source; LLM-SRT schema needs audio, source, prompt, gt)")
    for k in ("src", "tgt", t_key):
        if k in obj and not isinstance(obj[k], str):
            raise ValueError(f"{k} must be a string, got {obj[k]!r}")
    translation = obj.get(s_key, "")
    if translation is None:
        translation = ""
    if not isinstance(translation, str):
        raise ValueError(f"{s_key} must be a string, got {translation!r}")
    return Record(
        id=str(obj.get("id", default_id)),
        audio=_resolve(obj["audio"], base_dir),
        src=obj["src"].strip(), tgt=obj["tgt"].strip(),
        transcription=obj.get(t_key, ""), translation=translation,
        source=str(obj.get("source", "")),
    )


def _record_from_llm_srt(obj: Mapping[str, Any], base_dir: str, default_id: str) -> Record:
    prompt, gt = obj["prompt"], obj["gt"]
    if not isinstance(prompt, str) or not isinstance(gt, str):
        raise ValueError("prompt and gt must be strings")
    tags = _TAG.findall(prompt)
    if not tags or len(tags) > 2 or "".join(languages.tag_text(t) for t in tags) != prompt.strip():
        raise ValueError(f"prompt {prompt!r} is not <|src|><|tgt|> or <|src|>")
    src = tags[0]
    tgt = tags[1] if len(tags) == 2 else src
    source = str(obj.get("source", ""))
    # `source` is `{dataset}_{src}_{tgt}` in the LLM-SRT release; keep the data set name only.
    parts = source.split("_")
    if len(parts) >= 3 and parts[-2] == src and parts[-1] == tgt:
        source = "_".join(parts[:-2])
    if len(tags) == 2:
        marker = prompt.strip()
        pieces = gt.split(marker)
        if len(pieces) != 2:
            raise ValueError(f"gt does not contain the marker {marker} exactly once")
        transcription, translation = pieces
    else:
        transcription, translation = gt, ""
    return Record(id=str(obj.get("key", default_id)), audio=_resolve(obj["audio"], base_dir),
                  src=src, tgt=tgt, transcription=transcription, translation=translation,
                  source=source)


@dataclasses.dataclass(frozen=True)
class JsonlLine:
    """One non-blank line of a JSONL manifest, as `read_jsonl` yields it: its `Record`, or
    `error` (one line saying what is wrong) and `kind` ("json": not UTF-8 / not JSON; "record":
    JSON that is not a record of either schema)."""

    line: int
    where: str  # "path:line", for messages
    obj: Any  # the parsed JSON value (None when the line is not JSON)
    record: Record | None
    error: str = ""
    kind: str = ""


def read_jsonl(path: str | os.PathLike, *, references: bool = True) -> Iterator[JsonlLine]:
    """The one JSONL manifest reader: a `JsonlLine` per non-blank line, in file order (lines split
    at `\\n` only). SourceError if the file does not exist. `audio` resolves against the file's
    folder; a line without an id gets `<file stem>:<line>`. `references`: see `record_from_json`."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: JSONL file does not exist")
    return _jsonl_lines(path, references)


def _jsonl_lines(path: Path, references: bool) -> Iterator[JsonlLine]:
    base = os.path.abspath(path.parent)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield JsonlLine(lineno, where, None, None, f"not UTF-8 ({e.reason} at byte {e.start})", "json")
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield JsonlLine(lineno, where, None, None, f"not valid JSON ({e.msg} at column {e.colno})", "json")
                continue
            try:
                rec = record_from_json(obj, base, f"{path.stem}:{lineno}", references=references)
            except (ValueError, KeyError, TypeError) as e:
                msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
                yield JsonlLine(lineno, where, obj, None, msg, "record")
                continue
            yield JsonlLine(lineno, where, obj, rec)


class JsonlSource(ListSource):
    """ESRT/MSRT or LLM-SRT JSONL (see the module docstring), read by `read_jsonl`."""

    def __init__(self, path: str | os.PathLike, strict: bool = False):
        path = Path(path)
        records, errors = [], []
        for ln in read_jsonl(path):
            if ln.record is not None:
                records.append(ln.record)
            elif strict:
                raise SourceError(f"{ln.where}: {ln.error}")
            else:
                errors.append((ln.where, f"malformed line: {ln.error}"))
        if errors:  # each is logged with its reason when the pipeline counts it
            log.warning("%s: %d malformed line(s) skipped (first: %s: %s)", path, len(errors),
                        *errors[0])
        super().__init__(records, name=str(path), load_errors=errors)


# ----------------------------------------------------------------------------- HF datasets

# Column names we understand, first match wins.
_HF_COLUMNS = {
    "id": ("id", "key"),
    "src": ("src", "src_lang", "source_lang"),
    "tgt": ("tgt", "tgt_lang", "target_lang"),
    "transcription": ("transcription", "asr", "raw_transcription", "sentence", "text"),
    "translation": ("translation", "s2tt", "tgt_text"),
    "source": ("source", "dataset"),
}


class HFSource(RecordSource):
    """A `datasets` folder from `save_to_disk`, or parquet file(s); see the module docstring.

    `columns` overrides the column names ({"transcription": "normalized_text", ...});
    `split` picks a split of a DatasetDict; `audio_column` names the audio column.
    """

    def __init__(self, path: str | os.PathLike, split: str | None = None,
                 columns: Mapping[str, str] | None = None, audio_column: str = "audio",
                 source_name: str | None = None):
        import datasets  # heavy (seconds): imported only for a Hugging Face source

        path = Path(path)
        self.name = str(path)
        self.load_errors = []
        if not path.exists():
            raise SourceError(f"{path}: Hugging Face dataset folder or parquet file does not exist")
        if path.is_file() or (path.is_dir() and any(path.glob("*.parquet"))):
            files = [str(path)] if path.is_file() else sorted(str(p) for p in path.glob("*.parquet"))
            ds = datasets.Dataset.from_parquet(files)
        else:
            try:
                ds = datasets.load_from_disk(str(path))
            except FileNotFoundError as e:
                raise SourceError(f"{path}: not a `save_to_disk` folder or parquet ({e})") from None
            if isinstance(ds, datasets.DatasetDict):
                if split is None:
                    raise SourceError(f"{path}: holds splits {sorted(ds)}; pass split=...")
                if split not in ds:
                    raise SourceError(f"{path}: no split {split!r}; found {sorted(ds)}")
                ds = ds[split]
        if audio_column not in ds.column_names:
            raise SourceError(f"{path}: no audio column {audio_column!r}; columns: {ds.column_names}")
        if isinstance(ds.features.get(audio_column), datasets.Audio):
            ds = ds.cast_column(audio_column, datasets.Audio(decode=False))
        self._cols = {}
        columns = dict(columns or {})
        for field, options in _HF_COLUMNS.items():
            if field in columns:
                if columns[field] not in ds.column_names:
                    raise SourceError(f"{path}: column {columns[field]!r} (for {field}) not in "
                                      f"{ds.column_names}")
                self._cols[field] = columns[field]
                continue
            found = next((c for c in options if c in ds.column_names), None)
            if found is None and field in ("src", "transcription"):
                raise SourceError(f"{path}: no {field} column (tried {', '.join(options)}); "
                                  f"columns: {ds.column_names}")
            self._cols[field] = found
        self._audio = audio_column
        self._ds = ds
        self._base = os.path.abspath(path if path.is_dir() else path.parent)
        self._source_name = source_name if source_name is not None else path.name

    def __len__(self) -> int:
        return len(self._ds)

    def _audio_ref(self, value: Any, i: int) -> tuple[str, bytes | None]:
        if isinstance(value, Mapping):
            data, p = value.get("bytes"), value.get("path")
        else:
            data, p = None, value
        if not p:
            p = f"{self.name}#{i}"
        elif not data and not os.path.isabs(p):
            # A path column: relative to the data set folder. With embedded bytes the path is
            # only the file's original name (`save_to_disk` keeps the basename): keep it as is.
            p = os.path.normpath(os.path.join(self._base, p))
        return p, data

    def __getitem__(self, i: int) -> Record:
        row = self._ds[int(i)]
        get = lambda f, d="": (row[self._cols[f]] if self._cols.get(f) else d)  # noqa: E731
        audio, data = self._audio_ref(row[self._audio], int(i))
        src = get("src")
        tgt = get("tgt") or src
        return Record(id=str(get("id", f"{Path(self.name).name}:{i}")), audio=audio, src=src,
                      tgt=tgt, transcription=get("transcription") or "",
                      translation=get("translation") or "",
                      source=str(get("source", self._source_name)), audio_bytes=data or None)

    def index(self) -> RecordIndex:
        src = np.array(self._ds[self._cols["src"]], dtype=object)
        tgt = (np.array(self._ds[self._cols["tgt"]], dtype=object) if self._cols.get("tgt")
               else src.copy())
        tgt = np.where(tgt == "", src, tgt) if len(tgt) else tgt
        # Only the `path` field of the audio column: embedded bytes are never materialised.
        import pyarrow as pa  # comes with datasets; only for its Arrow files

        col = self._ds.data.column(self._audio)
        if pa.types.is_struct(col.type):  # per chunk, zero-copy field views of the mmap
            raw = [p for ch in col.chunks for p in ch.field("path").to_pylist()]
            has_bytes = [h for ch in col.chunks for h in ch.field("bytes").is_valid().to_pylist()]
        else:
            raw = col.to_pylist()
            has_bytes = [False] * len(raw)
        paths = [self._audio_ref({"path": v, "bytes": b"x" if hb else None}, i)[0]
                 for i, (v, hb) in enumerate(zip(raw, has_bytes))]
        return RecordIndex(src=src, tgt=tgt, audio_key=np.array(paths, dtype=object))


# ----------------------------------------------------------------------------- TFDS


class TfdsSource(RecordSource):
    """A TFDS array_record data set written by `esrt_jax.data.tfds_builder` (one split)."""

    def __init__(self, path: str | os.PathLike, split: str = "train"):
        import tensorflow_datasets as tfds  # heavy (imports TensorFlow): only for a TFDS source

        path = Path(path)
        self.name = f"{path}[{split}]"
        self.load_errors = []
        if not (path / "dataset_info.json").is_file():
            cands = sorted(p.parent for p in path.glob("**/dataset_info.json"))
            if len(cands) != 1:
                raise SourceError(f"{path}: not a TFDS data set folder (no dataset_info.json"
                                  f"{'; candidates: ' + ', '.join(map(str, cands)) if cands else ''})")
            path = cands[0]
        builder = tfds.builder_from_directory(str(path))
        if split not in builder.info.splits:
            raise SourceError(f"{path}: no split {split!r}; found {sorted(builder.info.splits)}")
        self._path, self._split = str(path), split
        self._ds = builder.as_data_source(split=split)

    def __len__(self) -> int:
        return len(self._ds)

    @staticmethod
    def _to_record(ex: Mapping[str, Any]) -> Record:
        s = lambda k: ex[k].decode("utf-8") if isinstance(ex[k], bytes) else str(ex[k])  # noqa: E731
        data = ex.get("audio_bytes")
        return Record(id=s("id"), audio=s("audio"), src=s("src"), tgt=s("tgt"),
                      transcription=s("transcription"), translation=s("translation"),
                      source=s("source"), audio_bytes=bytes(data) if data else None)

    def __getitem__(self, i: int) -> Record:
        return self._to_record(self._ds[int(i)])

    def __getstate__(self):
        return {"path": self._path, "split": self._split, "name": self.name}

    def __setstate__(self, state):
        self.__init__(state["path"], state["split"])


# ----------------------------------------------------------------------------- concat


class ConcatSource(RecordSource):
    """Several sources as one (indices run through them in order)."""

    def __init__(self, sources: Sequence[RecordSource]):
        if not sources:
            raise SourceError("no data sources given")
        self.sources = list(sources)
        self.name = "+".join(s.name for s in self.sources)
        self.load_errors = [e for s in self.sources for e in s.load_errors]
        self._offsets = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, i: int) -> Record:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self._offsets, i, side="right")) - 1
        return self.sources[k][int(i - self._offsets[k])]

    def index(self) -> RecordIndex:
        parts = [s.index() for s in self.sources]
        cat = lambda f: np.concatenate([getattr(p, f) for p in parts]) if parts else np.array([])  # noqa: E731
        return RecordIndex(src=cat("src"), tgt=cat("tgt"), audio_key=cat("audio_key"))


@dataclasses.dataclass(frozen=True)
class SourceKind:
    """One kind of data source `open_source` recognises: `matches(path)` says whether a spec's
    path is one; `open(path, split, strict)` opens it (`split`: the `:split` suffix or None).
    `name` is how error messages call it."""

    name: str
    matches: Callable[[Path], bool]
    open: Callable[[Path, str | None, bool], RecordSource]


def _is_tfds(p: Path) -> bool:
    return p.is_dir() and ((p / "dataset_info.json").is_file() and (p / "features.json").is_file()
                           or any(p.glob("*/*/features.json")) or any(p.glob("*/features.json")))


# The one table of source kinds, tried in order (first match wins). A new kind is a
# `RecordSource` subclass plus one entry here.
SOURCE_KINDS: list[SourceKind] = [
    SourceKind("a .jsonl file", lambda p: p.is_file() and p.suffix in (".jsonl", ".json"),
               lambda p, split, strict: JsonlSource(p, strict=strict)),
    SourceKind("TFDS folder", _is_tfds, lambda p, split, strict: TfdsSource(p, split or "train")),
    SourceKind("datasets folder or parquet file", lambda p: p.is_file() and p.suffix == ".parquet" or p.is_dir(),
               lambda p, split, strict: HFSource(p, split=split)),
]


def open_source(spec: str, strict: bool = False) -> RecordSource:
    """Open a source from a path (`SOURCE_KINDS`): `x.jsonl`, a TFDS folder (`dir` or `dir:split`),
    a `save_to_disk` folder (`dir` or `dir:split`) or parquet file(s)."""
    path, split = spec, None
    if ":" in spec and not os.path.exists(spec):
        path, split = spec.rsplit(":", 1)
    p = Path(path)
    if not p.exists():
        raise SourceError(f"data source {spec!r}: {path} does not exist")
    for kind in SOURCE_KINDS:
        if kind.matches(p):
            return kind.open(p, split, strict)
    raise SourceError(f"data source {spec!r}: not {', '.join(k.name for k in SOURCE_KINDS)}")
