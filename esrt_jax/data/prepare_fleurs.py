"""Turn a local FLEURS copy into many-to-many ESRT JSONL.

    python -m esrt_jax.data.prepare_fleurs --root LOCAL_FLEURS_DIR --langs eng,deu,cmn --out DIR
        [--splits train,dev,test] [--max-per-direction N] [--text raw|normalized] [--seed S]

Input, FLEURS' own layout: one folder per language named by its FLEURS config (`en_us`,
`de_de`, `cmn_hans_cn`, ...; `esrt_jax.languages` maps codes to them), each with
`{train,dev,test}.tsv` and the audio under `audio/{split}/<file name>`, or still packed in
`audio/{split}.tar.gz` (the clips a requested split needs are then extracted next to it, as
they are: no decoding). TSV columns (no header): sentence id, file name, raw transcription,
normalized transcription, characters, number of samples, gender. The sentence id is shared by
all languages: the same sentence read in each of them.

This is the layout of the `google/fleurs` dataset repository on the Hugging Face hub under its
`data/` folder, so a download of the files `hub_patterns(langs, splits)` names is a `--root`:

    huggingface_hub.snapshot_download("google/fleurs", repo_type="dataset", local_dir=D,
                                      allow_patterns=hub_patterns(["nld", "eng"], ["dev"]))
    python -m esrt_jax.data.prepare_fleurs --root D/data --langs nld,eng --splits dev --out OUT

(`datasets.load_dataset("google/fleurs", ...)` needs the repository's loading script, which
`datasets` >= 4 no longer runs; the raw files need neither it nor torchcodec.)

An HF `datasets` copy works too: per language folder the output of
`load_dataset("google/fleurs", "en_us").save_to_disk("ROOT/en_us")` (columns id,
raw_transcription, transcription, audio); embedded audio bytes are written to
`DIR/audio/<config>/<split>/` as they are (no decoding, no torchcodec).

Output: `DIR/{split}.jsonl`, one record per (utterance, target language != source):
`{id, audio, src, tgt, asr, s2tt, source: "fleurs"}` with `asr` the utterance's transcription
and `s2tt` the transcription of the same sentence id in the target language (the first one in
that language's TSV order, any split), `audio` relative to DIR. Utterances whose audio file is
missing, and (utterance, target) pairs whose sentence the target language lacks, are left out
and counted in the summary. `--max-per-direction` keeps a seeded random subset of at most N
records per (src, tgt) and split. Languages asked for but not under `--root` are an error that
lists what was found.
"""

from __future__ import annotations

import csv
import json
import os
import random
import tarfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from esrt_jax import languages
from esrt_jax.data.records import JSON_KEYS

__all__ = ["FleursError", "Utterance", "HUB_REPO", "hub_patterns", "extract_audio", "read_language",
           "prepare"]

SPLITS = ("train", "dev", "test")
HUB_REPO = "google/fleurs"  # a dataset repository on the Hugging Face hub


class FleursError(ValueError):
    """The FLEURS copy is missing languages or files, or a TSV is malformed."""


@dataclass(frozen=True)
class Utterance:
    sentence: str   # FLEURS sentence id (shared across languages)
    file: str       # absolute audio path
    raw: str
    normalized: str
    split: str


def hub_patterns(langs: Sequence[str], splits: Sequence[str]) -> list[str]:
    """The files of `HUB_REPO` that `prepare` reads for these languages (our codes) and splits:
    `data/<config>/<split>.tsv` and `data/<config>/audio/<split>.tar.gz` each, for
    `huggingface_hub.snapshot_download(..., allow_patterns=...)`; the download's `data/`
    folder is then a `--root`."""
    _check_splits(splits)
    out = []
    for c in langs:
        cfg = _language(c).fleurs
        out += [p for s in splits for p in (f"data/{cfg}/{s}.tsv", f"data/{cfg}/audio/{s}.tar.gz")]
    return out


def _check_splits(splits: Sequence[str]) -> None:
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise FleursError(f"unknown split(s) {bad}; FLEURS has {list(SPLITS)}")


def _language(code: str):
    """`languages.get(code)`, its error as a `FleursError`."""
    try:
        return languages.get(code)
    except languages.LanguageError as e:
        raise FleursError(str(e)) from None


