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
        Example("a", np.zeros(16_000, np.float32), "hi", labels[0]),
        Example("b", np.ones(8_000, np.float32) * 0.1, "hello there", labels[1]),
    ]
    batch = WhisperCollator(processor.feature_extractor, sot)(examples)
    assert batch.input_features.shape == (2, 80, 3000)
    assert batch.labels is not None
    assert batch.labels.shape == (2, len(labels[1]) - 1)
    assert batch.labels[0, : len(labels[0]) - 1].tolist() == labels[0][1:]
    assert (batch.labels[0, len(labels[0]) - 1 :] == IGNORE_INDEX).all()
    assert batch.labels[1].tolist() == labels[1][1:]
    assert batch.ids == ["a", "b"]


def test_start_token_kept_when_not_leading_everywhere(tiny_model: Path) -> None:
    from transformers import WhisperProcessor

    processor = WhisperProcessor.from_pretrained(tiny_model)
    examples = [Example("a", np.zeros(1600, np.float32), "x", [5, 6, 7])]
    batch = WhisperCollator(processor.feature_extractor, decoder_start_token_id=999)(examples)
    assert batch.labels.tolist() == [[5, 6, 7]]


def test_eval_examples_have_no_labels(tiny_model: Path) -> None:
    from transformers import WhisperProcessor

    processor = WhisperProcessor.from_pretrained(tiny_model)
    batch = WhisperCollator(processor.feature_extractor, 0)([Example("a", np.zeros(1600, np.float32), "x", None)])
    assert batch.labels is None and batch.texts == ["x"]
    moved = batch.to("cpu", torch.float64)
    assert moved.input_features.dtype == torch.float64
