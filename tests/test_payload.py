import json
import struct
import zlib

import numpy as np
import pytest

from esrt_jax.infer import payload as pl

FP = "abc123"


@pytest.fixture(scope="module")
def feats():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 64)).astype(np.float32)
    x[:, 3] *= 20  # one loud channel, as LLM embeddings have
    return x


@pytest.mark.parametrize("compress", [False, True])
def test_fp16_exact(feats, compress):
    buf = pl.encode(feats, fingerprint=FP, scheme="fp16", compress=compress)
    out = pl.decode(buf, fingerprint=FP, split="projector", shape=feats.shape)
    np.testing.assert_array_equal(out.features, feats.astype(np.float16).astype(np.float32))
    assert (out.fingerprint, out.split, out.scheme) == (FP, "projector", "fp16")


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("compress", [False, True])
def test_quantised_within_bound(feats, scheme, compress):
    buf = pl.encode(feats, fingerprint=FP, scheme=scheme, group_size=16, compress=compress)
    out = pl.decode(buf).features
    bound = pl.error_bound(feats, scheme, group_size=16)
    err = np.abs(out - feats)
    assert np.all(err <= bound * (1 + 1e-5) + 1e-7), float((err - bound).max())
    assert err.max() > 0  # it really is lossy
    # and the bound is meaningful: a few percent of the scale of the data
    assert bound.mean() < 0.1 * np.abs(feats).mean() * (20 if scheme == "int4" else 1)


def test_sizes_shrink():
    x = np.random.default_rng(1).normal(size=(80, 512)).astype(np.float32)
    n = {s: len(pl.encode(x, fingerprint=FP, scheme=s)) for s in pl.SCHEMES}
    assert n["int8"] < 0.6 * n["fp16"] and n["int4"] < 0.6 * n["int8"]


def test_zero_features_roundtrip():
    z = np.zeros((4, 32), np.float32)
    for s in pl.SCHEMES:
        np.testing.assert_array_equal(pl.decode(pl.encode(z, fingerprint=FP, scheme=s)).features, z)


