"""Training-only audio augmentation (`data.augment`): speed perturbation, additive white noise and
SpecAugment-style masks of the log-mel.

A model trained on a few voices learns the voices along with the words; perturbing each training
example's audio (a new perturbation every time the example is drawn) makes what it hears vary more
than the words do. Applied by the training pipeline (`pipeline.make_train_dataset`) only; dev and
eval batches (`make_eval_batches`) are never augmented. Deterministic: the random draws of an
example come from `(data.seed, global example index)`, so a run, a resumed run and a multi-process
run see the same augmented batches.

    speed perturbation: the waveform resampled by a factor f ~ U[1 - speed, 1 + speed] (tempo and
      pitch together, as Kaldi's speed perturbation), by linear interpolation
    noise: with probability `noise_prob`, white noise at an SNR ~ U[noise_snr] dB over the clip
    frequency warp (vocal tract length perturbation): the log-mel's frequency axis scaled by a factor
      a ~ U[1 - freq_warp, 1 + freq_warp] (the spectrum at f moves to a * f: formants and pitch
      harmonics of a longer or shorter vocal tract, at the same tempo), before the masks
    masks: `freq_masks` bands of up to `freq_mask_width` mel bins and `time_masks` spans of up to
      `time_mask_width` frames (inside the clip, not its padding) set to the clip's mean log-mel
"""

from __future__ import annotations

import dataclasses

import numpy as np

from esrt_jax.audio import mel_centers_hz
from esrt_jax.config import check, setting

__all__ = ["AugmentConfig", "example_rng", "perturb_waveform", "warp_mel", "mask_mel"]

_STREAM = 0x5A7A  # separates augmentation draws from other users of (seed, key)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """`data.augment`: all off by default (the papers train without augmentation)."""

    speed: float = setting(0.0, help="max relative speed change (0.1: factor in [0.9, 1.1]); 0 = off")
    noise_snr: tuple[float, ...] = setting((), help="(low, high) dB of added noise; () = no noise")
    noise_prob: float = setting(0.5, help="share of examples that get noise (when noise_snr is set)")
    freq_warp: float = setting(0.0, help="max relative frequency scaling (0.1: factor in [0.9, 1.1]); 0 = off")
    freq_masks: int = setting(0, help="frequency masks per example")
    freq_mask_width: int = setting(0, help="mel bins, max per frequency mask")
    time_masks: int = setting(0, help="time masks per example")
    time_mask_width: int = setting(0, help="frames (10 ms), max per time mask")

    @property
    def enabled(self) -> bool:
        return self.waveform or self.mel

    @property
    def waveform(self) -> bool:
        return self.speed > 0 or bool(self.noise_snr)

    @property
    def mel(self) -> bool:
        """Anything applied to the log-mel (warp or masks)."""
        return self.freq_warp > 0 or self.masks

    @property
    def masks(self) -> bool:
        return (self.freq_masks > 0 and self.freq_mask_width > 0) or (
            self.time_masks > 0 and self.time_mask_width > 0)

    def validate(self) -> None:
        check(0 <= self.speed < 0.5, "speed", f"must be in [0, 0.5), got {self.speed}")
        check(0 <= self.freq_warp < 0.5, "freq_warp", f"must be in [0, 0.5), got {self.freq_warp}")
        check(len(self.noise_snr) in (0, 2), "noise_snr", f"must be [] or [low, high] dB, got {list(self.noise_snr)}")
        if self.noise_snr:
            check(self.noise_snr[0] <= self.noise_snr[1], "noise_snr", f"low > high: {list(self.noise_snr)}")
        check(0 <= self.noise_prob <= 1, "noise_prob", f"must be in [0, 1], got {self.noise_prob}")
        for name in ("freq_masks", "freq_mask_width", "time_masks", "time_mask_width"):
            check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")


def example_rng(seed: int, key: int) -> np.random.Generator:
    """The augmentation draws of global example `key` under data seed `seed`."""
    return np.random.default_rng([_STREAM, int(seed), int(key)])


def perturb_waveform(wav: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """(n,) float32 -> (m,) float32 (m ~ n / f): speed perturbation, then noise."""
    x = np.asarray(wav, np.float32)
    if cfg.speed > 0 and len(x) > 1:
        f = rng.uniform(1.0 - cfg.speed, 1.0 + cfg.speed)
        x = np.interp(np.arange(0.0, len(x) - 1, f), np.arange(len(x)), x).astype(np.float32)
    if cfg.noise_snr and rng.uniform() < cfg.noise_prob:
        snr = rng.uniform(*cfg.noise_snr)
        power = float(np.mean(x.astype(np.float64) ** 2))
        x = x + rng.standard_normal(len(x)).astype(np.float32) * np.float32(np.sqrt(power / 10 ** (snr / 10)))
    return x


def warp_mel(mel: np.ndarray, frames: int, cfg: AugmentConfig, rng: np.random.Generator,
             sr: int = 16000) -> np.ndarray:
    """(n_mels, T) log-mel -> a copy with its frequency axis scaled by a ~ U[1 -+ cfg.freq_warp]:
    row i takes the (linearly interpolated) log-mel at frequency centre_i / a, so what was at f
    is now at a * f (edge rows repeat past the band). `frames`: the clip's frames (the padding
    after them is left alone). Unchanged when `cfg.freq_warp` is 0 (no draw)."""
    out = np.array(mel, copy=True)
    if cfg.freq_warp <= 0:
        return out
    a = rng.uniform(1.0 - cfg.freq_warp, 1.0 + cfg.freq_warp)
    n_mels, t = out.shape
    frames = max(1, min(int(frames), t))
    centres = mel_centers_hz(n_mels, sr)
    pos = np.interp(centres / a, centres, np.arange(n_mels))  # fractional source row of each row
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_mels - 1)
    w = (pos - lo).astype(out.dtype)[:, None]
    clip = out[:, :frames]
    out[:, :frames] = clip[lo] * (1 - w) + clip[hi] * w
    return out


def mask_mel(mel: np.ndarray, frames: int, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """(n_mels, T) -> a masked copy, same shape and dtype. `frames`: the clip's frames (masks
    stay inside them; the padding after them is left alone)."""
    out = np.array(mel, copy=True)
    n_mels, t = out.shape
    frames = max(1, min(int(frames), t))
    fill = out[:, :frames].mean()
    for _ in range(cfg.freq_masks if cfg.freq_mask_width > 0 else 0):
        w = int(rng.integers(0, min(cfg.freq_mask_width, n_mels) + 1))
        lo = int(rng.integers(0, n_mels - w + 1))
        out[lo:lo + w, :frames] = fill
    for _ in range(cfg.time_masks if cfg.time_mask_width > 0 else 0):
        w = int(rng.integers(0, min(cfg.time_mask_width, frames) + 1))
        lo = int(rng.integers(0, frames - w + 1))
        out[:, lo:lo + w] = fill
    return out
