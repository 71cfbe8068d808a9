"""Batch inference on files, both halves or one: the library behind `python -m esrt_jax.infer`.

`utterances` reads --audio files / a JSONL of records; `encode_utterances` (edge half: audio ->
mel -> features), `decode_features` (cloud half: features -> text) and `translate` (both) work on
any object with the `Translator` interface; `write_embeds` / `read_embeds` are the edge-only files
(JSONL of base64 payloads, one raw payload, or .npz of float32 features), every payload checked
against the loaded model on reading.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from esrt_jax import languages
from esrt_jax.audio import mel_from_file
from esrt_jax.data.records import record_from_json
from esrt_jax.infer import payload as pl


class InferError(ValueError):
    """Bad CLI input: names the file / record and the problem."""


@dataclasses.dataclass(frozen=True)
class Utterance:
    id: str
    audio: str
    src: str
    tgt: str
    transcription: str = ""   # references, when the JSONL has them
    translation: str = ""


# ----------------------------------------------------------------------------- inputs


def utterances(audio: Sequence[str] = (), jsonl: str | None = None, src: str | None = None,
               tgt: str | None = None) -> list[Utterance]:
    """--audio files (all with --src/--tgt) and/or a JSONL of records (each with its own src/tgt)."""
    out: list[Utterance] = []
    if audio:
        if not src or not tgt:
            raise InferError("--audio needs --src and --tgt")
        s, t = languages.get(src).code, languages.get(tgt).code
        out += [Utterance(Path(a).stem, str(a), s, t) for a in audio]
    if jsonl:
        path = Path(jsonl)
        if not path.is_file():
            raise InferError(f"{path}: JSONL file does not exist")
        base = os.path.abspath(path.parent)
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if isinstance(obj, dict) and "prompt" not in obj:
                    obj = {"asr": "", **obj}  # inference input needs no reference transcription
                r = record_from_json(obj, base, f"{path.stem}:{n}")
                s, t = languages.get(r.src).code, languages.get(r.tgt).code
            except (ValueError, KeyError, TypeError) as e:
                msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
                raise InferError(f"{path}:{n}: {msg}") from None
            out.append(Utterance(r.id, r.audio, s, t, r.transcription, r.translation))
    if not out:
        raise InferError("nothing to do: give --audio FILE(s) or --jsonl FILE")
    return out


def encode_utterances(translator, utts: Sequence[Utterance], batch_size: int = 8) -> np.ndarray:
    """The edge half for many utterances: audio files -> features (N, *feature_shape) float32."""
    enc = translator.config.encoder
    feats = []
    for i in range(0, len(utts), batch_size):
        mels = np.stack([mel_from_file(u.audio, enc.num_mel_bins, enc.num_frames)[0]
                         for u in utts[i:i + batch_size]])
        feats.append(translator.encode(mels))
    return np.concatenate(feats)


def decode_features(translator, feats: np.ndarray, utts: Sequence[Utterance], batch_size: int = 8,
                    task: str = "srt") -> list[dict]:
    """The cloud half: features (N, ...) -> result dicts, in the order of `utts`."""
    results = []
    for i in range(0, len(utts), batch_size):
        chunk = utts[i:i + batch_size]
        outs = translator.decode(feats[i:i + batch_size], [u.src for u in chunk], [u.tgt for u in chunk],
                                 task=task)
        for u, o in zip(chunk, outs):
            results.append({"id": u.id, "audio": u.audio, "src": u.src, "tgt": u.tgt,
                            "transcription": o["asr"], "translation": o["s2tt"]})
    return results


def translate(translator, utts: Sequence[Utterance], batch_size: int = 8, task: str = "srt") -> list[dict]:
    """Both halves in one process."""
    return decode_features(translator, encode_utterances(translator, utts, batch_size), utts, batch_size, task)


# ----------------------------------------------------------------------------- edge-only files


def write_embeds(path: str | Path, feats: np.ndarray, utts: Sequence[Utterance], *, fingerprint: str,
                 split: str, scheme: str = "fp16", compress: bool = False) -> Path:
    """Write the edge's output (see the module docstring for the three formats)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        np.savez(path, features=np.asarray(feats, np.float32), ids=np.array([u.id for u in utts]),
                 audio=np.array([u.audio for u in utts]), src=np.array([u.src for u in utts]),
                 tgt=np.array([u.tgt for u in utts]), fingerprint=np.array(fingerprint), split=np.array(split))
        return path
    blobs = [pl.encode(f, fingerprint=fingerprint, split=split, scheme=scheme, compress=compress) for f in feats]
    if path.suffix == ".jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for u, b in zip(utts, blobs):
                f.write(json.dumps({"id": u.id, "audio": u.audio, "src": u.src, "tgt": u.tgt,
                                    "payload": base64.b64encode(b).decode()}, ensure_ascii=False) + "\n")
        return path
    if len(blobs) != 1:
        raise InferError(f"{path}: a raw payload file holds one utterance, got {len(blobs)}; "
                         f"name the output *.jsonl (or *.npz) for many")
    path.write_bytes(blobs[0])
    return path


