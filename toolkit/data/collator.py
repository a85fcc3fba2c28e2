"""Seq2seq collator: features (or 16-bit audio for the device) per batch, labels padded with -100.

Two places compute Whisper's log-mel features:

* ``workers`` (the feature extractor in the DataLoader workers): batches carry the features;
* ``device`` (:class:`~toolkit.data.logmel.LogMel`): batches carry the unpadded clips' 16-bit
  samples, padded to the batch's longest, and :meth:`Batch.to` computes the features once the
  samples are on the device. A 4 s clip then travels as 128 KB of int16 instead of 960 KB of features.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from toolkit.data.audio import SAMPLING_RATE
from toolkit.data.dataset import Example, Segment
from toolkit.data.logmel import LogMel

IGNORE_INDEX = -100


@dataclass
class Batch:
    """A collated micro-batch. ``labels`` is None for evaluation-only data.

    Either ``input_features`` is set, or ``pcm``/``scales``/``logmel`` are and the features are
    computed by :meth:`to`.
    """

    input_features: torch.Tensor | None
    labels: torch.Tensor | None
    ids: list[str]
    texts: list[str]
    pcm: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    logmel: LogMel | None = None
    segments: list[list[Segment] | None] | None = None
    """Per example: its segments (seconds from the start of the clip or packed window)."""
    decoder_input_ids: torch.Tensor | None = None
    """Set when some label starts with a previous-text prompt: the decoder's input is then the whole
    sequence, not the labels shifted right behind the start token (see :func:`prompted_labels`)."""

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        """The batch on ``device``, with its features computed there if it carries audio."""
        features = self.input_features
        if features is None:
            assert self.pcm is not None and self.scales is not None and self.logmel is not None
            features = self.logmel(self.pcm.to(device, non_blocking=True), self.scales)
        features = features.to(device, dtype=dtype) if dtype else features.to(device)
        labels = self.labels.to(device) if self.labels is not None else None
        inputs = self.decoder_input_ids.to(device) if self.decoder_input_ids is not None else None
        return replace(self, input_features=features, labels=labels, pcm=None, scales=None, decoder_input_ids=inputs)

    def pin_memory(self) -> Batch:
        """Page-locked copies of the tensors (the DataLoader calls this with ``pin_memory=True``)."""
        return replace(self, input_features=_pinned(self.input_features), labels=_pinned(self.labels),
                       pcm=_pinned(self.pcm), decoder_input_ids=_pinned(self.decoder_input_ids))

    def __len__(self) -> int:
        return len(self.ids)


class WhisperCollator:
    """Turn :class:`Example` lists into a :class:`Batch` (features ``on`` the ``workers`` or the ``device``)."""

    def __init__(self, feature_extractor: Any, decoder_start_token_id: int, features_on: str = "workers",
                 pad_token_id: int | None = None):
        if features_on not in ("workers", "device"):
            raise ValueError(f"features_on must be 'workers' or 'device', got {features_on!r}")
        self.feature_extractor = feature_extractor
        self.decoder_start_token_id = decoder_start_token_id
        self.pad_token_id = pad_token_id
        """Pads decoder inputs when a batch carries prompts (None: the end-of-text id, Whisper's pad)."""
        if features_on == "device" and getattr(feature_extractor, "dither", 0.0):
            raise ValueError("the feature extractor dithers (dither > 0), which the device path does not: "
                             "set data.features_on=workers")
        self.logmel = LogMel(feature_extractor) if features_on == "device" else None

    def __call__(self, examples: list[Example]) -> Batch:
        labels = inputs = None
        if all(ex.labels is not None for ex in examples):
            if any(ex.prompt_length for ex in examples):
                inputs, labels = prompted_labels(examples, self.pad_token_id)
            else:
                labels = pad_labels([ex.labels for ex in examples])  # type: ignore[misc]
                # The model prepends the start token itself when it shifts labels right; keep it once.
                if labels.shape[1] > 0 and bool((labels[:, 0] == self.decoder_start_token_id).all()):
                    labels = labels[:, 1:]
        ids, texts = [ex.id for ex in examples], [ex.text for ex in examples]
        segments = [ex.segments for ex in examples]
        if self.logmel is None:
            features = self.feature_extractor(
                [ex.audio for ex in examples], sampling_rate=SAMPLING_RATE, return_tensors="pt"
            ).input_features
            return Batch(features, labels, ids, texts, segments=segments, decoder_input_ids=inputs)
        width = max(len(ex.pcm) for ex in examples)
        pcm = np.zeros((len(examples), width), dtype=np.int16)
        for row, ex in enumerate(examples):
            pcm[row, : len(ex.pcm)] = ex.pcm
        scales = torch.tensor([ex.scale for ex in examples], dtype=torch.float32)
        return Batch(None, labels, ids, texts, torch.from_numpy(pcm), scales, self.logmel, segments, inputs)


def _pinned(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return tensor.pin_memory() if tensor is not None else None


def prompted_labels(examples: list[Example], pad_token_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoder inputs, labels) for a batch in which some labels start with a previous-text prompt.

    The decoder reads each whole sequence but its last token and predicts each next token. The
    targets up to and including the start-of-transcript token that ends a prompt are context, not
    predictions, and are left out of the loss (-100); an example without a prompt gets exactly what
    the shift-right path gives it.
    """
    sequences = [list(ex.labels or ()) for ex in examples]
    pad = pad_token_id if pad_token_id is not None else sequences[0][-1]  # Whisper pads with end-of-text
    width = max(len(seq) for seq in sequences) - 1
    inputs = torch.full((len(sequences), width), pad, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for row, (seq, ex) in enumerate(zip(sequences, examples, strict=True)):
        inputs[row, : len(seq) - 1] = torch.tensor(seq[:-1], dtype=torch.long)
        labels[row, ex.prompt_length : len(seq) - 1] = torch.tensor(seq[ex.prompt_length + 1 :], dtype=torch.long)
    return inputs, labels


def pad_labels(sequences: list[list[int]]) -> torch.Tensor:
    width = max(len(seq) for seq in sequences)
    out = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out