def extract_audio(folder: Path, split: str, names: Sequence[str]) -> int:
    """Write the clips `names` (file names from the split's TSV) that are not yet under
    `folder/audio/<split>/` from `folder/audio/<split>.tar.gz`, bytes as they are. Members are
    matched by base name (FLEURS' archives hold `<split>/<name>`), so nothing lands outside that
    folder; reading stops once every name is found. Returns the number written (0 without an
    archive); an unreadable archive is a `FleursError` naming it."""
    archive = folder / "audio" / f"{split}.tar.gz"
    dest = folder / "audio" / split
    todo = {n for n in names if n and os.path.basename(n) == n and not (dest / n).is_file()}
    if not todo or not archive.is_file():
        return 0
    written = 0
    try:
        with tarfile.open(archive, "r:*") as tf:
            for m in tf:  # sequential: a .tar.gz has no index
                name = os.path.basename(m.name)
                if not m.isfile() or name not in todo:
                    continue
                data = tf.extractfile(m).read()
                dest.mkdir(parents=True, exist_ok=True)
                part = dest / (name + ".part")
                part.write_bytes(data)
                part.replace(dest / name)  # a killed run leaves no half-written clip
                todo.discard(name)
                written += 1
                if not todo:
                    break
    except (tarfile.TarError, EOFError, OSError) as e:
        raise FleursError(f"{archive}: cannot read the archive ({e})") from None
    return written


def _language_dirs(root: Path) -> dict[str, Path]:
    """Our code -> folder for every FLEURS language folder under root that we know."""
    found = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            found[languages.from_fleurs(d.name).code] = d
        except languages.LanguageError:
            continue
    return found


