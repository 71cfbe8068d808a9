"""Edge client: `python -m esrt_jax.edge --config C --checkpoint CK --audio a.wav --src eng --tgt deu
--server http://host:8080 [--scheme fp16|int8|int4] [--zstd] [--token-file F]`, or on a device
without JAX: `python -m esrt_jax.edge --runtime onnx --model OUT/edge.onnx --audio a.wav ...`.

Runs the front end (`esrt_jax.audio`: decode, resample, 30 s log-mel), the Whisper encoder and the
adapter on this machine and POSTs only the resulting feature payload (`esrt_jax.infer.payload`) to
the cloud service (`esrt_jax.serve`). The request body is the payload and nothing else; the
request line carries src/tgt. Audio never leaves the device.

A recording longer than the encoder's window is segmented here, where the audio is
(`esrt_jax.audio.find_segments`, `--no-segment` to cut it to one window instead): one payload,
one request per segment, sent concurrently so that the service batches them; the answers are
joined in order (`esrt_jax.infer.longform`) and the output lists each segment's start/end seconds.

Two runtimes of the edge half with one interface (`split`, `feature_shape`, `mel_shape`,
`encode(mel, enc_frames) -> features`, the one of `Translator.encode`): `EdgeModel` (our jitted JAX
model, from the run config + checkpoint) and `OnnxEdgeModel` (the file `python -m esrt_jax.export
--edge --format onnx` writes, run by onnxruntime; its model fingerprint comes from the file's
metadata). Every window goes with its real length (`enc_frames`, `audio.encoder_frames` of the
segment's samples): an adapter with `attend_padding: false` (and `window_means`, and
`model.encoder_window: real`, which also cuts each clip's mel to its own window) reads only those
frames, so the features equal the in-process ones (`python -m esrt_jax.infer`); the ONNX graph
attends over the whole window and its export refuses such a model. Before sending, the client
checks the service's fingerprint and split point (`GET /healthz`) and refuses a mismatch.

Library use::

    client = EdgeClient.from_checkpoint("configs/demo.yaml", "runs/demo", server=URL, token=T)
    client = EdgeClient.from_onnx("export/edge.onnx", server=URL, token=T)   # no JAX needed
    client.translate("a.wav", "eng", "deu")   # {"transcription", "translation", ..., "bytes_sent", "segments"}
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from esrt_jax import audio as audio_lib
from esrt_jax.infer import longform
from esrt_jax.infer import payload as pl

RUNTIMES = ("jax", "onnx")
MAX_ANSWER_BYTES = 1 << 20  # a JSON answer is a few hundred bytes; more is not our service


class EdgeError(RuntimeError):
    """The cloud refused or failed a request; `status` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


class EdgeModelError(ValueError):
    """An exported edge model file that cannot be used (unreadable, not ours, wrong metadata)."""


class EdgeModel:
    """The JAX edge half (`models.speech_llm.EdgeHalf`) with the `Translator.encode` interface."""

    def __init__(self, half, split: str | None = None, max_batch: int = 8):
        from flax import nnx  # JAX only for this runtime: the onnx one runs on a device without it

        self.config = half.config
        self.split = split or half.config.split
        self.max_batch = max_batch
        self.graphdef, self.state = nnx.split(half)

    @property
    def feature_shape(self) -> tuple[int, int]:
        return self.config.feature_shape(self.split)

    @property
    def mel_shape(self) -> tuple[int, int]:
        return self.config.encoder.num_mel_bins, self.config.encoder.num_frames

    def encode(self, mel: np.ndarray, enc_frames: np.ndarray | None = None) -> np.ndarray:
        """(B, n_mels, frames) + real encoder frames (B,) -> (B, *feature_shape) float32 (batch padded
        to a power of 2): `Translator.encode`'s computation (`encode_batch`, the model's window)."""
        from esrt_jax.infer.translator import encode_batch  # JAX: see __init__

        return encode_batch(self.graphdef, self.state, mel, self.split, self.max_batch, enc_frames=enc_frames,
                            window=self.config.encoder_window)


def load_edge(config, checkpoint, overrides: Sequence[str] = (), *, split: str | None = None
              ) -> tuple[EdgeModel, str]:
    """Run config + checkpoint -> (EdgeModel, model fingerprint) without loading the LLM
    (`speech.load.load_edge_half`)."""
    from esrt_jax.speech.load import load_edge_half  # JAX: see EdgeModel

    half, fingerprint = load_edge_half(config, checkpoint, overrides)
    return EdgeModel(half, split), fingerprint


