"""Training-only audio augmentation (`data.augment`): deterministic per example, shape-preserving,
applied to training batches and never to eval batches."""

from __future__ import annotations

import numpy as np
import pytest

from esrt_jax import audio as audio_lib
from esrt_jax.config import ConfigError, from_dict
from esrt_jax.data import augment as A
from esrt_jax.data import pipeline as P
from esrt_jax.data import records as R
from helpers_tokenizer import tiny_tokenizer
from test_data_helpers import write_corpus

AUG = A.AugmentConfig(speed=0.1, noise_snr=(20.0, 30.0), noise_prob=1.0, freq_masks=2,
                      freq_mask_width=10, time_masks=2, time_mask_width=5)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("aug_corpus"), n_sent=2)


def cfg_of(jsonl, augment):
    return P.DataConfig(train=(str(jsonl),), tasks={"asr": 1.0}, batch_size=4, n_mels=80,
                        features="mel", text_buckets=(32, 64), shard_index=0, shard_count=1,
                        seed=3, augment=augment)


def test_functions_are_deterministic_and_keep_shapes():
    wav = np.sin(np.arange(4000) / 7.0).astype(np.float32)
    a = A.perturb_waveform(wav, AUG, A.example_rng(0, 5))
    np.testing.assert_array_equal(a, A.perturb_waveform(wav, AUG, A.example_rng(0, 5)))
    assert a.dtype == np.float32 and 0.88 * len(wav) < len(a) < 1.13 * len(wav)
    assert not np.array_equal(a, A.perturb_waveform(wav, AUG, A.example_rng(0, 6)))
    mel = np.random.default_rng(0).standard_normal((80, 300)).astype(np.float32)
    m = A.mask_mel(mel, 200, AUG, A.example_rng(0, 5))
    assert m.shape == mel.shape and m.dtype == mel.dtype
    np.testing.assert_array_equal(m, A.mask_mel(mel, 200, AUG, A.example_rng(0, 5)))
    np.testing.assert_array_equal(m[:, 200:], mel[:, 200:])  # the padding after the clip is left alone
    assert (m != mel).any()
    off = A.AugmentConfig()
    assert not off.enabled
    np.testing.assert_array_equal(A.perturb_waveform(wav, off, A.example_rng(0, 5)), wav)


class _Draw:
    """An rng whose uniform() returns a chosen value: a warp factor we know."""

    def __init__(self, value):
        self.value = value

    def uniform(self, low, high):
        assert low <= self.value <= high
        return self.value


def test_warp_moves_a_tone_by_the_factor():
    """A 1 kHz tone's mel peak moves to the filter nearest a * 1 kHz; the padding is left alone."""
    t = np.arange(audio_lib.SAMPLE_RATE) / audio_lib.SAMPLE_RATE
    wav = (0.3 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32)
    mel = audio_lib.log_mel_spectrogram(audio_lib.pad_or_trim(wav), 80)  # the tone fills frames < 100
    centres = audio_lib.mel_centers_hz(80)
    cfg = A.AugmentConfig(freq_warp=0.2)
    assert cfg.enabled and cfg.mel and not cfg.masks
    for a in (0.8, 1.0, 1.2):
        w = A.warp_mel(mel, 100, cfg, _Draw(a))
        assert w.shape == mel.shape and w.dtype == mel.dtype
        peak = centres[int(w[:, 50].argmax())]
        assert abs(peak - a * 1000.0) <= 0.06 * a * 1000.0, (a, peak)
        np.testing.assert_array_equal(w[:, 100:], mel[:, 100:])
    np.testing.assert_array_equal(A.warp_mel(mel, 100, cfg, _Draw(1.0)), mel)
    np.testing.assert_array_equal(A.warp_mel(mel, 100, A.AugmentConfig(), None), mel)  # off: no draw
    w = A.warp_mel(mel, 100, cfg, A.example_rng(0, 5))
    np.testing.assert_array_equal(w, A.warp_mel(mel, 100, cfg, A.example_rng(0, 5)))


def test_config_validation():
    cfg = from_dict(P.DataConfig, {"augment": {"speed": 0.1, "noise_snr": [10, 30]}})
    assert cfg.augment.speed == 0.1 and cfg.augment.noise_snr == (10.0, 30.0)
    with pytest.raises(ConfigError, match=r"augment\.noise_snr: must be \[\] or \[low, high\]"):
        from_dict(P.DataConfig, {"augment": {"noise_snr": [10]}})
    with pytest.raises(ConfigError, match=r"augment: mel masks and freq_warp need features: mel"):
        from_dict(P.DataConfig, {"features": "audio", "augment": {"time_masks": 1, "time_mask_width": 3}})
    with pytest.raises(ConfigError, match=r"augment: mel masks and freq_warp need features: mel"):
        from_dict(P.DataConfig, {"features": "audio", "augment": {"freq_warp": 0.1}})
    with pytest.raises(ConfigError, match=r"augment\.freq_warp: must be in \[0, 0\.5\)"):
        from_dict(P.DataConfig, {"augment": {"freq_warp": 0.5}})
    with pytest.raises(ConfigError, match=r"augment: cannot augment cached encoder outputs"):
        from_dict(P.DataConfig, {"encoder_cache": "x", "augment": {"speed": 0.1}})


def test_train_batches_only(corpus):
    tok = tiny_tokenizer()
    plain = next(P.make_train_iterator(cfg_of(corpus, A.AugmentConfig()), tok))
    aug = next(P.make_train_iterator(cfg_of(corpus, AUG), tok))
    again = next(P.make_train_iterator(cfg_of(corpus, AUG), tok))
    assert aug["mel"].shape == plain["mel"].shape and aug["mel"].dtype == plain["mel"].dtype
    np.testing.assert_array_equal(aug["record"], plain["record"])  # same examples, other audio
    np.testing.assert_array_equal(aug["tokens"], plain["tokens"])
    for i in range(4):
        assert not np.array_equal(aug["mel"][i], plain["mel"][i])
    np.testing.assert_array_equal(aug["mel"], again["mel"])
    # Eval batches never: exactly the plain features of each record.
    src = R.JsonlSource(corpus)
    ev = next(P.make_eval_batches(cfg_of(corpus, AUG), tok, src, "asr"))
    for i in range(4):
        want = audio_lib.log_mel_spectrogram(audio_lib.pad_or_trim(audio_lib.load_audio(src[i].audio)), 80)
        np.testing.assert_array_equal(ev["mel"][i], want)