def _is_hf_copy(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file()


def read_language_hf(folder: Path, splits: Sequence[str], extract_to: Path) -> list[Utterance]:
    """Utterances of an HF `datasets` FLEURS copy (`load_dataset("google/fleurs", cfg)`
    then `save_to_disk(folder)`): columns id, raw_transcription, transcription, audio.
    Embedded audio is written out as files under `extract_to/<split>/` (decoded by nobody:
    the bytes are copied as they are)."""
    import datasets  # heavy (seconds): only this command needs it

    dd = datasets.load_from_disk(str(folder))
    out = []
    for split in splits:
        if split not in dd:
            continue
        ds = dd[split]
        need = {"id", "raw_transcription", "transcription", "audio"}
        if not need <= set(ds.column_names):
            raise FleursError(f"{folder}[{split}]: FLEURS columns {sorted(need)} expected, got "
                              f"{ds.column_names}")
        if isinstance(ds.features["audio"], datasets.Audio):
            ds = ds.cast_column("audio", datasets.Audio(decode=False))
        for i, row in enumerate(ds):
            a = row["audio"] or {}
            data, p = (a.get("bytes"), a.get("path")) if isinstance(a, dict) else (None, a)
            if data:
                name = Path(p).name if p else f"{i}.wav"
                dest = (extract_to / split / name).absolute()
                if not dest.is_file() or dest.read_bytes() != data:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(data)
                file = str(dest)
            else:
                file = str(Path(p).absolute()) if p else ""
            out.append(Utterance(sentence=str(row["id"]), file=file,
                                 raw=str(row["raw_transcription"]).strip(),
                                 normalized=str(row["transcription"]).strip(), split=split))
    return out


def read_language(folder: Path, splits: Sequence[str], extract_to: Path | None = None
                  ) -> list[Utterance]:
    """All utterances of one FLEURS language folder (TSV layout or an HF copy), in order."""
    if _is_hf_copy(folder):
        if extract_to is None:
            raise FleursError(f"{folder}: an HF datasets copy needs a folder to extract audio to")
        return read_language_hf(folder, splits, extract_to)
    out = []
    for split in splits:
        tsv = folder / f"{split}.tsv"
        if not tsv.is_file():
            continue
        with open(tsv, encoding="utf-8", newline="") as f:
            for lineno, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
                if not row or not "".join(row).strip():
                    continue
                if len(row) < 4:
                    raise FleursError(f"{tsv}:{lineno}: expected >= 4 tab-separated columns "
                                      f"(id, file name, raw, normalized, ...), got {len(row)}")
                sid, name, raw, norm = (c.strip() for c in row[:4])
                out.append(Utterance(sentence=sid, file=str((folder / "audio" / split / name)
                                                           .absolute()),
                                     raw=raw, normalized=norm, split=split))
    return out


def prepare(root: str | os.PathLike, langs: Sequence[str], out: str | os.PathLike,
            splits: Sequence[str] = SPLITS, max_per_direction: int = 0, text: str = "raw",
            seed: int = 0) -> dict:
    """Write `out/{split}.jsonl`; returns a summary dict (counts per split, skips)."""
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise FleursError(f"--root {root} is not a folder")
    if text not in ("raw", "normalized"):
        raise FleursError(f"--text must be raw or normalized, got {text!r}")
    _check_splits(splits)
    codes = []
    for c in langs:
        _language(c)
        codes.append(c.strip().lower())  # the spelling asked for (zho stays zho)
    if len(set(codes)) < 2:
        raise FleursError(f"need at least two languages, got {list(langs)}")
    found = _language_dirs(root)
    missing = [c for c in codes if languages.normalize(c) not in found]
    if missing:
        have = ", ".join(f"{c} ({found[c].name})" for c in sorted(found)) or "none"
        raise FleursError(
            f"language(s) {', '.join(missing)} not found under {root} (expected folders "
            f"{', '.join(languages.get(c).fleurs for c in missing)}); found: {have}")
    utts = {c: read_language(found[languages.normalize(c)], SPLITS,
                             extract_to=out / "audio" / found[languages.normalize(c)].name)
            for c in codes}
    for c, u in utts.items():
        if not u:
            raise FleursError(f"{found[languages.normalize(c)]}: no {'/'.join(SPLITS)}.tsv rows")
    summary = {"splits": {}, "extracted": 0, "missing_audio": 0, "missing_translation": 0,
               "examples": []}
    for c in codes:  # clips still packed in audio/<split>.tar.gz (the hub's layout)
        folder = found[languages.normalize(c)]
        if not _is_hf_copy(folder):
            for split in splits:
                summary["extracted"] += extract_audio(
                    folder, split, [Path(x.file).name for x in utts[c] if x.split == split])
    field = "raw" if text == "raw" else "normalized"
    # sentence id -> text, per language: the first utterance of that sentence (any split).
    sentence_text = {c: {} for c in codes}
    for c, u in utts.items():
        for x in u:
            t = getattr(x, field)
            if t and x.sentence not in sentence_text[c]:
                sentence_text[c][x.sentence] = t
    out.mkdir(parents=True, exist_ok=True)
    base = os.path.abspath(out)
    for split in splits:
        by_dir: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for s in codes:
            for x in (x for x in utts[s] if x.split == split):
                if not os.path.isfile(x.file):
                    summary["missing_audio"] += 1
                    if len(summary["examples"]) < 5:
                        summary["examples"].append(f"missing audio {x.file}")
                    continue
                src_text = getattr(x, field)
                stem = Path(x.file).stem
                for t in codes:
                    if t == s:
                        continue
                    tr = sentence_text[t].get(x.sentence)
                    if tr is None:
                        summary["missing_translation"] += 1
                        continue
                    by_dir[(s, t)].append({
                        "id": f"fleurs_{split}_{s}_{x.sentence}_{stem}_{t}",
                        "audio": os.path.relpath(x.file, base), "src": s, "tgt": t,
                        JSON_KEYS["transcription"]: src_text, JSON_KEYS["translation"]: tr,
                        "source": "fleurs"})
        lines = []
        for (s, t) in sorted(by_dir, key=lambda d: (codes.index(d[0]), codes.index(d[1]))):
            recs = by_dir[(s, t)]
            if max_per_direction and len(recs) > max_per_direction:
                keep = sorted(random.Random(f"{seed}/{split}/{s}/{t}").sample(
                    range(len(recs)), max_per_direction))
                recs = [recs[i] for i in keep]
            lines += recs
        with open(out / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for r in lines:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        summary["splits"][split] = len(lines)
    return summary


if __name__ == "__main__":  # the command is esrt_jax.cli.prepare_fleurs (commands live in the top layer)
    import runpy

    runpy.run_module("esrt_jax.cli.prepare_fleurs", run_name="__main__", alter_sys=True)
