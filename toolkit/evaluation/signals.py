"""Failure signals beside the WER: repetition loops and hallucinated words (the regression guard's metrics).

Everything here is a pure function of hypothesis (and reference) strings, or of counts that add
up across processes. Words are whitespace-separated tokens of the text as given: callers pass
*normalised* text (the WER's normaliser), so that punctuation or casing cannot hide a loop, and
output that normalises to nothing (``"..."``) is no word.

Definitions:

* **repeated n-gram** (:func:`repeated_ngram`): some ``n`` consecutive words (default 4) occur
  ``times`` or more times (default 3) in one hypothesis. Occurrences are counted at every start
  position, so they may overlap: a one-word loop ``"no no no no no no"`` holds ``"no no no no"``
  three times (positions 0, 1 and 2), and counts.
* **repetition rate** (:func:`repetition_rate`): the share of hypotheses with a repeated n-gram.
* **insertion rate** (:func:`insertion_rate`), for a set with speech: inserted words (jiwer's word
  alignment, as in the WER) per reference word.
* For a **no-speech set** (every reference empty) every output word is a hallucination, that is an
  insertion; with no reference word to divide by, :class:`NoSpeechCounts` reports
  ``insertion_rate`` as output words per utterance and ``hallucination_rate`` as the share of
  utterances with any output word.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, fields

NGRAM = 4
"""Words in the n-gram whose repetition marks a loop."""
TIMES = 3
"""Occurrences of one n-gram that make a hypothesis count as repeating."""


def repeated_ngram(words: Sequence[str], n: int = NGRAM, times: int = TIMES) -> bool:
    """Whether some ``n`` consecutive ``words`` occur ``times`` or more times (overlapping occurrences count)."""
    if n < 1 or times < 2:
        raise ValueError(f"repeated_ngram needs n >= 1 and times >= 2, got n={n}, times={times}")
    if len(words) < n + times - 1:  # the shortest text that can hold `times` overlapping occurrences
        return False
    counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return max(counts.values()) >= times


def count_repeated(hypotheses: Sequence[str], n: int = NGRAM, times: int = TIMES) -> int:
    """How many ``hypotheses`` hold a repeated n-gram (:func:`repeated_ngram` of their words)."""
    return sum(repeated_ngram(text.split(), n, times) for text in hypotheses)


def repetition_rate(hypotheses: Sequence[str], n: int = NGRAM, times: int = TIMES) -> float:
    """The share (0 to 1) of ``hypotheses`` with a repeated n-gram; 0.0 for none."""
    return count_repeated(hypotheses, n, times) / len(hypotheses) if hypotheses else 0.0


def share(part: int, whole: int) -> float:
    """``part / whole`` rounded to 6 places, 0.0 when ``whole`` is 0 (an empty set has no failures)."""
    return round(part / whole, 6) if whole else 0.0


@dataclass
class NoSpeechCounts:
    """What a no-speech set's hypotheses hold, as counts that add up across processes."""

    utterances: int = 0
    output_words: int = 0
    """Every word output: each one is an insertion, since the reference is empty."""
    with_output: int = 0
    """Utterances with at least one output word (a hallucination)."""
    repeated: int = 0
    """Utterances with a repeated n-gram."""

    @classmethod
    def of(cls, hypotheses: Sequence[str]) -> NoSpeechCounts:
        words = [text.split() for text in hypotheses]
        return cls(len(words), sum(map(len, words)), sum(1 for w in words if w),
                   sum(repeated_ngram(w) for w in words))

    def __add__(self, other: NoSpeechCounts) -> NoSpeechCounts:
        return NoSpeechCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def as_list(self) -> list[int]:
        return [getattr(self, f.name) for f in fields(self)]

    def metrics(self) -> dict[str, float | int]:
        """``insertion_rate``: output words per utterance; ``hallucination_rate``: share of utterances
        with any output word; ``repetition_rate``; ``num_samples``."""
        return {
            "insertion_rate": share(self.output_words, self.utterances),
            "hallucination_rate": share(self.with_output, self.utterances),
            "repetition_rate": share(self.repeated, self.utterances),
            "num_samples": self.utterances,
        }
