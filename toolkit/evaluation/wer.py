"""Exact corpus error counts that add up across processes.

Each rank counts substitutions, deletions, insertions and hits with jiwer's alignment; the counts
are summed over ranks and only then divided. Averaging per-rank WERs would weight a short shard
like a long one and give a different number on 1 and on N processes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import jiwer
import torch


@dataclass
class ErrorCounts:
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    hits: int = 0

    @property
    def reference_length(self) -> int:
        return self.substitutions + self.deletions + self.hits

    @property
    def rate(self) -> float:
        errors = self.substitutions + self.deletions + self.insertions
        if self.reference_length == 0:
            return 0.0 if errors == 0 else float("inf")
        return errors / self.reference_length

    @property
    def insertion_rate(self) -> float:
        """Inserted words per reference word (what a hallucinating model adds); a set without
        reference words has none (:class:`toolkit.evaluation.signals.NoSpeechCounts` scores it)."""
        if self.reference_length == 0:
            raise ValueError("insertion_rate needs reference words; a no-speech set is scored with NoSpeechCounts")
        return round(self.insertions / self.reference_length, 6)

    def __add__(self, other: ErrorCounts) -> ErrorCounts:
        return ErrorCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def as_list(self) -> list[int]:
        return [getattr(self, f.name) for f in fields(self)]


def word_errors(references: list[str], hypotheses: list[str]) -> ErrorCounts:
    if not references:
        return ErrorCounts()
    out = jiwer.process_words(references, hypotheses)
    return ErrorCounts(out.substitutions, out.deletions, out.insertions, out.hits)


def char_errors(references: list[str], hypotheses: list[str]) -> ErrorCounts:
    if not references:
        return ErrorCounts()
    out = jiwer.process_characters(references, hypotheses)
    return ErrorCounts(out.substitutions, out.deletions, out.insertions, out.hits)


@dataclass
class CorpusCounts:
    """Everything the evaluation reports, as raw counts."""

    words_ortho: ErrorCounts
    words_norm: ErrorCounts
    chars_norm: ErrorCounts
    num_samples: int = 0

    @classmethod
    def zero(cls) -> CorpusCounts:
        return cls(ErrorCounts(), ErrorCounts(), ErrorCounts(), 0)

    def add_batch(self, references: list[str], hypotheses: list[str], normalize) -> None:  # noqa: ANN001
        self.words_ortho += word_errors(references, hypotheses)
        norm_refs = [normalize(r) for r in references]
        norm_hyps = [normalize(h) for h in hypotheses]
        self.words_norm += word_errors(norm_refs, norm_hyps)
        self.chars_norm += char_errors(norm_refs, norm_hyps)
        self.num_samples += len(references)

    def __add__(self, other: CorpusCounts) -> CorpusCounts:
        return CorpusCounts(self.words_ortho + other.words_ortho, self.words_norm + other.words_norm,
                            self.chars_norm + other.chars_norm, self.num_samples + other.num_samples)

    def to_tensor(self) -> torch.Tensor:
        values = self.words_ortho.as_list() + self.words_norm.as_list() + self.chars_norm.as_list()
        return torch.tensor([*values, self.num_samples], dtype=torch.long)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> CorpusCounts:
        v = [int(x) for x in tensor.tolist()]
        return cls(ErrorCounts(*v[0:4]), ErrorCounts(*v[4:8]), ErrorCounts(*v[8:12]), v[12])

    def metrics(self) -> dict[str, float | int]:
        """WER/CER in percent, as Whisper papers and the course report them."""
        metrics = {
            "wer": round(100 * self.words_norm.rate, 4),
            "wer_ortho": round(100 * self.words_ortho.rate, 4),
            "cer": round(100 * self.chars_norm.rate, 4),
            "num_samples": self.num_samples,
            "reference_words": self.words_norm.reference_length,
        }
        if self.words_norm.reference_length:
            metrics["insertion_rate"] = self.words_norm.insertion_rate
        return metrics
