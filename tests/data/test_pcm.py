"""The cache's audio codec: 16-bit FLAC plus a per-clip scale, within half a quantisation step."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.data import pcm
from toolkit.data.audio import SAMPLING_RATE


def speech_like(seconds: float, peak: float, seed: int = 0) -> np.ndarray:
    """A tone with noise and a slow envelope, normalised to ``peak`` (float32)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLING_RATE)) / SAMPLING_RATE
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 1.5 * t)
    signal = np.sin(2 * np.pi * 220 * t) * envelope + 0.1 * rng.standard_normal(t.shape)
    return (signal * (peak / np.abs(signal).max())).astype(np.float32)


def max_error(scale: float) -> float:
    """Half a quantisation step, plus float32 rounding of the samples and of the scale factor."""
    return 0.5 / pcm.FULL_SCALE * scale + 1e-6 * max(scale, 1.0)


@pytest.mark.parametrize("peak", [0.3, 0.999, 1.0, 5.0, 1e3])
def test_round_trip_is_within_half_a_step(peak: float) -> None:
    audio = speech_like(2.0, peak, seed=int(peak))
    flac, scale = pcm.encode(audio)
    samples = pcm.decode(flac)
    assert samples.dtype == np.int16 and samples.shape == audio.shape
    assert np.array_equal(samples, pcm.quantize(audio)[0])  # FLAC is lossless over the integers
    back = pcm.to_float(samples, scale)
    assert back.dtype == np.float32
    assert float(np.abs(back - audio).max()) <= max_error(scale)


def test_normal_audio_keeps_scale_one_and_full_range() -> None:
    audio = speech_like(1.0, 1.0)
    samples, scale = pcm.quantize(audio)
    assert scale == 1.0
    assert int(np.abs(samples.astype(np.int32)).max()) == 32767  # a peak of 1 is full scale, not clipped
    quiet_samples, quiet_scale = pcm.quantize(audio * 0.25)
    assert quiet_scale == 1.0 and int(np.abs(quiet_samples.astype(np.int32)).max()) == round(0.25 * 32767)


def test_loud_audio_keeps_its_shape() -> None:
    """Peak 5 (a float file that overshoots): stored divided by 5, nothing clipped."""
    audio = speech_like(1.0, 5.0)
    flac, scale = pcm.encode(audio)
    assert scale == pytest.approx(5.0, rel=1e-6)
    back = pcm.to_float(pcm.decode(flac), scale)
    assert float(np.abs(back).max()) == pytest.approx(5.0, abs=max_error(scale))
    assert float(np.abs(back - audio).max()) <= max_error(scale)
    # More than 1 % of the samples lie above 1 in magnitude: a clipping codec would flatten them.
    loud = np.abs(audio) > 1.0
    assert loud.mean() > 0.01
    assert np.allclose(back[loud], audio[loud], atol=max_error(scale))
    assert np.corrcoef(back, audio)[0, 1] > 0.999999


def test_silence_and_empty() -> None:
    silence = np.zeros(SAMPLING_RATE, dtype=np.float32)
    flac, scale = pcm.encode(silence)
    assert scale == 1.0
    samples = pcm.decode(flac)
    assert samples.dtype == np.int16 and len(samples) == SAMPLING_RATE and not samples.any()
    assert not pcm.to_float(samples, scale).any()
    empty, empty_scale = pcm.quantize(np.zeros(0, dtype=np.float32))
    assert empty.dtype == np.int16 and empty.size == 0 and empty_scale == 1.0


def test_negative_full_scale_does_not_wrap() -> None:
    """-1.0 is -32767 (symmetric), not a wrap-around past int16's range."""
    audio = np.array([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=np.float32)
    samples, scale = pcm.quantize(audio)
    assert scale == 1.0 and samples.tolist() == [-32767, -16384, 0, 16384, 32767]
    loud, loud_scale = pcm.quantize(np.array([-8.0, 2.0], dtype=np.float32))
    assert loud_scale == 8.0 and loud.tolist() == [-32767, 8192]


def test_flac_is_smaller_than_raw_16_bit() -> None:
    audio = speech_like(4.0, 0.8)
    flac, _ = pcm.encode(audio)
    raw_int16 = 2 * len(audio)
    assert flac[:4] == b"fLaC"
    assert len(flac) < raw_int16 < 4 * len(audio)
    # Silence costs next to nothing.
    assert len(pcm.encode(np.zeros(4 * SAMPLING_RATE, dtype=np.float32))[0]) < raw_int16 / 20
