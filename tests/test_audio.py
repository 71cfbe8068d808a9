"""Audio front end: decoding, bad input, resampling, Whisper log-mel parity (numpy and jax)."""

import warnings

import jax
import numpy as np
import pytest
import soundfile as sf

from esrt_jax import audio as A

SR = A.SAMPLE_RATE


def _tone(seconds, sr, freq=440.0, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t) + noise * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def clips():
    """Waveforms exercising padding (short), trimming (long), silence and loud noise."""
    rng = np.random.default_rng(1)
    return {
        "tone7s": _tone(7.0, SR),
        "noise31s": (0.5 * rng.standard_normal(31 * SR)).astype(np.float32),
        "silence": np.zeros(SR, np.float32),
        "chirp": np.sin(2 * np.pi * np.cumsum(np.linspace(50, 7900, 12 * SR)) / SR).astype(np.float32),
    }


@pytest.fixture(scope="module")
def jax_mel():
    return jax.jit(A.log_mel_spectrogram_jax, static_argnums=1)


# ---------------------------------------------------------------- log-mel parity


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_transformers(n_mels):
    from transformers.audio_utils import mel_filter_bank

    ref = mel_filter_bank(
        num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0, max_frequency=8000.0,
        sampling_rate=16000, norm="slaney", mel_scale="slaney",
    )
    ours = A.mel_filters(n_mels)
    assert ours.shape == (201, n_mels)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
    assert A.mel_filters(n_mels) is ours  # cached


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_whisper_feature_extractor(clips, n_mels):
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=n_mels)
    for name, clip in clips.items():
        ours = A.log_mel_spectrogram(clip, n_mels)
        assert ours.shape == (n_mels, 3000) and ours.dtype == np.float32, name
        # The extractor's numpy path (what transformers uses without torch).
        ref_np = fe._np_extract_fbank_features(A.pad_or_trim(clip)[None], "cpu")[0]
        np.testing.assert_allclose(ours, ref_np, rtol=0, atol=1e-5, err_msg=name)
        # The public call runs a float32 torch STFT when torch is installed: ~1e-5, worst 6e-5.
        ref = fe(clip, sampling_rate=16000, return_tensors="np").input_features[0]
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_jax_matches_numpy(clips, jax_mel, n_mels):
    batch = np.stack([A.pad_or_trim(c) for c in clips.values()])
    ref = A.log_mel_spectrogram_batch(list(clips.values()), n_mels)
    assert ref.shape == (len(clips), n_mels, 3000)
    out = np.asarray(jax_mel(batch, n_mels))
    assert out.shape == ref.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)


def test_log_mel_bad_shapes(jax_mel):
    with pytest.raises(A.AudioError, match=r"expects a 1-D waveform, got shape \(2, 10\)"):
        A.log_mel_spectrogram(np.zeros((2, 10)))
    with pytest.raises(A.AudioError, match=r"expects \(B, 480000\) padded waveforms"):
        A.log_mel_spectrogram_jax(np.zeros((2, 1000), np.float32))
    with pytest.raises(ValueError, match="80 or 128 mel bins"):
        A.mel_filters(64)


def test_log_mel_unpadded_length():
    out = A.log_mel_spectrogram(_tone(2.0, SR), 80, pad=False)
    assert out.shape == (80, 200)


def test_pad_or_trim_numpy_and_jax():
    import jax.numpy as jnp

    assert A.pad_or_trim(np.ones(10), 4).tolist() == [1, 1, 1, 1]
    assert A.pad_or_trim(np.ones(2), 4).tolist() == [1, 1, 0, 0]
    assert A.pad_or_trim(np.ones((3, 5)), 8).shape == (3, 8)
    assert A.pad_or_trim(np.ones(7)).shape == (480000,)
    out = A.pad_or_trim(jnp.ones((2, 3)), 5)
    assert isinstance(out, jax.Array) and out.shape == (2, 5)


# ---------------------------------------------------------------- decoding and resampling


def test_load_wav_flac_ogg_roundtrip(tmp_path):
    clip = _tone(1.5, SR)
    for ext in ("wav", "flac", "ogg"):
        path = tmp_path / f"a.{ext}"
        sf.write(path, clip, SR)
        out = A.load_audio(path)
        assert out.dtype == np.float32 and out.ndim == 1 and out.size == clip.size, ext
        tol = 0.05 if ext == "ogg" else 1e-3  # ogg is lossy
        assert np.sqrt(np.mean((out - clip) ** 2)) < tol, ext


def _dominant_hz(x, sr):
    spec = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return np.argmax(spec) * sr / x.size


