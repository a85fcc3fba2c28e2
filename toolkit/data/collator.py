"""Seq2seq collator: log-mel features per batch, labels padded with -100, leading start token cut."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from toolkit.data.audio import SAMPLING_RATE
from toolkit.data.dataset import Example

IGNORE_INDEX = -100


@dataclass
class Batch:
    """A collated micro-batch. ``labels`` is None for evaluation-only data."""

    input_features: torch.Tensor
    labels: torch.Tensor | None
    ids: list[str]
    texts: list[str]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        features = self.input_features.to(device, dtype=dtype) if dtype else self.input_features.to(device)
        labels = self.labels.to(device) if self.labels is not None else None
        return Batch(features, labels, self.ids, self.texts)

    def __len__(self) -> int:
        return len(self.ids)


class WhisperCollator:
    """Turn :class:`Example` lists into a :class:`Batch`.

    Features are computed here, in the DataLoader workers, rather than stored: see the README.
    """

    def __init__(self, feature_extractor: Any, decoder_start_token_id: int):
        self.feature_extractor = feature_extractor
        self.decoder_start_token_id = decoder_start_token_id

    def __call__(self, examples: list[Example]) -> Batch:
        features = self.feature_extractor(
            [ex.audio for ex in examples], sampling_rate=SAMPLING_RATE, return_tensors="pt"
        ).input_features
        labels = None
        if all(ex.labels is not None for ex in examples):
            labels = pad_labels([ex.labels for ex in examples])  # type: ignore[misc]
            # The model prepends the start token itself when it shifts labels right; keep it once.
            if labels.shape[1] > 0 and bool((labels[:, 0] == self.decoder_start_token_id).all()):
                labels = labels[:, 1:]
        return Batch(features, labels, [ex.id for ex in examples], [ex.text for ex in examples])


def pad_labels(sequences: list[list[int]]) -> torch.Tensor:
    width = max(len(seq) for seq in sequences)
    out = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out
