"""LogMel (features on the device) against the feature extractor, and the collator's two modes."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor

from toolkit.data import pcm
from toolkit.data.audio import SAMPLING_RATE
from toolkit.data.collator import Batch, WhisperCollator
from toolkit.data.dataset import Example
from toolkit.data.logmel import LogMel

TOLERANCE = 1e-4


def clip(seconds: float, peak: float, seed: int) -> tuple[np.ndarray, float]:
    """A noisy two-tone clip of ``seconds`` at ``peak``, as the cache stores it (int16, scale)."""
    rng = np.random.default_rng(seed)
    n = round(seconds * SAMPLING_RATE)
    t = np.arange(n) / SAMPLING_RATE
    audio = np.sin(2 * np.pi * (180 + 50 * seed) * t) + 0.5 * np.sin(2 * np.pi * 1300 * t)
    audio += 0.2 * rng.standard_normal(n)
    if n:
        audio *= peak / np.abs(audio).max()
    return pcm.quantize(audio.astype(np.float32))


CLIPS = [  # (seconds, peak): short, odd length, loud (scale 5), exactly 30 s, past 30 s, silence
    (1.0, 0.5), (7.3001, 0.9), (2.5, 5.0), (30.0, 0.7), (31.7, 0.8), (0.5, 0.0),
]


def extractor_features(extractor: WhisperFeatureExtractor, clips: list[tuple[np.ndarray, float]]) -> torch.Tensor:
    audio = [pcm.to_float(samples, scale) for samples, scale in clips]
    return extractor(audio, sampling_rate=SAMPLING_RATE, return_tensors="pt").input_features


def padded(clips: list[tuple[np.ndarray, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(samples) for samples, _ in clips)
    batch = np.zeros((len(clips), width), dtype=np.int16)
    for row, (samples, _) in enumerate(clips):
        batch[row, : len(samples)] = samples
    return torch.from_numpy(batch), torch.tensor([scale for _, scale in clips], dtype=torch.float32)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_logmel_matches_the_feature_extractor(n_mels: int) -> None:
    extractor = WhisperFeatureExtractor(feature_size=n_mels)
    clips = [clip(seconds, peak, seed) for seed, (seconds, peak) in enumerate(CLIPS)]
    assert len(clips[3][0]) == extractor.n_samples and len(clips[4][0]) > extractor.n_samples
    assert clips[2][1] == pytest.approx(5.0)  # the loud clip really carries a scale
    expected = extractor_features(extractor, clips)
    got = LogMel(extractor)(*padded(clips))
    assert got.shape == expected.shape == (len(clips), n_mels, 3000)
    assert got.dtype == torch.float32
    assert float((got - expected).abs().max()) <= TOLERANCE
    # Each clip's features are its own: the batch's padding and neighbours change nothing.
    alone = LogMel(extractor)(*padded([clips[1]]))
    assert float((alone[0] - got[1]).abs().max()) <= TOLERANCE


def test_logmel_truncates_past_30_seconds() -> None:
    extractor = WhisperFeatureExtractor(feature_size=80)
    samples, scale = clip(31.7, 0.8, 4)
    logmel = LogMel(extractor)
    full = logmel(torch.from_numpy(samples)[None], torch.tensor([scale]))
    cut = logmel(torch.from_numpy(samples[: extractor.n_samples].copy())[None], torch.tensor([scale]))
    assert torch.equal(full, cut)


def test_logmel_pickles_without_its_device_tensors() -> None:
    logmel = LogMel(WhisperFeatureExtractor(feature_size=80))
    samples, scale = clip(1.0, 0.5, 0)
    first = logmel(torch.from_numpy(samples)[None], torch.tensor([scale]))
    assert logmel._on  # constants cached for the CPU
    copy = pickle.loads(pickle.dumps(logmel))
    assert copy._on == {}
    assert torch.equal(copy(torch.from_numpy(samples)[None], torch.tensor([scale])), first)


def examples(tokenizer_free_labels: bool = True) -> list[Example]:
    out = []
    for seed, (seconds, peak) in enumerate(CLIPS):
        samples, scale = clip(seconds, peak, seed)
        labels = [1, 2 + seed, 3] if tokenizer_free_labels else None
        out.append(Example(f"c{seed}", samples, scale, f"text {seed}", labels))
    return out


def test_collator_device_mode_matches_workers_mode() -> None:
    extractor = WhisperFeatureExtractor(feature_size=80)
    batch_examples = examples()
    workers = WhisperCollator(extractor, decoder_start_token_id=1)(batch_examples)
    device = WhisperCollator(extractor, decoder_start_token_id=1, features_on="device")(batch_examples)
    assert workers.pcm is None and workers.input_features is not None
    assert device.input_features is None and device.logmel is not None
    assert device.pcm is not None and device.pcm.dtype == torch.int16
    assert device.pcm.shape == (len(CLIPS), max(len(ex.pcm) for ex in batch_examples))
    assert device.scales is not None and device.scales.tolist() == pytest.approx([ex.scale for ex in batch_examples])
    assert torch.equal(device.labels, workers.labels) and device.ids == workers.ids and device.texts == workers.texts
    moved = device.to("cpu")
    assert isinstance(moved, Batch)
    assert moved.pcm is None and moved.scales is None
    assert moved.input_features is not None and moved.input_features.shape == workers.input_features.shape
    assert float((moved.input_features - workers.input_features).abs().max()) <= TOLERANCE
    assert torch.equal(moved.labels, workers.labels)
    # A dtype casts the features computed (in float32) on the device.
    as_double = device.to("cpu", torch.float64)
    assert as_double.input_features.dtype == torch.float64
    assert float((as_double.input_features - workers.input_features.double()).abs().max()) <= TOLERANCE


def test_collator_device_mode_batch_pickles_and_keeps_eval_text() -> None:
    """What a worker sends back: int16 audio and the LogMel, not features; eval batches have no labels."""
    extractor = WhisperFeatureExtractor(feature_size=80)
    batch_examples = examples(tokenizer_free_labels=False)[:3]
    batch = WhisperCollator(extractor, 0, features_on="device")(batch_examples)
    assert batch.labels is None and batch.texts == ["text 0", "text 1", "text 2"]
    copy = pickle.loads(pickle.dumps(batch))
    assert torch.equal(copy.to("cpu").input_features, batch.to("cpu").input_features)
    assert len(pickle.dumps(batch)) < 4 * batch.pcm.numel()  # int16 travels, not 80 x 3000 floats per clip


def test_collator_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="features_on must be 'workers' or 'device'"):
        WhisperCollator(WhisperFeatureExtractor(feature_size=80), 0, features_on="gpu")
