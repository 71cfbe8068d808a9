"""Edge client: `python -m esrt_jax.edge --config C --checkpoint CK --audio a.wav --src eng --tgt deu
--server http://host:8080 [--scheme fp16|int8|int4] [--zstd] [--token-file F]`.

Runs the front end (`esrt_jax.audio`: decode, resample, 30 s log-mel), the Whisper encoder and the
adapter on this machine and POSTs only the resulting feature payload (`esrt_jax.infer.payload`) to
the cloud service (`esrt_jax.serve`). The request body is the payload and nothing else; the
request line carries src/tgt. Audio never leaves the device.

A recording longer than the encoder's window is segmented here, where the audio is
(`esrt_jax.audio.find_segments`, `--no-segment` to cut it to one window instead): one payload,
one request per segment, sent concurrently so that the service batches them; the answers are
joined in order (`esrt_jax.infer.longform`) and the output lists each segment's start/end seconds.

Library use::

    client = EdgeClient.from_checkpoint("configs/demo.yaml", "runs/demo", server=URL, token=T)
    client.translate("a.wav", "eng", "deu")   # {"transcription", "translation", ..., "bytes_sent", "segments"}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
from flax import nnx

from esrt_jax import audio as audio_lib
from esrt_jax import languages
from esrt_jax.convert.whisper import load_whisper_encoder
from esrt_jax.infer import longform
from esrt_jax.infer import payload as pl
from esrt_jax.infer.cloud import model_fingerprint
from esrt_jax.infer.translator import encode_batch
from esrt_jax.models.qformer import SpeechAdapter
from esrt_jax.models.speech_llm import SpeechLLM, SpeechLLMConfig
from esrt_jax.train import restore
from esrt_jax.train.config import load_run_config
from esrt_jax.train.speech import speech_config


class EdgeError(RuntimeError):
    """The cloud refused or failed a request; `status` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


class EdgeHalf(nnx.Module):
    """Only the edge's parts of a `SpeechLLM` (encoder + adapter): no LLM weights on the device.

    `encode` (and the `adapt` it calls) are `SpeechLLM`'s own, so edge features are computed by
    the same code as the one-process path.
    """

    encode = SpeechLLM.encode
    adapt = SpeechLLM.adapt

    def __init__(self, config: SpeechLLMConfig, encoder, adapter):
        self.config, self.encoder, self.adapter = config, encoder, adapter


class EdgeModel:
    """The edge half with the `Translator.encode` interface (config, split, feature_shape, encode)."""

    def __init__(self, half: EdgeHalf, split: str | None = None, max_batch: int = 8):
        self.config = half.config
        self.split = split or half.config.split
        self.max_batch = max_batch
        self.graphdef, self.state = nnx.split(half)

    @property
    def feature_shape(self) -> tuple[int, int]:
        return self.config.feature_shape(self.split)

    def encode(self, mel: np.ndarray) -> np.ndarray:
        """(B, n_mels, frames) -> (B, *feature_shape) float32 (batch padded to a power of 2)."""
        return encode_batch(self.graphdef, self.state, mel, self.split, self.max_batch)


def load_edge(config, checkpoint, overrides: Sequence[str] = (), *, split: str | None = None
              ) -> tuple[EdgeModel, str]:
    """Run config + checkpoint -> (EdgeModel, model fingerprint) without loading the LLM.

    With `model.whisper` (a local HF dir) the encoder is read from it and the trained adapter from
    the checkpoint; the LLM is never built. A config whose encoder is a seeded random init (the
    demo) is rebuilt with the whole model (tiny), so that the encoder weights are the same.
    """
    ck = step = None
    stage = None
    if checkpoint is not None:
        ck, stage, step = restore.resolve_checkpoint(checkpoint)
    cfg = load_run_config(config, overrides).for_stage(stage or "srt")
    if not cfg.model.get("whisper"):
        loaded = restore.load_model(config, checkpoint, overrides)
        m = loaded.model
        half = EdgeHalf(m.config, m.encoder, m.adapter)
    else:
        scfg = speech_config(cfg)
        enc = load_whisper_encoder(cfg.model["whisper"], dtype=scfg.encoder.dtype,
                                   scan_layers=scfg.encoder.scan_layers)
        half = EdgeHalf(scfg, enc, SpeechAdapter(scfg.adapter, rngs=nnx.Rngs(int(cfg.model.get("seed", 0)))))
        if ck is not None:
            trained = restore.restore_adapter(cfg, ck, step)
            restore.merge_params(half, {"adapter": trained})
    return EdgeModel(half, split), model_fingerprint(half)


class EdgeEncoder:
    """The edge half: audio -> features -> payload bytes. `translator` is an `EdgeModel` (or a
    `Translator`, whose `encode` is the same computation)."""

    def __init__(self, translator, fingerprint: str, *, scheme: str = "fp16", compress: bool = False,
                 group_size: int = 32):
        if scheme not in pl.SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; use one of {pl.SCHEMES}")
        self.translator = translator
        self.fingerprint = fingerprint
        self.scheme, self.compress, self.group_size = scheme, compress, group_size
        enc = translator.config.encoder
        self.n_mels, self.num_frames = enc.num_mel_bins, enc.num_frames

    @property
    def split(self) -> str:
        return self.translator.split

    def features(self, mels: np.ndarray) -> np.ndarray:
        """(B, n_mels, frames) -> (B, *feature_shape) float32."""
        return self.translator.encode(mels)

    def mel(self, path: str | os.PathLike) -> np.ndarray:
        """One window (n_mels, num_frames): longer audio is cut (with a warning)."""
        return audio_lib.mel_from_file(path, self.n_mels, self.num_frames)[0]

    def segments(self, path: str | os.PathLike, segment: bool = True
                 ) -> tuple[np.ndarray, list[audio_lib.Segment]]:
        """Audio file -> (log-mel (S, n_mels, num_frames), its S segments)."""
        return audio_lib.mel_segments(path, self.n_mels, self.num_frames, segment=segment)

    def payload(self, features: np.ndarray) -> bytes:
        """One utterance's features (*feature_shape) -> payload bytes."""
        return pl.encode(features, fingerprint=self.fingerprint, split=self.split, scheme=self.scheme,
                         group_size=self.group_size, compress=self.compress)

    def payloads(self, paths: Sequence[str | os.PathLike], batch: int = 8) -> list[bytes]:
        out = []
        for i in range(0, len(paths), batch):
            mels = np.stack([self.mel(p) for p in paths[i:i + batch]])
            out += [self.payload(f) for f in self.features(mels)]
        return out


