"""Model-facing datasets: cached audio plus tokenised labels, with the label-length filter applied."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from toolkit.config import WHISPER_MAX_TARGET_POSITIONS
from toolkit.data.preprocess import PreparedSplit, Skip


@dataclass
class Example:
    id: str
    audio: np.ndarray
    text: str
    labels: list[int] | None


class SpeechDataset(torch.utils.data.Dataset):
    """Indexable view of a prepared split; ``rows`` selects which cached rows are used."""

    def __init__(self, table: Any, rows: np.ndarray, labels: list[list[int]] | None, durations: np.ndarray):
        self.table = table.with_format("numpy", columns=["id", "audio", "text"])
        self.rows = rows
        self.labels = labels
        self.durations = durations

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Example:
        row = self.table[int(self.rows[index])]
        labels = self.labels[index] if self.labels is not None else None
        return Example(id=str(row["id"]), audio=row["audio"], text=str(row["text"]), labels=labels)

    def label_lengths(self) -> np.ndarray:
        """Tokens each example contributes to the loss (the leading start token is not predicted)."""
        if self.labels is None:
            raise ValueError("this dataset has no labels")
        return np.array([len(ids) - 1 for ids in self.labels], dtype=np.int64)


def build_dataset(
    prepared: PreparedSplit,
    tokenizer: Any | None,
    *,
    max_label_tokens: int = WHISPER_MAX_TARGET_POSITIONS,
    split: str = "train",
    keep_labels: bool = True,
) -> tuple[SpeechDataset, list[Skip]]:
    """Tokenise transcripts (when a tokenizer is given) and drop label sequences that are too long.

    ``keep_labels=False`` (evaluation data) filters the same way but keeps text only: an eval split is
    scored on generated text, and a reference too long for the decoder would only dominate its WER.
    """
    table = prepared.dataset
    durations = np.asarray(table["duration"], dtype=np.float32)
    if tokenizer is None:
        return SpeechDataset(table, np.arange(len(table)), None, durations), []
    texts = table["text"]
    ids = tokenizer(list(texts)).input_ids
    keep, labels, skips = [], [], []
    item_ids = table["id"]
    for row, tokens in enumerate(ids):
        if len(tokens) > max_label_tokens:
            skips.append(Skip(split, item_ids[row], f"label longer than {max_label_tokens} tokens ({len(tokens)})", "filtered"))
            continue
        keep.append(row)
        labels.append(list(tokens))
    rows = np.asarray(keep, dtype=np.int64)
    return SpeechDataset(table, rows, labels if keep_labels else None, durations[rows]), skips
