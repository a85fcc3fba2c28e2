"""Whisper's languages: checking a configured name or code."""

from __future__ import annotations

from toolkit.recipe import ConfigError


def check_whisper_language(language: str, stand_in_for: str | None, key: str = "model.language") -> None:
    """Refuse a language Whisper has no token for, with the stand-in hint for ``model.language``."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    lang = language.lower().strip("<|>")
    if lang in TO_LANGUAGE_CODE or lang in LANGUAGES:
        return
    hint = (
        f"; for data in a language Whisper lacks, set model.language to the closest Whisper language and "
        f"model.stand_in_for: {language}"
        if not stand_in_for and key == "model.language"
        else ""
    )
    raise ConfigError(f"{key}: Whisper has no language {language!r}{hint}")