class EdgeClient(EdgeEncoder):
    """`EdgeEncoder` + HTTP: `translate(path, src, tgt)` encodes locally and asks the cloud."""

    def __init__(self, translator, fingerprint: str, *, server: str, token: str, scheme: str = "fp16",
                 compress: bool = False, group_size: int = 32, timeout: float = 120.0, concurrency: int = 8):
        super().__init__(translator, fingerprint, scheme=scheme, compress=compress, group_size=group_size)
        self.server, self.token, self.timeout = server.rstrip("/"), token, timeout
        self.concurrency = concurrency  # segments of one recording in flight at once

    @classmethod
    def from_checkpoint(cls, config, checkpoint, overrides: Sequence[str] = (), *, split: str | None = None,
                        **kw) -> "EdgeClient":
        model, fingerprint = load_edge(config, checkpoint, overrides, split=split)
        return cls(model, fingerprint, **kw)

    def send(self, body: bytes, src: str, tgt: str) -> dict:
        """POST one payload; -> the service's JSON answer plus `bytes_sent` (the HTTP body)."""
        if not body.startswith(pl.MAGIC):  # the body is a payload, never anything else
            raise ValueError("refusing to send something that is not a feature payload")
        url = f"{self.server}/v1/translate?" + urllib.parse.urlencode({"src": src, "tgt": tgt})
        req = urllib.request.Request(url, data=body, method="POST", headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/octet-stream"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                out = json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                msg = json.loads(e.read()).get("error", "")
            except ValueError:
                msg = ""
            raise EdgeError(f"{url}: HTTP {e.code}: {msg or e.reason}", e.code) from None
        except urllib.error.URLError as e:
            raise EdgeError(f"{url}: cannot reach the server ({e.reason})") from None
        out["bytes_sent"] = len(body)
        return out

    def translate(self, path: str | os.PathLike, src: str, tgt: str, *, segment: bool = True,
                  batch: int = 8) -> dict:
        """Audio file -> {"transcription", "translation", "src", "tgt", "scheme", "batch_size",
        "bytes_sent", "segments": [{"start", "end", "transcription", "translation", "batch_size",
        "bytes_sent"}]}; only payloads are sent, one per segment (`bytes_sent`: their total)."""
        mels, segs = self.segments(path, segment)
        feats = np.concatenate([self.features(mels[i:i + batch]) for i in range(0, len(mels), batch)])
        bodies = [self.payload(f) for f in feats]
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(bodies)))) as ex:
            outs = list(ex.map(lambda b: self.send(b, src, tgt), bodies))
        joined = longform.join_outputs(segs, outs, src, tgt)
        for seg, o in zip(joined["segments"], outs):
            seg.update(batch_size=o.get("batch_size"), bytes_sent=o["bytes_sent"])
        return {**outs[0], **joined, "bytes_sent": sum(o["bytes_sent"] for o in outs)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m esrt_jax.edge", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="run config YAML (the same as the server's)")
    ap.add_argument("--checkpoint", required=True, help="run dir, stage dir or step dir (same as the server's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--audio", required=True, nargs="+", help="audio file(s) (wav/flac/...)")
    ap.add_argument("--src", required=True, help="source language (ISO 639-3)")
    ap.add_argument("--tgt", required=True, help="target language (ISO 639-3)")
    ap.add_argument("--server", required=True, help="service URL, e.g. http://127.0.0.1:8080")
    ap.add_argument("--scheme", default="fp16", choices=pl.SCHEMES)
    ap.add_argument("--zstd", action="store_true", help="zstd-compress the payload body")
    ap.add_argument("--split", default=None, choices=pl.SPLITS,
                    help="split point (must match the server's; default: the model config's)")
    ap.add_argument("--token-file", default=None, help="bearer token file (default: $ESRT_SERVE_TOKEN)")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--no-segment", dest="segment", action="store_false",
                    help="do not segment audio longer than the encoder's window: cut it to one window (warns)")
    args = ap.parse_args(argv)

    try:
        src, tgt = languages.get(args.src).code, languages.get(args.tgt).code
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    token = pl.read_token(args.token_file)
    client = EdgeClient.from_checkpoint(args.config, args.checkpoint, args.set, split=args.split,
                                        server=args.server, token=token, scheme=args.scheme,
                                        compress=args.zstd, timeout=args.timeout)
    rc = 0
    for path in args.audio:
        try:
            out = client.translate(path, src, tgt, segment=args.segment)
        except (EdgeError, audio_lib.AudioError) as e:
            print(f"error: {path}: {e}", file=sys.stderr)
            rc = 1
            continue
        print(json.dumps({"audio": str(path), **out}, ensure_ascii=False))
    return rc


if __name__ == "__main__":
    sys.exit(main())
