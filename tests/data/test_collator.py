"""The collator: log-mel features, -100 label padding, and the start token cut once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from toolkit.data.collator import IGNORE_INDEX, WhisperCollator
from toolkit.data.dataset import Example


def test_collate_pads_labels_and_cuts_start_token(tiny_model: Path) -> None:
    from transformers import WhisperProcessor

    processor = WhisperProcessor.from_pretrained(tiny_model)
    tok = processor.tokenizer
    sot = tok.convert_tokens_to_ids("<|startoftranscript|>")
    labels = [tok("hi").input_ids, tok("hello there").input_ids]
    assert labels[0][0] == sot
    examples = [
        Example("a", np.zeros(16_000, np.int16), 1.0, "hi", labels[0]),
        Example("b", np.full(8_000, 3277, np.int16), 1.0, "hello there", labels[1]),
    ]
    assert np.allclose(examples[1].audio, 0.1, atol=1e-4) and examples[1].audio.dtype == np.float32
    batch = WhisperCollator(processor.feature_extractor, sot)(examples)
    assert batch.input_features.shape == (2, 80, 3000)
    assert batch.labels is not None
    assert batch.labels.shape == (2, len(labels[1]) - 1)
    assert batch.labels[0, : len(labels[0]) - 1].tolist() == labels[0][1:]
    assert (batch.labels[0, len(labels[0]) - 1 :] == IGNORE_INDEX).all()
    assert batch.labels[1].tolist() == labels[1][1:]
    assert batch.ids == ["a", "b"]
    assert batch.pcm is None and batch.segments == [None, None]
    # Features on the device: the same labels, the audio as int16, the features once moved.
    on_device = WhisperCollator(processor.feature_extractor, sot, features_on="device")(examples)
    assert on_device.input_features is None and torch.equal(on_device.labels, batch.labels)
    assert on_device.pcm.shape == (2, 16_000) and on_device.pcm.dtype == torch.int16
    assert not on_device.pcm[1, 8_000:].any()  # padded to the batch's longest with silence
    moved = on_device.to("cpu")
    assert moved.pcm is None and moved.scales is None
    assert float((moved.input_features - batch.input_features).abs().max()) <= 1e-4


def test_start_token_kept_when_not_leading_everywhere(tiny_model: Path) -> None:
    from transformers import WhisperProcessor

    processor = WhisperProcessor.from_pretrained(tiny_model)
    examples = [Example("a", np.zeros(1600, np.int16), 1.0, "x", [5, 6, 7])]
    batch = WhisperCollator(processor.feature_extractor, decoder_start_token_id=999)(examples)
    assert batch.labels.tolist() == [[5, 6, 7]]


def test_eval_examples_have_no_labels(tiny_model: Path) -> None:
    from transformers import WhisperProcessor

    processor = WhisperProcessor.from_pretrained(tiny_model)
    example = Example("a", np.zeros(1600, np.int16), 1.0, "x", None)
    for features_on in ("workers", "device"):
        batch = WhisperCollator(processor.feature_extractor, 0, features_on=features_on)([example])
        assert batch.labels is None and batch.texts == ["x"]
        moved = batch.to("cpu", torch.float64)
        assert moved.input_features.dtype == torch.float64 and moved.input_features.shape == (1, 80, 3000)
        assert moved.labels is None


def test_packed_window_collates_with_its_segments(tiny_model: Path) -> None:
    """A packed window is one example: one label row, its audio, and its clips' spans kept per example."""
    from transformers import WhisperProcessor

    from toolkit.data.dataset import Segment

    processor = WhisperProcessor.from_pretrained(tiny_model)
    sot = processor.tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    segments = [Segment(0.0, 0.5, "a"), Segment(0.8, 1.0, "b")]
    window = Example("x+y", np.full(16_000, 1000, np.int16), 2.0, "a b", [sot, 7, 8, 9], segments)
    single = Example("z", np.full(4_000, -1000, np.int16), 1.0, "c", [sot, 7])
    for features_on in ("workers", "device"):
        batch = WhisperCollator(processor.feature_extractor, sot, features_on=features_on)([window, single])
        assert batch.segments == [segments, None]
        assert batch.labels.tolist() == [[7, 8, 9], [7, IGNORE_INDEX, IGNORE_INDEX]]
        assert batch.to("cpu").input_features.shape == (2, 80, 3000)
