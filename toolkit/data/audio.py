"""Audio decoding: soundfile to read, a channel mean to downmix, soxr to resample to 16 kHz.

No torchcodec: its wheels need CUDA libraries, and soundfile covers WAV/FLAC/OGG/MP3.
Every failure becomes an :class:`AudioError` with a short, loggable reason.
"""

from __future__ import annotations

import io
import os

import numpy as np
import soundfile as sf
import soxr

SAMPLING_RATE = 16_000

MAX_PEAK = 1e3
"""Largest believable sample magnitude. Integer PCM decodes to [-1, 1]; float files may overshoot 1
a little (a clipped mix), but a peak past this is a broken file. It also keeps the log-mel finite:
Whisper's features square the STFT in float32, and |x| <= 1e3 bounds that power by about
(400 * 1e3)^2 = 1.6e11 even after resampling overshoot (soxr: a few percent), far below float32's
3.4e38 (measured: a 1e20 peak already gives NaN features, 1e10 still finite); the log's floor
(a 1e-10 clamp) keeps silence finite too. So decoded audio that passes these checks has finite features."""


class AudioError(Exception):
    """This one sample cannot be used; ``reason`` says why (goes into skipped.jsonl)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_audio(audio: str | bytes | None, target_sr: int = SAMPLING_RATE) -> np.ndarray:
    """Decode a path or encoded bytes into mono float32 at ``target_sr``."""
    if audio is None or (isinstance(audio, (bytes, str)) and len(audio) == 0):
        raise AudioError("no audio")
    if isinstance(audio, str) and not os.path.isfile(audio):
        # libsndfile reports a missing path as "System error"; say what it is.
        raise AudioError("missing file")
    source = io.BytesIO(audio) if isinstance(audio, bytes) else audio
    try:
        samples, sr = sf.read(source, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AudioError(f"unreadable or corrupt audio: {message}") from None
    except OSError as exc:
        raise AudioError(f"unreadable file: {exc.strerror or exc}") from None
    if samples.shape[0] == 0:
        raise AudioError("empty audio (0 samples)")
    # Checked before the downmix: opposite huge channels could average to a harmless-looking mono.
    if not np.isfinite(samples).all():
        raise AudioError("NaN or Inf in audio")
    peak = float(np.abs(samples).max())
    if peak > MAX_PEAK:
        raise AudioError(f"absurd amplitude (peak {peak:.3g})")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if sr != target_sr:
        mono = soxr.resample(mono, sr, target_sr, quality="HQ")
        if mono.size == 0:
            raise AudioError(f"empty audio (0 samples once resampled from {sr} Hz)")
    return np.ascontiguousarray(mono, dtype=np.float32)


FRAME_SECONDS = 0.02
"""Energy frames for :func:`speech_bounds`: Whisper's timestamp resolution."""
SILENCE_DB = -40.0
"""A frame this far below the loudest frame counts as silence."""


def speech_bounds(samples: np.ndarray, sampling_rate: int = SAMPLING_RATE) -> tuple[float, float] | None:
    """``(start, end)`` seconds of the audio between its first and last non-silent 20 ms frame, or
    None when every frame is silent.

    A frame is silent when its RMS is more than 40 dB below the loudest frame's (or the whole clip is
    digital silence). Synthesised and read speech has leading and trailing silence that a timestamp
    target should not include; the bounds are frame-aligned, so they land on Whisper's 0.02 s grid.
    """
    frame = max(1, round(FRAME_SECONDS * sampling_rate))
    count = len(samples) // frame + (1 if len(samples) % frame else 0)
    if count == 0:
        return None
    padded = np.zeros(count * frame, dtype=np.float64)
    padded[: len(samples)] = samples
    rms = np.sqrt(np.mean(padded.reshape(count, frame) ** 2, axis=1))
    loudest = float(rms.max())
    if loudest <= 1e-6:
        return None
    loud = np.flatnonzero(rms >= loudest * 10 ** (SILENCE_DB / 20))
    return float(loud[0] * frame / sampling_rate), float(min(len(samples), (loud[-1] + 1) * frame) / sampling_rate)
