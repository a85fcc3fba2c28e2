"""From a spec to a dataset: duplicates (warned or dropped) and over-long eval references (dropped)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_audiofolder, write_clip
from toolkit.config import DataConfig
from toolkit.data.audio import decode_audio
from toolkit.data.pipeline import load_split, open_split


def corpus_with_duplicates(root: Path) -> Path:
    """Six clips and three more rows: two repeat clip-000 and clip-001, one gives clip-002 another text."""
    write_audiofolder(root, 6)
    with (root / "metadata.csv").open("a") as handle:
        handle.write("clip-000.flac,The quick brown fox jumps over the lazy dog.\n")
        handle.write("clip-001.flac, A stitch in time saves nine. \n")
        handle.write("clip-002.flac,Whisper models turn speech into words.\n")
    return root


def test_duplicates_are_warned_about_and_kept_by_default(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = corpus_with_duplicates(tmp_path / "af")
    with caplog.at_level(logging.WARNING, logger="toolkit.data.pipeline"):
        split = load_split("train", DataConfig(train=str(root), cache_dir=str(tmp_path / "c")), None)
    assert len(split.dataset) == 9 and split.skips == []
    assert [r.getMessage() for r in caplog.records] == [
        f"data.train: 2 duplicate row(s) in {root} (the same audio file and transcript as an earlier row, "
        "e.g. clip-000.flac); kept: set data.dedup=true to drop them"
    ]


def test_dedup_drops_duplicates_as_counted_skips(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = corpus_with_duplicates(tmp_path / "af")
    cfg = DataConfig(train=str(root), dedup=True, fail_on_skip=True, cache_dir=str(tmp_path / "c"))
    with caplog.at_level(logging.WARNING, logger="toolkit.data.pipeline"):
        split = load_split("train", cfg, None)
    assert caplog.records == []
    assert len(split.dataset) == 7
    assert [(s.id, s.kind, s.reason.split(" (")[0]) for s in split.skips] == [
        ("clip-000.flac", "filtered", "duplicate"), ("clip-001.flac", "filtered", "duplicate")
    ]
    assert split.summary() == f"{root}: 7 of 9 samples kept; left out: 2 filtered: duplicate"
    # Only the rows used count: the first 4 unique rows come before any repeat.
    few = load_split("train", DataConfig(train=str(root), dedup=True, max_train_samples=4,
                                         cache_dir=str(tmp_path / "c")), None)
    assert len(few.dataset) == 4 and few.skips == [] and few.total_items == 4


def long_reference_corpus(root: Path) -> Path:
    write_audiofolder(root, 4)
    write_clip(root / "long-ref.flac", 1.0, seed=7)
    with (root / "metadata.csv").open("a") as handle:
        handle.write("long-ref.flac," + "word " * 2000 + "\n")  # a 10,000-character reference
    return root


def test_over_long_eval_reference_is_a_skip_and_the_rest_is_unchanged(tmp_path: Path, tiny_model: Path) -> None:
    """Filtered as training filters its labels; the eval split still carries text only, no labels."""
    from transformers import WhisperTokenizer

    tokenizer = WhisperTokenizer.from_pretrained(tiny_model)
    root = long_reference_corpus(tmp_path / "dev")
    cfg = DataConfig(eval=str(root), cache_dir=str(tmp_path / "c"))
    plain = load_split("eval", cfg, None)
    assert len(plain.dataset) == 5  # without a tokenizer nothing is filtered by length
    split = load_split("eval", cfg, tokenizer, source=open_split("eval", cfg))
    assert [(s.id, s.kind, s.split) for s in split.skips] == [("long-ref.flac", "filtered", "eval")]
    assert split.skips[0].reason.startswith("label longer than 448 tokens (")
    assert split.dataset.labels is None
    kept = [split.dataset[i] for i in range(len(split.dataset))]
    before = [plain.dataset[i] for i in range(4)]
    assert [(e.id, e.text, e.labels) for e in kept] == [(e.id, e.text, None) for e in before]
    assert all(np.array_equal(a.pcm, b.pcm) and a.scale == b.scale for a, b in zip(kept, before, strict=True))
    # What the dataset yields is the source audio through 16 bits: within half a step of it.
    for example in kept:
        assert example.pcm.dtype == np.int16 and example.scale == 1.0
        source_audio = decode_audio(str(root / example.id))
        assert np.abs(example.audio - source_audio).max() <= 0.5 / 32767 + 1e-6
    assert list(split.dataset.durations) == list(plain.dataset.durations[:4])
