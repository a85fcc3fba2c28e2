"""Whisper's log-mel features computed where the model runs, from 16-bit audio.

Workers then only decode FLAC and pad integers: the STFT (15-20 ms of one CPU core per clip)
moves to the accelerator, and a fast GPU no longer needs 6-8 loader workers to stay fed (on an
H100, whisper-small at about 200 clips/s waited 1.6% of its step time for data with 6 workers). The arithmetic is the
feature extractor's own (:meth:`transformers.WhisperFeatureExtractor._torch_extract_fbank_features`):
zero-pad to 30 s, a 400-point Hann STFT with hop 160, power, the extractor's mel filters, log10
clamped at 1e-10, a floor 8 below each window's maximum, then ``(x + 4) / 4``.
``tests/data/test_logmel.py`` checks it against the extractor within 1e-4.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from toolkit.data.pcm import FULL_SCALE


class LogMel:
    """Callable: padded int16 audio ``(B, N)`` and per-clip scales -> features ``(B, n_mels, frames)``.

    Holds only the extractor's numbers (mel filters, FFT sizes), so batches that carry it pickle
    cheaply from the loader workers; the filters and window are moved to a device once and kept.
    """

    def __init__(self, feature_extractor: Any):
        self.mel_filters = np.asarray(feature_extractor.mel_filters, dtype=np.float32)
        self.n_fft = int(feature_extractor.n_fft)
        self.hop_length = int(feature_extractor.hop_length)
        self.n_samples = int(feature_extractor.n_samples)
        self._on: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_on": {}}

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._on:
            self._on[key] = (
                torch.hann_window(self.n_fft, device=device),
                torch.from_numpy(self.mel_filters).to(device).T.contiguous(),
            )
        return self._on[key]

    @torch.no_grad()
    def __call__(self, pcm: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        device = pcm.device
        window, filters = self._constants(device)
        audio = torch.zeros(pcm.shape[0], self.n_samples, device=device, dtype=torch.float32)
        width = min(pcm.shape[1], self.n_samples)
        audio[:, :width] = pcm[:, :width].to(torch.float32) * (scales.to(device, torch.float32) / FULL_SCALE)[:, None]
        stft = torch.stft(audio, self.n_fft, self.hop_length, window=window, return_complex=True)
        power = (stft[..., :-1].abs() ** 2).contiguous()
        log_spec = torch.clamp(filters @ power, min=1e-10).log10()
        floor = log_spec.amax(dim=(1, 2), keepdim=True) - 8.0
        return (torch.maximum(log_spec, floor) + 4.0) / 4.0
