"""Fixtures for the training tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def fresh_accelerate() -> Iterator[None]:
    """accelerate keeps its state in process-wide singletons; each in-process run starts clean."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def no_dropout(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """The tiny model without dropout: it draws per sample, so exact comparisons across micro-batch
    sizes and world sizes need it off."""
    import transformers

    out = tmp_path_factory.mktemp("no-dropout")
    transformers.WhisperForConditionalGeneration.from_pretrained(tiny_model, dropout=0.0).save_pretrained(out)
    transformers.WhisperProcessor.from_pretrained(tiny_model).save_pretrained(out)
    return out