def test_resample_8k_mono_and_44k_stereo(tmp_path):
    # 8 kHz mono FLAC
    clip8 = _tone(2.0, 8000, freq=500.0, noise=0.0)
    sf.write(tmp_path / "a8k.flac", clip8, 8000)
    out = A.load_audio(tmp_path / "a8k.flac")
    assert out.size == 2 * SR
    assert abs(_dominant_hz(out, SR) - 500.0) < 2.0
    # 44.1 kHz stereo WAV: 440 Hz left, silent right -> the mono down-mix has half the amplitude
    left = _tone(3.0, 44100, freq=440.0, noise=0.0)
    stereo = np.stack([left, 0.0 * left], axis=1)
    sf.write(tmp_path / "a44.wav", stereo, 44100, subtype="FLOAT")
    out = A.load_audio(tmp_path / "a44.wav")
    assert out.ndim == 1 and abs(out.size - 3 * SR) <= 1
    assert abs(_dominant_hz(out, SR) - 440.0) < 2.0
    expected = 0.5 * 0.3 * np.sin(2 * np.pi * 440.0 * np.arange(out.size) / SR)
    mid = slice(SR // 10, out.size - SR // 10)  # ignore resampler edge transients
    assert np.max(np.abs(out[mid] - expected[mid])) < 2e-3


def test_prepare_audio_channel_layouts():
    mono = _tone(0.5, SR)
    both = np.stack([mono, mono])
    np.testing.assert_allclose(A.prepare_audio(both, SR), mono, atol=1e-7)  # (C, T)
    np.testing.assert_allclose(A.prepare_audio(both.T, SR), mono, atol=1e-7)  # (T, C)
    pcm = (mono * 32767).astype(np.int16)
    np.testing.assert_allclose(A.prepare_audio(pcm, SR), mono, atol=1e-4)
    np.testing.assert_allclose(A.prepare_audio(np.stack([pcm, pcm], 1), SR), mono, atol=1e-4)
    u8 = np.round(mono * 127 + 128).astype(np.uint8)
    np.testing.assert_allclose(A.prepare_audio(u8, SR), mono, atol=1e-2)


# ---------------------------------------------------------------- bad audio


def test_unreadable_file(tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    with pytest.raises(A.AudioError, match=r"broken\.wav: cannot read audio"):
        A.load_audio(bad)
    with pytest.raises(A.AudioError, match=r"missing\.flac: audio file does not exist"):
        A.load_audio(tmp_path / "missing.flac")


def test_empty_audio(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, np.float32), SR)
    with pytest.raises(A.AudioError, match=r"empty\.wav: audio is empty \(0 samples\)"):
        A.load_audio(path)
    with pytest.raises(A.AudioError, match=r"clip-7: audio is empty"):
        A.prepare_audio(np.zeros(0, np.float32), SR, source="clip-7")


def test_nan_and_inf_audio(tmp_path):
    path = tmp_path / "nan.wav"
    sf.write(path, np.full(1600, np.nan, np.float32), SR, subtype="FLOAT")
    with pytest.raises(A.AudioError, match=r"nan\.wav: audio has 1600 of 1600 samples that are NaN or Inf"):
        A.load_audio(path)
    x = np.zeros(100, np.float32)
    x[3] = np.inf
    with pytest.raises(A.AudioError, match=r"rec9: audio has 1 of 100 samples that are NaN or Inf"):
        A.prepare_audio(x, SR, source="rec9")


def test_wrong_shape_audio():
    with pytest.raises(A.AudioError, match=r"utt1: audio must be 1-D .* got shape \(2, 3, 100\)"):
        A.prepare_audio(np.zeros((2, 3, 100), np.float32), SR, source="utt1")
    with pytest.raises(A.AudioError, match=r"utt2: cannot tell samples from channels in shape \(20, 100\)"):
        A.prepare_audio(np.zeros((20, 100), np.float32), SR, source="utt2")
    with pytest.raises(A.AudioError, match=r"utt3: audio must be numeric samples"):
        A.prepare_audio(np.array(["a", "b"]), SR, source="utt3")
    with pytest.raises(A.AudioError, match=r"utt4: invalid sampling rate 0"):
        A.prepare_audio(np.zeros(10, np.float32), 0, source="utt4")
    with pytest.raises(A.AudioError, match=r"utt5: invalid sampling rate nan"):
        A.prepare_audio(np.zeros(10, np.float32), float("nan"), source="utt5")
    assert A.prepare_audio(np.zeros(10, np.float32), 16000.0).size == 10


def test_long_audio_trim_warns_or_errors(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, _tone(31.0, 8000), 8000)
    with pytest.warns(UserWarning, match=r"long\.wav: audio is 31\.00 s, longer than the 30 s limit; trimmed"):
        out = A.load_audio(path)
    assert out.size == A.N_SAMPLES
    with pytest.raises(A.AudioError, match=r"long\.wav: audio is 31\.00 s, longer than the 30 s limit"):
        A.load_audio(path, on_long="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert A.load_audio(path, max_seconds=None).size == 31 * SR
        assert A.load_audio(path, max_seconds=40).size == 31 * SR
    with pytest.raises(ValueError, match="on_long must be 'trim' or 'error'"):
        A.load_audio(path, on_long="drop")