def read_embeds(path: str | Path, *, fingerprint: str, split: str, shape: tuple[int, ...],
                src: str | None = None, tgt: str | None = None) -> tuple[np.ndarray, list[Utterance]]:
    """Read an --edge-only file, checking every payload against the model -> (features, utts)."""
    path = Path(path)
    if not path.is_file():
        raise InferError(f"{path}: file does not exist")
    data = path.read_bytes()
    if data.startswith(pl.MAGIC):
        if not src or not tgt:
            raise InferError(f"{path}: a raw payload carries no languages; pass --src and --tgt")
        p = _decode_payload(data, path, fingerprint, split, shape)
        return p[None], [Utterance(path.stem, "", languages.get(src).code, languages.get(tgt).code)]
    if data.startswith(b"PK"):  # .npz (zip)
        try:
            z = np.load(path, allow_pickle=False)
            fp, sp, feats = str(z["fingerprint"]), str(z["split"]), z["features"]
            meta = [z[k] for k in ("ids", "audio", "src", "tgt")]
        except (ValueError, KeyError, OSError, zipfile.BadZipFile) as e:
            raise InferError(f"{path}: not an --edge-only .npz ({type(e).__name__}: {e})") from None
        if fp != fingerprint or sp != split:
            raise InferError(f"{path}: features were made by model {fp} split {sp}, "
                             f"the loaded model is {fingerprint} split {split}")
        if feats.shape[1:] != tuple(shape) or not all(len(m) == len(feats) for m in meta):
            raise InferError(f"{path}: features of shape {feats.shape[1:]} do not match the model's {tuple(shape)}")
        if not np.issubdtype(feats.dtype, np.floating) or not np.all(np.isfinite(feats)):
            raise InferError(f"{path}: features contain NaN or Inf (or are not floats)")
        try:
            utts = [Utterance(str(i), str(a), languages.get(str(s)).code, languages.get(str(t)).code)
                    for i, a, s, t in zip(*meta)]
        except languages.LanguageError as e:
            raise InferError(f"{path}: {e}") from None
        return feats.astype(np.float32), utts
    feats, utts = [], []
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            blob = base64.b64decode(r["payload"], validate=True)
            u = Utterance(str(r.get("id", n)), str(r.get("audio", "")), languages.get(r["src"]).code,
                          languages.get(r["tgt"]).code)
        except (ValueError, KeyError, TypeError) as e:
            raise InferError(f"{path}:{n}: not an edge-features record ({type(e).__name__}: {e})") from None
        feats.append(_decode_payload(blob, f"{path}:{n}", fingerprint, split, shape))
        utts.append(u)
    if not utts:
        raise InferError(f"{path}: no records")
    return np.stack(feats), utts


def _decode_payload(blob: bytes, where, fingerprint, split, shape) -> np.ndarray:
    try:
        return pl.decode(blob, fingerprint=fingerprint, split=split, shape=tuple(shape),
                         max_bytes=max(len(blob), pl.DEFAULT_MAX_BYTES)).features
    except pl.PayloadError as e:
        raise InferError(f"{where}: {e}") from None


def check_trained(utts: Sequence[Utterance], trained: Sequence[str] | None) -> None:
    """Every utterance's src/tgt must be a language the model was trained on."""
    for u in utts:
        try:
            languages.check_trained(trained, u.src, u.tgt)
        except languages.NotTrainedError as e:
            raise InferError(f"{u.id}: {e}") from None
