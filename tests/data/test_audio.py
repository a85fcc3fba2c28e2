"""Audio decoding: resampling, downmixing, and a reason for every failure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import write_clip
from toolkit.data.audio import AudioError, decode_audio


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