class OnnxEdgeModel:
    """The exported edge half (`esrt_jax.export.onnx_edge`) in onnxruntime, CPU: no JAX.

    mel (B, n_mels, frames) -> features (B, *feature_shape) float32 (any batch size). The graph
    attends over the whole window (the export refuses an adapter with attend_padding false), so
    the real lengths `encode` takes do not change its features. `threads`: onnxruntime's intra-op
    threads (default: its own, one per core).
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None):
        try:
            import onnxruntime as ort  # optional: the `[onnx]` extra, the device's only runtime
        except ImportError:
            raise EdgeModelError("--runtime onnx needs onnxruntime: pip install -e '.[onnx]' in the checkout "
                                 "(on a device: onnxruntime numpy soundfile soxr zstandard)") from None
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise EdgeModelError(f"{self.path}: edge model file does not exist")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(self.path, opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own error types; keep its message
            raise EdgeModelError(f"{self.path}: cannot load the ONNX model ({type(e).__name__}: "
                                 f"{str(e)[:300]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("esrt.format") != pl.EDGE_MODEL_FORMAT:
            raise EdgeModelError(f"{self.path}: not an esrt-jax edge model (metadata esrt.format is "
                                 f"{meta.get('esrt.format')!r}); export one with "
                                 f"`python -m esrt_jax.export --edge --format onnx`")
        if meta.get("esrt.version") != str(pl.EDGE_MODEL_VERSION):
            raise EdgeModelError(f"{self.path}: edge model format version {meta.get('esrt.version')!r}, this "
                                 f"client reads version {pl.EDGE_MODEL_VERSION}")
        try:
            self.fingerprint = meta["esrt.fingerprint"]
            self.split = meta["esrt.split"]
            self.feature_shape = _dims(meta["esrt.feature_shape"], "esrt.feature_shape")
            self.mel_shape = _dims(meta["esrt.mel_shape"], "esrt.mel_shape")
        except (KeyError, ValueError) as e:
            raise EdgeModelError(f"{self.path}: edge model metadata is incomplete or invalid ({e})") from None
        if self.split not in pl.SPLITS:
            raise EdgeModelError(f"{self.path}: metadata esrt.split is {self.split!r}, not one of {pl.SPLITS}")
        # the metadata must describe the graph it sits on (a tampered one would fail in onnxruntime)
        graph = {"mel": (self.session.get_inputs(), "esrt.mel_shape", self.mel_shape),
                 "features": (self.session.get_outputs(), "esrt.feature_shape", self.feature_shape)}
        for name, (args, key, want) in graph.items():
            shape = next((a.shape for a in args if a.name == name), None)
            if shape is None:
                raise EdgeModelError(f"{self.path}: the ONNX graph has no {name!r} input/output")
            if len(shape) != 1 + len(want) or any(isinstance(d, int) and d != w for d, w in zip(shape[1:], want)):
                raise EdgeModelError(f"{self.path}: metadata {key} says {name} is (B, {', '.join(map(str, want))}), "
                                     f"the graph's {name} is {shape}: the file was altered")

    def encode(self, mel: np.ndarray, enc_frames: np.ndarray | None = None) -> np.ndarray:
        """(B, n_mels, frames) -> (B, *feature_shape) float32; enc_frames (B,): unused (see above)."""
        x = np.ascontiguousarray(mel, np.float32)
        if x.ndim != 3 or x.shape[1:] != self.mel_shape:
            raise ValueError(f"edge model {self.path} expects mel (B, {self.mel_shape[0]}, "
                             f"{self.mel_shape[1]}), got {x.shape}")
        return self.session.run(["features"], {"mel": x})[0]


def _dims(text: str, key: str) -> tuple[int, ...]:
    """Metadata JSON like "[80, 3000]" -> (80, 3000); anything but a list of positive ints -> ValueError."""
    v = json.loads(text)
    if not (isinstance(v, list) and v and all(type(d) is int and d > 0 for d in v)):
        raise ValueError(f"{key} must be a list of positive integers, got {text[:60]!r}")
    return tuple(v)


class EdgeEncoder:
    """The edge half: audio -> features -> payload bytes. `translator` is an `EdgeModel`, an
    `OnnxEdgeModel` or a `Translator` (whose `encode` is the same computation as `EdgeModel`'s)."""

    def __init__(self, translator, fingerprint: str, *, scheme: str = "fp16", compress: bool = False,
                 group_size: int = 32):
        if scheme not in pl.SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; use one of {pl.SCHEMES}")
        self.translator = translator
        self.fingerprint = fingerprint
        self.scheme, self.compress, self.group_size = scheme, compress, group_size
        shape = getattr(translator, "mel_shape", None)
        if shape is None:  # a Translator
            shape = translator.config.encoder.num_mel_bins, translator.config.encoder.num_frames
        self.n_mels, self.num_frames = shape

    @property
    def split(self) -> str:
        return self.translator.split

    def features(self, mels: np.ndarray, enc_frames: np.ndarray | None = None) -> np.ndarray:
        """(B, n_mels, frames) + real encoder frames (B,) (`enc_frames`) -> (B, *feature_shape) float32."""
        return self.translator.encode(mels, enc_frames)

    def mel(self, path: str | os.PathLike) -> np.ndarray:
        """One window (n_mels, num_frames): longer audio is cut (with a warning)."""
        return audio_lib.mel_from_file(path, self.n_mels, self.num_frames)[0]

    def segments(self, path: str | os.PathLike, segment: bool = True
                 ) -> tuple[np.ndarray, list[audio_lib.Segment]]:
        """Audio file -> (log-mel (S, n_mels, num_frames), its S segments)."""
        mels, segs, _ = longform.clip_windows(path, self.n_mels, self.num_frames, segment=segment)
        return mels, segs

    def enc_frames(self, segs: Sequence[audio_lib.Segment]) -> np.ndarray:
        """Segments -> the real encoder frames (S,) of each (what `features` takes)."""
        return longform.window_frames(segs, self.num_frames)

    def payload(self, features: np.ndarray) -> bytes:
        """One utterance's features (*feature_shape) -> payload bytes."""
        return pl.encode(features, fingerprint=self.fingerprint, split=self.split, scheme=self.scheme,
                         group_size=self.group_size, compress=self.compress)

    def payloads(self, paths: Sequence[str | os.PathLike], batch: int = 8) -> list[bytes]:
        """One payload per file, each one window (longer audio is cut, with a warning)."""
        windows = (longform.clip_windows(p, self.n_mels, self.num_frames, segment=False) for p in paths)
        return [self.payload(f) for f in longform.encode_windows(self.features, ((m, f) for m, _, f in windows),
                                                                 batch)]


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

    @classmethod
    def from_onnx(cls, path: str | os.PathLike, *, threads: int | None = None, **kw) -> "EdgeClient":
        """The exported edge model at `path` in onnxruntime; its fingerprint from its metadata."""
        model = OnnxEdgeModel(path, threads=threads)
        return cls(model, model.fingerprint, **kw)

    def _call(self, req: urllib.request.Request) -> tuple[int, bytes]:
        """-> (HTTP status, body) for any answer, error statuses included; no usable answer (refused,
        timed out, dropped, cut short) -> EdgeError(status 0), one line."""
        url = req.full_url
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.status, _read_bounded(r)
        except urllib.error.HTTPError as e:
            try:
                return e.code, _read_bounded(e)
            except (OSError, http.client.HTTPException, EdgeError):
                return e.code, b""
        except urllib.error.URLError as e:
            raise EdgeError(f"{url}: cannot reach the server ({e.reason})") from None
        except TimeoutError:
            raise EdgeError(f"{url}: no answer within {self.timeout:g} s") from None
        except http.client.RemoteDisconnected:
            raise EdgeError(f"{url}: the server closed the connection without answering") from None
        except (OSError, http.client.HTTPException) as e:
            raise EdgeError(f"{url}: the connection failed ({type(e).__name__}: {e})") from None

    def _json(self, req: urllib.request.Request, ok: tuple[int, ...]) -> tuple[int, dict]:
        """`_call` -> (status, JSON object) when status is in `ok`; otherwise, or when the body is
        not a JSON object, EdgeError naming the status and the service's `error` message."""
        status, raw = self._call(req)
        try:
            out = json.loads(raw)
        except ValueError:  # UnicodeDecodeError included
            out = None
        if status in ok and isinstance(out, dict):
            return status, out
        if status in ok:
            what = "not JSON" if out is None else f"a JSON {type(out).__name__}, not an object"
            raise EdgeError(f"{req.full_url}: HTTP {status}, but the answer is {what}: {raw[:80]!r}", status)
        msg = out.get("error") if isinstance(out, dict) else None
        raise EdgeError(f"{req.full_url}: HTTP {status}: {msg if isinstance(msg, str) and msg else _reason(status)}",
                        status)

    def check_service(self) -> dict:
        """`GET /healthz`; refuse (EdgeError) a service whose model fingerprint or split point
        differs from this edge half's -> the service's health JSON."""
        url = f"{self.server}/healthz"
        _, health = self._json(urllib.request.Request(url), ok=(200, 503))  # 503 while warming still describes the model
        if not isinstance(health.get("fingerprint"), str) or not isinstance(health.get("split"), (str, type(None))):
            raise EdgeError(f"{url}: the answer does not describe a model (fingerprint "
                            f"{health.get('fingerprint')!r:.40}, split {health.get('split')!r:.40})")
        if health["fingerprint"] != self.fingerprint:
            raise EdgeError(f"this edge model is {self.fingerprint}, the service at {self.server} runs model "
                            f"{health['fingerprint']}: use the edge half of the service's checkpoint "
                            f"(re-export it with `python -m esrt_jax.export --edge`)")
        if health.get("split") not in (None, self.split):
            raise EdgeError(f"this edge model sends split {self.split!r}, the service at {self.server} "
                            f"expects {health.get('split')!r}")
        return health

    def send(self, body: bytes, src: str, tgt: str) -> dict:
        """POST one payload; -> the service's JSON answer plus `bytes_sent` (the HTTP body)."""
        if not body.startswith(pl.MAGIC):  # the body is a payload, never anything else
            raise ValueError("refusing to send something that is not a feature payload")
        url = f"{self.server}/v1/translate?" + urllib.parse.urlencode({"src": src, "tgt": tgt})
        req = urllib.request.Request(url, data=body, method="POST", headers={
            "Authorization": pl.authorization(self.token), "Content-Type": "application/octet-stream"})
        _, out = self._json(req, ok=(200,))
        bad = [k for k in ("transcription", "translation") if not isinstance(out.get(k), str)]
        if not isinstance(out.get("batch_size", 0), (int, type(None))) or isinstance(out.get("batch_size"), bool):
            bad.append("batch_size")
        if bad:
            raise EdgeError(f"{url}: HTTP 200, but the answer has no valid {', '.join(bad)}: "
                            f"{json.dumps(out)[:80]}", 200)
        out["bytes_sent"] = len(body)
        return out

    def translate(self, path: str | os.PathLike, src: str, tgt: str, *, segment: bool = True,
                  batch: int = 8) -> dict:
        """Audio file -> {"transcription", "translation", "src", "tgt", "scheme", "batch_size",
        "bytes_sent", "segments": [{"start", "end", "transcription", "translation", "batch_size",
        "bytes_sent"}]}; only payloads are sent, one per segment (`bytes_sent`: their total)."""
        mels, segs, frames = longform.clip_windows(path, self.n_mels, self.num_frames, segment=segment)
        bodies = [self.payload(f) for f in longform.encode_windows(self.features, [(mels, frames)], batch)]
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(bodies)))) as ex:
            outs = list(ex.map(lambda b: self.send(b, src, tgt), bodies))
        joined = longform.join_outputs(segs, outs, src, tgt)
        for seg, o in zip(joined["segments"], outs):
            seg.update(batch_size=o.get("batch_size"), bytes_sent=o["bytes_sent"])
        return {**outs[0], **joined, "bytes_sent": sum(o["bytes_sent"] for o in outs)}


def _read_bounded(r) -> bytes:
    raw = r.read(MAX_ANSWER_BYTES + 1)
    if len(raw) > MAX_ANSWER_BYTES:
        raise EdgeError(f"{r.url}: the answer is longer than {MAX_ANSWER_BYTES} bytes")
    return raw


def _reason(status: int) -> str:
    return http.client.responses.get(status, "unexpected status")


if __name__ == "__main__":  # the command is esrt_jax.cli.edge (commands live in the top layer)
    import runpy

    runpy.run_module("esrt_jax.cli.edge", run_name="__main__", alter_sys=True)
