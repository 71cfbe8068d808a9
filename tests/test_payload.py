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