def _refresh_crc(buf: bytes) -> bytes:
    body = buf[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize("mutate, err, msg", [
    (lambda b: b"XXXXXX" + b[6:], pl.BadMagic, "not an esrt-jax payload"),
    (lambda b: _refresh_crc(b[:6] + struct.pack("<H", 9) + b[8:]), pl.UnsupportedVersion, "version 9"),
    (lambda b: b[:10], pl.Truncated, "shorter than the fixed prefix"),
    (lambda b: b[:-100], pl.Truncated, "does not match its header"),
    (lambda b: b[:-50] + bytes([b[-50] ^ 0xFF]) + b[-49:], pl.ChecksumMismatch, "checksum mismatch"),
    (lambda b: _refresh_crc(b[:12] + b"[" + b[13:]), pl.PayloadError, "header is malformed"),
])
def test_malformed_rejected(feats, mutate, err, msg):
    buf = pl.encode(feats, fingerprint=FP, scheme="int8")
    with pytest.raises(err, match=msg):
        pl.decode(mutate(buf))


def test_wrong_model_and_oversize(feats):
    buf = pl.encode(feats, fingerprint=FP, scheme="fp16")
    with pytest.raises(pl.Mismatch, match="shape"):
        pl.decode(buf, shape=(80, 64))
    with pytest.raises(pl.Mismatch, match="made by model"):
        pl.decode(buf, fingerprint="other")
    with pytest.raises(pl.Mismatch, match="split point"):
        pl.decode(buf, split="qformer")
    with pytest.raises(pl.Oversize) as e:
        pl.decode(buf, max_bytes=1000)
    assert e.value.status == 413
    assert pl.Mismatch("x").status == 422 and pl.ChecksumMismatch("x").status == 400


def test_encode_rejects_bad_input(feats):
    with pytest.raises(ValueError, match="NaN"):
        pl.encode(np.full((2, 4), np.nan), fingerprint=FP)
    with pytest.raises(ValueError, match="float16's range"):
        pl.encode(np.full((2, 4), 1e6, np.float32), fingerprint=FP, scheme="int8")
    with pytest.raises(ValueError, match="group_size"):
        pl.encode(feats, fingerprint=FP, scheme="int4", group_size=7)
    with pytest.raises(ValueError, match="split point"):
        pl.encode(feats, fingerprint=FP, split="encoder")


# ----------------------------------------------------------------------------- crafted input


def _with_header(buf: bytes, header: bytes | str, *, body: bytes | None = None) -> bytes:
    """`buf` with its header replaced (prefix length updated, CRC recomputed)."""
    header = header.encode() if isinstance(header, str) else header
    _, _, hlen = struct.unpack_from("<6sHI", buf)
    body = buf[12 + hlen:-4] if body is None else body
    return _refresh_crc(struct.pack("<6sHI", pl.MAGIC, pl.VERSION, len(header)) + header + body + b"\0\0\0\0")


def _header(buf: bytes) -> dict:
    _, _, hlen = struct.unpack_from("<6sHI", buf)
    return json.loads(buf[12:12 + hlen])


@pytest.mark.parametrize("name, edit", [
    ("deep nesting", lambda h: "[" * 100_000 + "]" * 100_000),
    ("deep nesting in a field", lambda h: json.dumps({**h, "shape": 0})[:-1] + ',"x":' + "[" * 5000 + "]" * 5000 + "}"),
    ("huge float", lambda h: json.dumps(h).replace(f'"data_nbytes": {h["data_nbytes"]}', '"data_nbytes": 1e999')),
    ("Infinity", lambda h: json.dumps(h).replace(f'"group_size": {h["group_size"]}', '"group_size": Infinity')),
    ("NaN", lambda h: json.dumps(h).replace(f'"scales_nbytes": {h["scales_nbytes"]}', '"scales_nbytes": NaN')),
    ("huge int", lambda h: json.dumps({**h, "shape": [10 ** 40, 64]})),
    ("float dim", lambda h: json.dumps({**h, "shape": [30.5, 64]})),
    ("bool dim", lambda h: json.dumps({**h, "shape": [True, 64]})),
    ("not an object", lambda h: json.dumps([h])),
    ("oversized header", lambda h: json.dumps({**h, "pad": "x" * 100_000})),
])
@pytest.mark.parametrize("crc_ok", [True, False])
def test_crafted_headers_raise_only_payload_errors(feats, name, edit, crc_ok):
    buf = pl.encode(feats, fingerprint=FP, scheme="int8")
    bad = _with_header(buf, edit(_header(buf)))
    if not crc_ok:  # the checksum-mismatch branch reads the header too
        bad = bad[:-4] + bytes([bad[-4] ^ 1]) + bad[-3:]
    with pytest.raises(pl.PayloadError):
        pl.decode(bad, max_bytes=1 << 20)


def test_non_finite_features_rejected(feats):
    """A well-formed fp16 body (or float16 scale) can still hold NaN/Inf bits."""
    for scheme in pl.SCHEMES:
        buf = pl.encode(feats, fingerprint=FP, scheme=scheme, group_size=16)
        h = _header(buf)
        _, _, hlen = struct.unpack_from("<6sHI", buf)
        body = bytearray(buf[12 + hlen:-4])
        body[0:2] = np.float16(np.nan).tobytes()  # first fp16 value or first scale
        with pytest.raises(pl.PayloadError, match="NaN or Inf") as e:
            pl.decode(_with_header(buf, json.dumps(h), body=bytes(body)))
        assert e.value.status == 400


def test_decompression_bomb_rejected():
    """A zstd body may not expand beyond what the size limit allows, whatever the header claims."""
    x = np.zeros((4096, 1024), np.float32)
    buf = pl.encode(x, fingerprint=FP, scheme="fp16", compress=True)
    assert len(buf) < 100_000
    with pytest.raises(pl.PayloadError, match="decoded size"):
        pl.decode(buf, max_bytes=200_000)


def _mutations(rng: np.random.Generator, buf: bytes):
    """Structured mutations of a valid payload: bit flips, truncations, header field edits."""
    h = _header(buf)
    values = [None, True, -1, 0, 1, 2 ** 31, 2 ** 64, 10 ** 30, 1.5, 1e308, "1e999", "x", "fp16", "int8",
              "int4", "zstd", "qformer", [], [0], [-1, 64], [2 ** 40, 2 ** 40], {}, {"a": 1}, "é" * 10]
    raw_numbers = ["1e999", "-1e999", "Infinity", "-Infinity", "NaN", "1" * 5000, "[" * 3000 + "]" * 3000,
                   "1e-999", "-0", "0.0", "9" * 400 + ".5"]
    kind = rng.integers(9)
    if kind == 0:  # flip 1-8 random bits (CRC usually fails: the mismatch branch is exercised)
        b = bytearray(buf)
        for _ in range(rng.integers(1, 9)):
            i = int(rng.integers(len(b)))
            b[i] ^= 1 << int(rng.integers(8))
        return bytes(b)
    if kind == 1:  # flip bits then refresh the CRC: the parser sees it
        b = bytearray(buf)
        for _ in range(rng.integers(1, 9)):
            i = int(rng.integers(len(b) - 4))
            b[i] ^= 1 << int(rng.integers(8))
        return _refresh_crc(bytes(b))
    if kind == 2:  # truncate / extend, with or without a fresh CRC
        cut = int(rng.integers(len(buf) + 64))
        b = buf[:cut] if cut <= len(buf) else buf + rng.bytes(cut - len(buf))
        return _refresh_crc(b) if rng.random() < 0.5 and len(b) >= 4 else b
    if kind == 3:  # a header field set to another JSON value
        k = list(h)[rng.integers(len(h))]
        return _with_header(buf, json.dumps({**h, k: values[rng.integers(len(values))]}))
    if kind == 4:  # a header field set to raw JSON text (non-finite, huge, deeply nested)
        k = list(h)[rng.integers(len(h))]
        text = json.dumps({**h, k: "@@"}).replace('"@@"', raw_numbers[rng.integers(len(raw_numbers))])
        return _with_header(buf, text)
    if kind == 5:  # field removed / extra field / whole header replaced by random JSON-ish bytes
        r = rng.integers(3)
        if r == 0:
            k = list(h)[rng.integers(len(h))]
            return _with_header(buf, json.dumps({a: v for a, v in h.items() if a != k}))
        if r == 1:
            return _with_header(buf, json.dumps({**h, "extra": values[rng.integers(len(values))]}))
        return _with_header(buf, bytes(rng.choice(list(b'{}[]":,0123456789eE.-+ truefalsnI'), size=rng.integers(1, 200))))
    if kind == 6:  # the prefix's header length lies
        _, _, hlen = struct.unpack_from("<6sHI", buf)
        new = int(rng.choice([0, 1, hlen - 1, hlen + 1, 2 ** 32 - 1, int(rng.integers(2 ** 32))]))
        b = buf[:8] + struct.pack("<I", new) + buf[12:]
        return _refresh_crc(b) if rng.random() < 0.5 else b
    if kind == 7:  # shape and sizes changed consistently (valid header, body too short/long)
        shp = [int(rng.integers(1, 64)), h["shape"][-1]]
        s_n, d_n = pl.expected_sizes(tuple(shp), h["scheme"], h["group_size"] or 32)
        return _with_header(buf, json.dumps({**h, "shape": shp, "scales_nbytes": s_n, "data_nbytes": d_n}))
    # random garbage after a valid magic/version
    return _refresh_crc(buf[:8] + rng.bytes(int(rng.integers(4, 300))))


def test_fuzz_decode_raises_only_payload_errors():
    """Thousands of structured mutations: decode either returns finite features of the header's
    shape or raises a `PayloadError`; nothing else escapes (seeded, a few seconds)."""
    rng = np.random.default_rng(1234)
    x = rng.normal(size=(6, 32)).astype(np.float32)
    valid = [pl.encode(x, fingerprint=FP, scheme=s, group_size=16, compress=c)
             for s in pl.SCHEMES for c in (False, True)]
    counts = {"ok": 0, "rejected": 0}
    for i in range(15000):
        bad = _mutations(rng, valid[i % len(valid)])
        try:
            p = pl.decode(bad, max_bytes=1 << 16)
        except pl.PayloadError as e:
            assert e.status in (400, 413, 422)
            counts["rejected"] += 1
            continue
        except Exception as e:  # noqa: BLE001 - the point of the test
            raise AssertionError(f"mutation {i} raised {type(e).__name__}: {e!r:.200}") from None
        assert np.all(np.isfinite(p.features)) and p.features.dtype == np.float32
        counts["ok"] += 1
    assert counts["rejected"] > 12000, counts
