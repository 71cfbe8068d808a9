"""Audio front end: decode, down-mix, resample, pad/trim to 30 s, Whisper log-mel.

`load_audio` reads wav/flac/ogg (anything libsndfile reads) with soundfile, down-mixes to
mono and resamples to 16 kHz with soxr. `prepare_audio` does the same checks for arrays that
are already in memory (e.g. a Hugging Face datasets `{"array", "sampling_rate"}` dict).

`log_mel_spectrogram` is Whisper's feature extractor in numpy and reproduces transformers'
`WhisperFeatureExtractor` numpy path (same slaney mel filters, periodic Hann window, reflect
padding, float64 FFT rounded through complex64, log10 with floor 1e-10, dynamic range 8,
`(x + 4) / 4`). `log_mel_spectrogram_jax` is the batched, jittable `jax.numpy` version for
on-device use: (B, 480000) -> (B, n_mels, 3000).

Long recordings: the encoder sees one fixed window (30 s for Whisper, `num_frames / 100` s for
smaller test encoders: `window_seconds`). `find_segments` cuts longer audio into windows with an
energy-based voice-activity detector (pure numpy: 10 ms frame energies against a threshold between
the recording's noise floor and its loud frames; pauses of at least `min_pause` s are cut points;
neighbouring speech is packed up to the window; speech running longer than the window is cut at
its quietest frame in the window's second half, with `overlap` s repeated across the cut).
`mel_segments` is the front end both halves use on a file: (S, n_mels, num_frames) log-mel and the
`Segment`s (sample spans, seconds via `start_s`/`end_s`). Audio that fits one window is one
segment spanning all of it, so its features are exactly the unsegmented ones.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Literal, Sequence

import numpy as np
import soundfile as sf
import soxr

__all__ = [
    "AudioError",
    "SAMPLE_RATE",
    "N_FFT",
    "HOP_LENGTH",
    "CHUNK_SECONDS",
    "N_SAMPLES",
    "N_FRAMES",
    "load_audio",
    "mel_centers_hz",
    "prepare_audio",
    "pad_or_trim",
    "mel_filters",
    "log_mel_spectrogram",
    "log_mel_spectrogram_batch",
    "log_mel_spectrogram_jax",
    "mel_for_model",
    "mel_from_file",
    "Segment",
    "window_seconds",
    "encoder_frames",
    "find_segments",
    "mel_segments",
    "MIN_SECONDS",
    "check_speech",
]

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480000
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000

# A 2-D array with more "channels" than this is not audio we understand.
_MAX_CHANNELS = 8


class AudioError(ValueError):
    """Audio that cannot be used: unreadable, empty, non-finite or of the wrong shape."""


def load_audio(
    path: str | os.PathLike,
    *,
    sr: int = SAMPLE_RATE,
    max_seconds: float | None = CHUNK_SECONDS,
    on_long: Literal["trim", "error"] = "trim",
) -> np.ndarray:
    """Read an audio file as mono float32 at `sr` Hz: (T,).

    Audio longer than `max_seconds` is trimmed with a warning naming the file
    (`on_long="trim"`) or rejected (`on_long="error"`); `max_seconds=None` keeps everything.
    Raises AudioError naming the file for unreadable, empty or non-finite audio.
    """
    name = os.fspath(path)
    if not os.path.exists(name):
        raise AudioError(f"{name}: audio file does not exist")
    try:
        data, file_sr = sf.read(name, dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile raises its own error types; keep its message
        raise AudioError(f"{name}: cannot read audio ({type(e).__name__}: {e})") from e
    return prepare_audio(data, file_sr, source=name, sr=sr, max_seconds=max_seconds, on_long=on_long)


def prepare_audio(
    audio: np.ndarray,
    orig_sr: int,
    *,
    source: str = "<array>",
    sr: int = SAMPLE_RATE,
    max_seconds: float | None = CHUNK_SECONDS,
    on_long: Literal["trim", "error"] = "trim",
) -> np.ndarray:
    """Check, down-mix and resample an in-memory waveform: (T,) or (T, C) or (C, T) -> (T',).

    For 2-D input the smaller axis is taken as channels (soundfile gives (T, C), torchaudio
    and librosa give (C, T)). `source` names the audio in errors and warnings.
    """
    if on_long not in ("trim", "error"):
        raise ValueError(f"on_long must be 'trim' or 'error', got {on_long!r}")
    x = np.asarray(audio)
    if x.dtype.kind not in "fiu":
        raise AudioError(f"{source}: audio must be numeric samples, got dtype {x.dtype}")
    if x.ndim == 0 or x.ndim > 2:
        raise AudioError(
            f"{source}: audio must be 1-D (samples) or 2-D (samples x channels), got shape {x.shape}"
        )
    if x.dtype.kind in "iu":  # integer PCM -> [-1, 1): int16 / 32768, (uint8 - 128) / 128
        info = np.iinfo(x.dtype)
        scale = (float(info.max) - float(info.min) + 1.0) / 2.0
        offset = (float(info.max) + float(info.min) + 1.0) / 2.0
        x = (x.astype(np.float64) - offset) / scale
    if x.ndim == 2:
        ch_axis = int(np.argmin(x.shape))
        if x.shape[ch_axis] > _MAX_CHANNELS:
            raise AudioError(
                f"{source}: cannot tell samples from channels in shape {x.shape} "
                f"(expected at most {_MAX_CHANNELS} channels)"
            )
        x = x.astype(np.float32).mean(axis=ch_axis) if x.size else x.reshape(-1)
    if x.size == 0:
        raise AudioError(f"{source}: audio is empty (0 samples)")
    x = x.astype(np.float32, copy=False)
    finite = np.isfinite(x)
    if not finite.all():
        bad = int(x.size - finite.sum())
        raise AudioError(f"{source}: audio has {bad} of {x.size} samples that are NaN or Inf")
    if (
        not isinstance(orig_sr, (int, float, np.integer, np.floating))
        or not np.isfinite(orig_sr)
        or orig_sr <= 0
        or orig_sr != int(orig_sr)
    ):
        raise AudioError(f"{source}: invalid sampling rate {orig_sr!r}")
    if orig_sr != sr:
        x = soxr.resample(x, int(orig_sr), int(sr), quality="HQ").astype(np.float32, copy=False)
        if x.size == 0:
            raise AudioError(f"{source}: audio is empty after resampling from {orig_sr} Hz")
    if max_seconds is not None:
        limit = int(round(max_seconds * sr))
        if x.size > limit:
            msg = f"{source}: audio is {x.size / sr:.2f} s, longer than the {max_seconds:g} s limit"
            if on_long == "error":
                raise AudioError(msg)
            warnings.warn(f"{msg}; trimmed to {max_seconds:g} s", stacklevel=2)
            x = x[:limit]
    return np.ascontiguousarray(x)


def pad_or_trim(audio, n_samples: int = N_SAMPLES, *, axis: int = -1):
    """Zero-pad or cut `audio` along `axis` to exactly `n_samples` (numpy or jax arrays)."""
    length = audio.shape[axis]
    if length > n_samples:
        idx = [slice(None)] * audio.ndim
        idx[axis] = slice(0, n_samples)
        return audio[tuple(idx)]
    if length < n_samples:
        widths = [(0, 0)] * audio.ndim
        widths[axis] = (0, n_samples - length)
        if isinstance(audio, np.ndarray):
            return np.pad(audio, widths)
        import jax.numpy as jnp  # JAX only for jax arrays: the edge device's numpy path runs without it

        return jnp.pad(audio, widths)
    return audio


# ----------------------------------------------------------------------------- mel filters


def _hz_to_mel_slaney(freq: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    freq = np.asarray(freq, dtype=np.float64)
    mels = 3.0 * freq / 200.0
    log_region = freq >= 1000.0
    mels = np.where(log_region, 15.0 + np.log(np.maximum(freq, 1e-10) / 1000.0) * (27.0 / np.log(6.4)), mels)
    return mels


def _mel_to_hz_slaney(mels: np.ndarray) -> np.ndarray:
    mels = np.asarray(mels, dtype=np.float64)
    freq = 200.0 * mels / 3.0
    log_region = mels >= 15.0
    return np.where(log_region, 1000.0 * np.exp((np.log(6.4) / 27.0) * (mels - 15.0)), freq)


def mel_centers_hz(n_mels: int, sr: int = SAMPLE_RATE) -> np.ndarray:
    """(n_mels,) float64: the centre frequency (Hz) of each slaney mel filter of `log_mel_spectrogram`."""
    mel_pts = np.linspace(_hz_to_mel_slaney(0.0), _hz_to_mel_slaney(sr / 2.0), n_mels + 2)
    return _mel_to_hz_slaney(mel_pts)[1:-1]


@functools.lru_cache(maxsize=8)
def _mel_filters_cached(n_mels: int, n_fft: int, sr: int) -> np.ndarray:
    n_freqs = n_fft // 2 + 1
    mel_pts = np.linspace(_hz_to_mel_slaney(0.0), _hz_to_mel_slaney(sr / 2.0), n_mels + 2)
    filter_freqs = _mel_to_hz_slaney(mel_pts)  # (n_mels + 2,)
    fft_freqs = np.linspace(0, sr // 2, n_freqs)  # (n_freqs,)
    # Triangles: rising from f[i] to f[i+1], falling from f[i+1] to f[i+2].
    diff = np.diff(filter_freqs)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]  # (n_freqs, n_mels + 2)
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    filters = np.maximum(0.0, np.minimum(down, up))  # (n_freqs, n_mels)
    # Slaney normalisation: constant energy per channel.
    filters *= (2.0 / (filter_freqs[2 : n_mels + 2] - filter_freqs[:n_mels]))[None, :]
    filters.setflags(write=False)
    return filters


def mel_filters(n_mels: int = 80, *, n_fft: int = N_FFT, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Whisper's mel filterbank, slaney scale and norm, float64: (n_fft // 2 + 1, n_mels). Cached."""
    if n_mels not in (80, 128):
        raise ValueError(f"Whisper uses 80 or 128 mel bins, got n_mels={n_mels}")
    return _mel_filters_cached(int(n_mels), int(n_fft), int(sr))


@functools.lru_cache(maxsize=2)
def _hann(n_fft: int) -> np.ndarray:
    """Periodic Hann window (torch.hann_window / transformers' window_function), float64."""
    w = np.hanning(n_fft + 1)[:-1]
    w.setflags(write=False)
    return w


# ----------------------------------------------------------------------------- numpy log-mel


def log_mel_spectrogram(audio: np.ndarray, n_mels: int = 80, *, pad: bool = True) -> np.ndarray:
    """Whisper log-mel features of one mono 16 kHz waveform: (T,) -> (n_mels, T // 160) float32.

    With `pad=True` (default) the audio is first padded/trimmed to 30 s, giving (n_mels, 3000),
    the same as `WhisperFeatureExtractor(feature_size=n_mels)(audio, sampling_rate=16000)`.
    """
    x = np.asarray(audio)
    if x.ndim != 1:
        raise AudioError(f"log_mel_spectrogram expects a 1-D waveform, got shape {x.shape}")
    x = x.astype(np.float32, copy=False)  # the extractor works from float32 samples
    if pad:
        x = pad_or_trim(x, N_SAMPLES)
    if x.size <= N_FFT // 2:
        raise AudioError(f"waveform of {x.size} samples is too short for a {N_FFT}-point STFT")
    filters = mel_filters(n_mels)
    window = _hann(N_FFT)
    padded = np.pad(x, (N_FFT // 2, N_FFT // 2), mode="reflect").astype(np.float64)
    n_frames = 1 + (padded.size - N_FFT) // HOP_LENGTH
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH][: n_frames - 1]
    # The reference stores the FFT in complex64 before taking magnitudes; do the same so the
    # result matches to float32 rounding. The last frame is dropped, as in Whisper.
    spec = np.fft.rfft(frames * window, axis=-1).astype(np.complex64)
    power = np.abs(spec, dtype=np.float64) ** 2  # (frames, n_freqs)
    mel = np.maximum(1e-10, filters.T @ power.T)  # (n_mels, frames)
    log_spec = np.log10(mel).astype(np.float32)
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def log_mel_spectrogram_batch(audios: Sequence[np.ndarray], n_mels: int = 80) -> np.ndarray:
    """Log-mel features for several waveforms, each padded/trimmed to 30 s: (B, n_mels, 3000)."""
    if len(audios) == 0:
        return np.zeros((0, n_mels, N_FRAMES), np.float32)
    return np.stack([log_mel_spectrogram(a, n_mels, pad=True) for a in audios])


# ----------------------------------------------------------------------------- jax log-mel


def log_mel_spectrogram_jax(audio, n_mels: int = 80):
    """Batched Whisper log-mel in jax.numpy: (B, 480000) float -> (B, n_mels, 3000) float32.

    Jittable (n_mels static). Computes in float32; run with
    `jax.default_matmul_precision("highest")` (or the global setting) to match the numpy
    version to ~1e-5.
    """
    import jax  # JAX only here: the numpy front end runs on an edge device without it
    import jax.numpy as jnp

    x = jnp.asarray(audio, jnp.float32)
    if x.ndim != 2 or x.shape[1] != N_SAMPLES:
        raise AudioError(
            f"log_mel_spectrogram_jax expects (B, {N_SAMPLES}) padded waveforms, got {x.shape}"
        )
    b = x.shape[0]
    half = N_FFT // 2
    padded = jnp.pad(x, ((0, 0), (half, half)), mode="reflect")  # (B, 480400)
    # Frames of 400 with hop 160 built from hop-sized chunks with static slices only (no
    # gather): frame i = chunk i ++ chunk i+1 ++ first 80 samples of chunk i+2.
    n_chunks = N_FRAMES + 3
    padded = jnp.pad(padded, ((0, 0), (0, n_chunks * HOP_LENGTH - padded.shape[1])))
    chunks = padded.reshape(b, n_chunks, HOP_LENGTH)
    tail = N_FFT - 2 * HOP_LENGTH
    frames = jnp.concatenate(
        [chunks[:, :N_FRAMES], chunks[:, 1 : N_FRAMES + 1], chunks[:, 2 : N_FRAMES + 2, :tail]],
        axis=-1,
    )  # (B, 3000, 400): the last Whisper frame is dropped, so only 3000 are built
    window = jnp.asarray(_hann(N_FFT), jnp.float32)
    spec = jnp.fft.rfft(frames * window, axis=-1)  # (B, 3000, 201)
    power = jnp.real(spec) ** 2 + jnp.imag(spec) ** 2
    filters = jnp.asarray(mel_filters(n_mels), jnp.float32)  # (201, n_mels)
    mel = jnp.einsum("btf,fm->bmt", power, filters, precision=jax.lax.Precision.HIGHEST)
    log_spec = jnp.log10(jnp.maximum(mel, 1e-10))
    peak = jnp.max(log_spec, axis=(1, 2), keepdims=True)
    log_spec = jnp.maximum(log_spec, peak - 8.0)
    return (log_spec + 4.0) / 4.0


# The front end both halves share (edge client, inference and evaluation CLIs).

def mel_for_model(audio: np.ndarray, n_mels: int, num_frames: int = N_FRAMES) -> np.ndarray:
    """(T,) 16 kHz waveform -> (n_mels, num_frames) log-mel: 30 s Whisper features, cut to the
    first `num_frames` frames for encoders smaller than Whisper's 3000 (tiny test models)."""
    if num_frames > N_FRAMES:
        raise ValueError(f"the encoder expects {num_frames} mel frames, more than Whisper's 30 s "
                         f"({N_FRAMES})")
    return log_mel_spectrogram(audio, n_mels, pad=True)[:, :num_frames]


def mel_from_file(path: str | os.PathLike, n_mels: int, num_frames: int = N_FRAMES
                  ) -> tuple[np.ndarray, float]:
    """Audio file -> (log-mel (n_mels, num_frames) of its first window, duration in seconds).

    No segmentation: audio longer than the encoder's window (`window_seconds(num_frames)`) is cut
    to it with a warning naming the file (`mel_segments` keeps all of it)."""
    wav = load_audio(path, max_seconds=None)
    check_speech(wav, os.fspath(path))
    _warn_cut(wav, num_frames, os.fspath(path))
    return mel_for_model(wav[:num_frames * HOP_LENGTH], n_mels, num_frames), wav.size / SAMPLE_RATE


def _warn_cut(wav: np.ndarray, num_frames: int, source: str) -> None:
    win = window_seconds(num_frames)
    if wav.size > num_frames * HOP_LENGTH:
        warnings.warn(f"{source}: audio is {wav.size / SAMPLE_RATE:.2f} s, longer than the model's "
                      f"{win:g} s window; cut to {win:g} s (segmentation is off)", stacklevel=3)


# ----------------------------------------------------------------------------- long recordings

# 10 ms analysis frames: the hop of the log-mel, so segment bounds fall on mel frame boundaries.
_VAD_FRAME = HOP_LENGTH
# Frames quieter than this (RMS, dB re full scale) are silence whatever the recording: below
# 16-bit dither, far below any speech.
_SILENCE_DBFS = -60.0


@dataclasses.dataclass(frozen=True)
class Segment:
    """One window of a recording: samples [start, end) at `sr` Hz."""

    start: int
    end: int
    sr: int = SAMPLE_RATE

    @property
    def start_s(self) -> float:
        return self.start / self.sr

    @property
    def end_s(self) -> float:
        return self.end / self.sr


def window_seconds(num_frames: int = N_FRAMES) -> float:
    """The encoder's window in seconds for `num_frames` mel frames (100 per second)."""
    return num_frames * HOP_LENGTH / SAMPLE_RATE


def encoder_frames(num_samples: int, max_frames: int = N_FRAMES // 2) -> int:
    """Whisper encoder frames (one per 2 mel hops, 20 ms) that cover `num_samples` of 16 kHz audio,
    in [1, max_frames]: the real length a Q-Former with `attend_padding: false` attends over."""
    return int(min(max_frames, max(1, -(-int(num_samples) // (2 * HOP_LENGTH)))))


REAL_WINDOW_BUCKET = 100  # mel frames (1 s): the "real" encoder windows come in few shapes, each compiled once


def real_window(enc_frames, full: int = N_FRAMES, bucket: int = REAL_WINDOW_BUCKET) -> int:
    """Mel frames of the "real" encoder window (`model.encoder_window: real`) of a batch whose rows
    cover `enc_frames` (B,) encoder frames: 2 mel frames per encoder frame for the longest row,
    rounded up to `bucket` (even), at most the `full` window."""
    need = 2 * int(np.max(np.asarray(enc_frames)))
    return int(min(full, max(bucket, -(-need // bucket) * bucket)))


def _frame_db(x: np.ndarray) -> np.ndarray:
    """(T,) -> (ceil(T / 160),) RMS per 10 ms frame in dB re full scale (floor -100)."""
    x = np.asarray(x, np.float32)
    full = x.size // _VAD_FRAME
    fr = x[:full * _VAD_FRAME].reshape(full, _VAD_FRAME)  # a view: no copy of a long recording
    power = np.einsum("ij,ij->i", fr, fr) / _VAD_FRAME
    if x.size > full * _VAD_FRAME:  # the last, partial frame
        tail = x[full * _VAD_FRAME:]
        power = np.append(power, np.dot(tail, tail) / tail.size)
    return 10.0 * np.log10(np.maximum(power.astype(np.float64), 1e-10))


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True in a 1-D bool array."""
    d = np.diff(np.r_[0, mask.astype(np.int8), 0])
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


# Shorter audio holds no word (find_segments drops speech runs under this too): refused on every
# path that takes audio (segmented or not, inference CLI, edge client, eval), not answered.
MIN_SECONDS = 0.1


def check_speech(audio: np.ndarray, source: str = "<array>", sr: int = SAMPLE_RATE) -> np.ndarray:
    """The one rule for audio worth decoding: at least `MIN_SECONDS` long and not silent (some 10 ms
    frame above -60 dBFS); else AudioError naming `source`. -> the frame energies (dB) of `audio`."""
    x = np.asarray(audio)
    if x.size < MIN_SECONDS * sr:
        raise AudioError(f"{source}: audio is {x.size / sr * 1000:.0f} ms long, shorter than the "
                         f"{MIN_SECONDS * 1000:.0f} ms minimum")
    db = _frame_db(x)
    if db.max() < _SILENCE_DBFS:
        raise AudioError(f"{source}: no speech found: the audio is silent (loudest 10 ms at "
                         f"{db.max():.0f} dBFS, below {_SILENCE_DBFS:.0f})")
    return db


def find_segments(audio: np.ndarray, max_seconds: float, *, sr: int = SAMPLE_RATE,
                  overlap: float | None = None, min_pause: float = 0.3, pad: float = 0.1,
                  source: str = "<array>") -> list[Segment]:
    """Cut a mono waveform (T,) into windows of at most `max_seconds`, at pauses -> [Segment], in order.

    Audio no longer than `max_seconds` is one segment [0, T). Longer audio: voice activity per
    10 ms frame (energy above max(-60 dBFS, floor + 0.4 (loud - floor)), floor and loud the 10th
    and 95th percentile frame energies); speech runs closer than `min_pause` s are joined, runs
    under 0.1 s dropped, each run widened by `pad` s; consecutive runs are packed into one segment
    while it stays within `max_seconds`; a run longer than that is cut at its quietest frame in the
    second half of the window, the next piece starting `overlap` s (default min(0.5, max / 10))
    before the cut. Raises AudioError naming `source` for empty or silent audio (no 10 ms frame
    above -60 dBFS).
    """
    x = np.asarray(audio)
    if x.ndim != 1:
        raise AudioError(f"{source}: find_segments expects a 1-D waveform, got shape {x.shape}")
    if x.size == 0:
        raise AudioError(f"{source}: audio is empty (0 samples)")
    if sr != SAMPLE_RATE:
        raise ValueError(f"find_segments works at {SAMPLE_RATE} Hz, got sr={sr}")
    win = int(round(max_seconds * sr)) // _VAD_FRAME  # frames per window
    if win < 10:
        raise ValueError(f"max_seconds={max_seconds} is shorter than 0.1 s")
    ov = int(round((min(0.5, max_seconds / 10) if overlap is None else overlap) * sr / _VAD_FRAME))
    if not 0 <= ov < win // 2:
        raise ValueError(f"overlap {overlap} s must be >= 0 and under half the {max_seconds} s window")
    db = check_speech(x, source, sr)
    if x.size <= win * _VAD_FRAME:
        return [Segment(0, x.size, sr)]
    n = db.size
    floor, loud = np.percentile(db, 10), np.percentile(db, 95)
    voiced = db >= max(_SILENCE_DBFS, floor + 0.4 * (loud - floor))
    gap, min_len, widen = (int(round(v * sr / _VAD_FRAME)) for v in (min_pause, 0.1, pad))
    runs: list[list[int]] = []
    for a, b in _runs(voiced):  # join runs split by pauses shorter than min_pause
        if runs and a - runs[-1][1] < gap:
            runs[-1][1] = b
        else:
            runs.append([a, b])
    runs = [r for r in runs if r[1] - r[0] >= min_len] or [max(runs, key=lambda r: r[1] - r[0])]
    spans = [(max(0, a - widen), min(n, b + widen)) for a, b in runs]
    pieces: list[tuple[int, int]] = []
    for a, b in spans:
        while b - a > win:  # speech longer than a window: cut at its quietest frame
            lo, hi = a + win // 2, a + win
            cut = hi - int(np.argmin(db[lo:hi][::-1]))  # the latest quietest frame boundary
            pieces.append((a, cut))
            a = cut - ov
        pieces.append((a, b))
    packed = [pieces[0]]
    for a, b in pieces[1:]:
        if b - packed[-1][0] <= win:
            packed[-1] = (packed[-1][0], b)
        else:
            packed.append((a, b))
    return [Segment(a * _VAD_FRAME, min(b * _VAD_FRAME, x.size), sr) for a, b in packed]


def mel_segments(path: str | os.PathLike, n_mels: int, num_frames: int = N_FRAMES, *,
                 segment: bool = True, **segment_kw) -> tuple[np.ndarray, list[Segment]]:
    """Audio file -> (log-mel (S, n_mels, num_frames), S `Segment`s): one row per window.

    `segment=False`: one window, the audio cut to it with a warning when longer (`mel_from_file`).
    `segment_kw` go to `find_segments`."""
    name = os.fspath(path)
    wav = load_audio(path, max_seconds=None)
    if not segment:
        check_speech(wav, name)  # the same rule as with segmentation
        _warn_cut(wav, num_frames, name)
        wav = wav[:num_frames * HOP_LENGTH]
        return mel_for_model(wav, n_mels, num_frames)[None], [Segment(0, wav.size)]
    segs = find_segments(wav, window_seconds(num_frames), source=name, **segment_kw)
    return np.stack([mel_for_model(wav[s.start:s.end], n_mels, num_frames) for s in segs]), segs
