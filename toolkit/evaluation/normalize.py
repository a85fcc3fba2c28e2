"""Text normalisation for the normalised WER: Whisper's English normaliser for English, the basic one otherwise."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer


def make_normalizer(english: bool, tokenizer: Any | None = None) -> Callable[[str], str]:
    """English: Whisper's EnglishTextNormalizer with the checkpoint's spelling map (normalizer.json).

    Other languages: BasicTextNormalizer (lower-case, punctuation and symbols removed), as in the
    Hugging Face Audio course; the English one would mangle non-English text. Caveat, kept for
    comparability with the course's figures: it also turns combining marks (Unicode category M)
    into spaces, so in scripts such as Thaana or Devanagari a word falls apart into letters and
    the "word" error rate moves towards a character error rate.
    """
    if english:
        spelling = getattr(tokenizer, "english_spelling_normalizer", None) or {}
        normalizer: Callable[[str], str] = EnglishTextNormalizer(spelling)
    else:
        normalizer = BasicTextNormalizer()
    return lambda text: " ".join(normalizer(text).split())
