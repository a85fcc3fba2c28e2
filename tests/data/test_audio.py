"""Audio decoding: resampling, downmixing, and a reason for every failure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import write_clip
from toolkit.data.audio import MAX_PEAK, AudioError, decode_audio


def test_resample_and_downmix(tmp_path: Path) -> None:
    write_clip(tmp_path / "a.wav", 2.0, sr=44_100, channels=2)
    audio = decode_audio(str(tmp_path / "a.wav"))
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - 32_000) <= 2


def test_bytes_input(tmp_path: Path) -> None:
    write_clip(tmp_path / "a.flac", 1.0, sr=8_000)
    audio = decode_audio((tmp_path / "a.flac").read_bytes())
    assert len(audio) == 16_000


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: None, "missing file"),
        (lambda p: p.write_bytes(b""), "unreadable or corrupt audio"),
        (lambda p: p.write_bytes(b"RIFF\x00\x00garbage" * 10), "unreadable or corrupt audio"),
        (lambda p: sf.write(p, np.zeros(0, dtype=np.float32), 16_000), "empty audio"),
        (lambda p: sf.write(p, np.array([0.1, np.nan, 0.2], dtype=np.float32), 16_000, subtype="FLOAT"), "NaN or Inf"),
    ],
)
def test_failures_have_reasons(tmp_path: Path, make, reason: str) -> None:  # noqa: ANN001
    path = tmp_path / "x.wav"
    make(path)
    with pytest.raises(AudioError) as info:
        decode_audio(str(path))
    assert info.value.reason.startswith(reason)


def write_loud_clip(path: Path, peak: float, sr: int = 16_000) -> None:
    """A real-ish float32 clip (the tone of write_clip) with one sample set to ``peak``: x[50] = peak."""
    write_clip(path, 1.0, sr=sr)
    samples, _ = sf.read(path, dtype="float32")
    samples[50] = peak
    sf.write(path, samples, sr, subtype="FLOAT")


def test_absurd_amplitude_is_skipped_and_its_features_would_be_nan(tmp_path: Path) -> None:
    """A finite 1e30 sample passed the NaN/Inf check, and its log-mel was NaN: it must be refused."""
    from transformers import WhisperFeatureExtractor

    write_loud_clip(tmp_path / "loud.wav", 1e30)
    with pytest.raises(AudioError) as info:
        decode_audio(str(tmp_path / "loud.wav"))
    assert info.value.reason == "absurd amplitude (peak 1e+30)"
    extractor = WhisperFeatureExtractor()
    raw, _ = sf.read(tmp_path / "loud.wav", dtype="float32")
    assert not np.isfinite(extractor([raw], sampling_rate=16_000, return_tensors="np").input_features).all()
    # The loudest clip that passes (resampled, which may overshoot) still has finite features.
    write_loud_clip(tmp_path / "edge.wav", MAX_PEAK, sr=44_100)
    audio = decode_audio(str(tmp_path / "edge.wav"))
    assert np.isfinite(extractor([audio], sampling_rate=16_000, return_tensors="np").input_features).all()


def test_float_audio_slightly_over_full_scale_is_kept(tmp_path: Path) -> None:
    write_loud_clip(tmp_path / "hot.wav", 1.5)
    assert float(np.abs(decode_audio(str(tmp_path / "hot.wav"))).max()) == pytest.approx(1.5)


def test_speech_bounds_trim_leading_and_trailing_silence() -> None:
    from toolkit.data.audio import speech_bounds

    sr = 16_000
    rng = np.random.default_rng(0)
    audio = np.concatenate([np.zeros(sr // 2), 0.3 * rng.standard_normal(sr), 1e-4 * rng.standard_normal(sr // 4)])
    start, end = speech_bounds(audio.astype(np.float32))
    assert start == pytest.approx(0.5) and end == pytest.approx(1.5)
    assert speech_bounds(np.zeros(sr, dtype=np.float32)) is None
    assert speech_bounds(np.zeros(0, dtype=np.float32)) is None
    assert speech_bounds(np.ones(100, dtype=np.float32)) == (0.0, 100 / sr)  # shorter than a frame
