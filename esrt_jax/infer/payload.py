"""Edge -> cloud feature payloads: a versioned, self-describing, checksummed binary format.

Layout (all integers little-endian)::

    b"ESRTPL"   magic (6 bytes)
    u16         format version (1)
    u32         header length H
    H bytes     header, UTF-8 JSON: fingerprint, split, shape, dtype, scheme, group_size,
                compression, scales_nbytes, data_nbytes, body_nbytes
    body        [scales][data], zstd-compressed as a whole when compression == "zstd"
    u32         CRC-32 of everything before it

Schemes (x is (..., D) float; "channel" = last axis):
- ``fp16``: x as float16; decode(encode(x)) == x.astype(float16) exactly.
- ``int8``: symmetric per-channel, scale_d = max|x[..., d]| / 127 (stored as float16, rounded up
  so that nothing clips); |x - x̂| <= scale_d / 2 elementwise.
- ``int4``: symmetric group-wise along the last axis (groups of `group_size`), scale_g =
  max|x_g| / 7 (float16, rounded up), two values per byte; |x - x̂| <= scale_g / 2.

Everything malformed is rejected with a `PayloadError` subclass before any array is built, and
nothing else escapes `decode` whatever the bytes: the header is size- and nesting-limited before it
is parsed, its numbers must be plain finite integers, the decoded size is bounded (no zstd bombs)
and decoded features must be finite.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

MAGIC = b"ESRTPL"
VERSION = 1
SCHEMES = ("fp16", "int8", "int4")
SPLITS = ("qformer", "projector")
_PREFIX = struct.Struct("<6sHI")
_CRC = struct.Struct("<I")
DEFAULT_MAX_BYTES = 8 * 1024 * 1024
MAX_HEADER_BYTES = 4096   # a real header is ~250 bytes
MAX_HEADER_DEPTH = 4      # {"shape": [..]} is depth 2
MAX_NDIM = 8
DECODED_PER_BYTE = 4      # decoded (scales + data) may be at most this many times max_bytes


# The exported edge model (`export.onnx_edge` writes it, `edge.OnnxEdgeModel` reads it) carries the
# same fingerprint and split point as its payloads, in its metadata under `esrt.format`/`esrt.version`.
EDGE_MODEL_FORMAT = "esrt-jax-edge-onnx"
EDGE_MODEL_VERSION = 1


class PayloadError(ValueError):
    """A payload cannot be decoded; `status` is the HTTP status a server should answer."""

    status = 400


class BadMagic(PayloadError):
    pass


class UnsupportedVersion(PayloadError):
    pass


class Truncated(PayloadError):
    pass


class ChecksumMismatch(PayloadError):
    pass


class Oversize(PayloadError):
    status = 413


class Mismatch(PayloadError):
    """Well-formed, but not for the served model (fingerprint, split point or shape)."""

    status = 422


@dataclass(frozen=True)
class Payload:
    """A decoded payload: features (shape, float32) and what produced them."""

    features: np.ndarray
    fingerprint: str
    split: str
    scheme: str


def _f16_scale_up(scale: np.ndarray) -> np.ndarray:
    """Scales as float16, rounded up so that |x| / scale never exceeds the integer range."""
    s = np.asarray(scale, np.float32)
    s16 = s.astype(np.float16)
    low = s16.astype(np.float32) < s
    s16[low] = np.nextafter(s16[low], np.float16(np.inf))
    return np.where(s16 == 0, np.float16(1.0), s16).astype(np.float16)


def _quantise(x: np.ndarray, scheme: str, group_size: int) -> tuple[bytes, bytes]:
    if scheme == "fp16":
        return b"", x.astype(np.float16).tobytes()
    if scheme == "int8":
        flat = x.reshape(-1, x.shape[-1])
        scale = _f16_scale_up(np.abs(flat).max(axis=0) / 127.0)
        q = np.clip(np.rint(flat / scale.astype(np.float32)), -127, 127).astype(np.int8)
        return scale.tobytes(), q.tobytes()
    if scheme == "int4":
        groups = x.reshape(-1, group_size)
        scale = _f16_scale_up(np.abs(groups).max(axis=1) / 7.0)
        q = np.clip(np.rint(groups / scale.astype(np.float32)[:, None]), -8, 7).astype(np.int8)
        nib = (q.reshape(-1) & 0x0F).astype(np.uint8)
        return scale.tobytes(), (nib[0::2] | (nib[1::2] << 4)).tobytes()
    raise ValueError(f"unknown quantisation scheme {scheme!r}; use one of {SCHEMES}")


def _dequantise(scales: bytes, data: bytes, shape: tuple[int, ...], scheme: str,
                group_size: int) -> np.ndarray:
    n = math.prod(shape)
    if scheme == "fp16":
        return np.frombuffer(data, np.float16).astype(np.float32).reshape(shape)
    if scheme == "int8":
        q = np.frombuffer(data, np.int8).reshape(-1, shape[-1]).astype(np.float32)
        return (q * np.frombuffer(scales, np.float16).astype(np.float32)).reshape(shape)
    packed = np.frombuffer(data, np.uint8)
    nib = np.empty(packed.size * 2, np.int8)
    nib[0::2], nib[1::2] = packed & 0x0F, packed >> 4
    q = np.where(nib > 7, nib - 16, nib).astype(np.float32)[:n].reshape(-1, group_size)
    return (q * np.frombuffer(scales, np.float16).astype(np.float32)[:, None]).reshape(shape)


def expected_sizes(shape: tuple[int, ...], scheme: str, group_size: int = 32) -> tuple[int, int]:
    """(scales bytes, data bytes) that a well-formed payload of this shape carries."""
    n = math.prod(int(d) for d in shape)  # Python ints: a crafted shape cannot overflow
    if scheme == "fp16":
        return 0, 2 * n
    if scheme == "int8":
        return 2 * shape[-1], n
    return 2 * (n // group_size), (n + 1) // 2


def encode(features: np.ndarray, *, fingerprint: str, split: str = "projector", scheme: str = "fp16",
           group_size: int = 32, compress: bool = False) -> bytes:
    """Serialise features (..., D) float -> payload bytes."""
    x = np.asarray(features, np.float32)
    if x.ndim < 1 or x.size == 0:
        raise ValueError(f"features must be a non-empty array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("features contain NaN or Inf")
    if np.abs(x).max() > np.finfo(np.float16).max:
        raise ValueError(f"features reach {np.abs(x).max():.4g}, beyond float16's range: the fp16 "
                         f"payload and the float16 quantisation scales cannot represent them")
    if split not in SPLITS:
        raise ValueError(f"unknown split point {split!r}; use one of {SPLITS}")
    if scheme == "int4" and (group_size <= 0 or group_size % 2 or x.shape[-1] % group_size):
        raise ValueError(f"int4 needs an even group_size dividing the last dim ({x.shape[-1]}), "
                         f"got {group_size}")
    scales, data = _quantise(x, scheme, group_size)
    body = scales + data
    compression = "none"
    if compress:
        body = zstandard.ZstdCompressor(level=10).compress(body)
        compression = "zstd"
    header = json.dumps({
        "fingerprint": fingerprint, "split": split, "shape": list(x.shape), "dtype": "float32",
        "scheme": scheme, "group_size": group_size if scheme == "int4" else 0,
        "compression": compression, "scales_nbytes": len(scales), "data_nbytes": len(data),
        "body_nbytes": len(body),
    }, sort_keys=True, separators=(",", ":")).encode()
    blob = _PREFIX.pack(MAGIC, VERSION, len(header)) + header + body
    return blob + _CRC.pack(zlib.crc32(blob))


def decode(buf: bytes, *, fingerprint: str | None = None, split: str | None = None,
           shape: tuple[int, ...] | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> Payload:
    """Parse and verify payload bytes; optional expectations of the served model are enforced."""
    if len(buf) > max_bytes:
        raise Oversize(f"payload of {len(buf)} bytes exceeds the limit of {max_bytes} bytes")
    if len(buf) < _PREFIX.size + _CRC.size:
        raise Truncated(f"payload of {len(buf)} bytes is shorter than the fixed prefix")
    magic, version, hlen = _PREFIX.unpack_from(buf)
    if magic != MAGIC:
        raise BadMagic(f"not an esrt-jax payload (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise UnsupportedVersion(f"payload format version {version} is not supported (this server reads {VERSION})")
    if len(buf) < _PREFIX.size + hlen + _CRC.size:
        raise Truncated(f"payload truncated: header says {hlen} header bytes, only {len(buf)} bytes in total")
    if hlen > MAX_HEADER_BYTES:
        raise PayloadError(f"payload header of {hlen} bytes exceeds the limit of {MAX_HEADER_BYTES}")
    (crc,) = _CRC.unpack_from(buf, len(buf) - _CRC.size)
    if zlib.crc32(buf[:-_CRC.size]) != crc:
        # A truncated payload also fails the checksum: name the more useful cause when the header tells.
        try:
            declared = _PREFIX.size + hlen + _parse_header(buf[_PREFIX.size:_PREFIX.size + hlen])[6] + _CRC.size
        except PayloadError:
            declared = len(buf)
        if declared != len(buf):
            raise Truncated(f"payload length {len(buf)} does not match its header ({declared} bytes)")
        raise ChecksumMismatch("payload checksum mismatch: the bytes were corrupted in transit")
    shp, scheme, gs, comp, s_n, d_n, b_n, fp, sp = _parse_header(buf[_PREFIX.size:_PREFIX.size + hlen])
    if scheme not in SCHEMES or comp not in ("none", "zstd") or sp not in SPLITS:
        raise PayloadError(f"payload header names unknown scheme/compression/split: {scheme}/{comp}/{sp}")
    if not shp or any(d <= 0 for d in shp) or (scheme == "int4" and (gs <= 0 or gs % 2 or shp[-1] % gs)):
        raise PayloadError(f"payload header has an invalid shape {shp} for scheme {scheme}")
    if (s_n, d_n) != expected_sizes(shp, scheme, gs):
        raise PayloadError(f"payload sizes {s_n}+{d_n} do not match shape {shp} and scheme {scheme}")
    if s_n + d_n > DECODED_PER_BYTE * max_bytes:
        raise Oversize(f"payload decoded size {s_n + d_n} bytes exceeds the limit of "
                       f"{DECODED_PER_BYTE * max_bytes} bytes")
    if fingerprint is not None and fp != fingerprint:
        raise Mismatch(f"payload was made by model {fp}, this server runs {fingerprint}")
    if split is not None and sp != split:
        raise Mismatch(f"payload split point is {sp!r}, this server expects {split!r}")
    if shape is not None and shp != tuple(shape):
        raise Mismatch(f"payload shape {shp} does not match the served model's {tuple(shape)}")
    body = buf[_PREFIX.size + hlen:-_CRC.size]
    if len(body) != b_n:
        raise Truncated(f"payload body is {len(body)} bytes, header says {b_n}")
    if comp == "zstd":
        try:  # streamed and bounded: a crafted frame header cannot make it allocate its claimed size
            with zstandard.ZstdDecompressor().stream_reader(body) as r:
                parts, n = [], 0
                while n <= s_n + d_n and (chunk := r.read(s_n + d_n + 1 - n)):
                    parts.append(chunk)
                    n += len(chunk)
            body = b"".join(parts)
        except zstandard.ZstdError as e:
            raise PayloadError(f"payload body does not decompress: {e}") from None
    if len(body) != s_n + d_n:
        raise Truncated(f"payload body holds {len(body)} bytes, expected {s_n + d_n}")
    x = _dequantise(body[:s_n], body[s_n:], shp, scheme, gs)
    if not np.all(np.isfinite(x)):  # well-formed fp16 data or float16 scales can hold NaN/Inf bits
        raise PayloadError("payload features contain NaN or Inf")
    return Payload(features=x, fingerprint=fp, split=sp, scheme=scheme)


def _json_depth(text: str) -> int:
    """Deepest [ / { nesting of JSON text (outside strings), without parsing it."""
    depth = deepest = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            esc, in_str = (False, True) if esc else (ch == "\\", ch != '"')
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _reject_constant(name: str):
    raise ValueError(f"non-finite number {name}")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"number {text[:20]} overflows")
    return v


def _count(h: dict, key: str, *, positive: bool = False) -> int:
    v = h[key]
    if type(v) is not int or v < (1 if positive else 0) or v >= 2 ** 63:
        raise ValueError(f"{key} must be a {'positive' if positive else 'non-negative'} integer, got {v!r:.40}")
    return v


def _parse_header(raw: bytes) -> tuple:
    """Header bytes -> (shape, scheme, group_size, compression, scales_nbytes, data_nbytes,
    body_nbytes, fingerprint, split), checked for types; anything else -> PayloadError."""
    try:
        text = raw.decode("utf-8")
        if _json_depth(text) > MAX_HEADER_DEPTH:
            raise ValueError(f"nested deeper than {MAX_HEADER_DEPTH}")
        h = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
        if not isinstance(h, dict):
            raise TypeError(f"expected a JSON object, got {type(h).__name__}")
        dims = h["shape"]
        if not isinstance(dims, list) or not 0 < len(dims) <= MAX_NDIM:
            raise ValueError(f"shape must be a list of 1..{MAX_NDIM} dims, got {dims!r:.60}")
        shp = tuple(_count({"shape dim": d}, "shape dim", positive=True) for d in dims)
        strs = [h[k] for k in ("scheme", "compression", "fingerprint", "split")]
        if not all(isinstance(v, str) for v in strs):
            raise TypeError("scheme, compression, fingerprint and split must be strings")
        scheme, comp, fp, sp = strs
        gs = _count(h, "group_size")
        s_n, d_n, b_n = (_count(h, k) for k in ("scales_nbytes", "data_nbytes", "body_nbytes"))
    except (ValueError, KeyError, TypeError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        msg = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise PayloadError(f"payload header is malformed: {msg[:200]}") from None
    return shp, scheme, gs, comp, s_n, d_n, b_n, fp, sp


def error_bound(features: np.ndarray, scheme: str, group_size: int = 32) -> np.ndarray:
    """Elementwise worst-case |x - decode(encode(x))| for `scheme` (0 beyond fp16 rounding)."""
    x = np.asarray(features, np.float32)
    if scheme == "fp16":
        return np.abs(x - x.astype(np.float16).astype(np.float32))
    if scheme == "int8":
        scale = _f16_scale_up(np.abs(x.reshape(-1, x.shape[-1])).max(axis=0) / 127.0)
        return np.broadcast_to(scale.astype(np.float32) / 2, x.shape)
    g = x.reshape(-1, group_size)
    scale = _f16_scale_up(np.abs(g).max(axis=1) / 7.0).astype(np.float32)
    return np.broadcast_to((scale / 2)[:, None], g.shape).reshape(x.shape)


# The wire's authentication: the service and the edge client read the bearer token alike, and
# both compare it as UTF-8 bytes (HTTP header values are bytes; http.client would send latin-1).

def read_token(token_file: str | None) -> str:
    """Bearer token from a file (first line, UTF-8) or $ESRT_SERVE_TOKEN; anything unusable
    (missing, not UTF-8 text, control characters) -> one-line SystemExit."""
    if token_file:
        p = Path(token_file)
        if not p.is_file():
            raise SystemExit(f"error: token file {p} does not exist")
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise SystemExit(f"error: token file {p} is not UTF-8 text (a binary file?)") from None
        except OSError as e:
            raise SystemExit(f"error: cannot read token file {p}: {e.strerror or e}") from None
        lines = text.strip().splitlines()
        token, where = (lines[0].strip() if lines else ""), f"token file {p}"
    else:
        token, where = os.environ.get("ESRT_SERVE_TOKEN", ""), "$ESRT_SERVE_TOKEN"
    if not token:
        raise SystemExit("error: no bearer token: pass --token-file FILE or set ESRT_SERVE_TOKEN")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in token):  # would break (or inject into) the header
        raise SystemExit(f"error: the bearer token in {where} contains control characters")
    try:
        token.encode("utf-8")
    except UnicodeEncodeError:  # $ESRT_SERVE_TOKEN with bytes that are not UTF-8 (surrogate escapes)
        raise SystemExit(f"error: the bearer token in {where} is not UTF-8 text") from None
    return token


def authorization(token: str) -> str:
    """The `Authorization` header value for `token` as http.client sends it: the str whose latin-1
    encoding is the UTF-8 bytes of `Bearer <token>` (what the service compares)."""
    return f"Bearer {token}".encode("utf-8").decode("latin-1")
