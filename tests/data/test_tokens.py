"""Ragged token tables, Pieces, and the tokenisation cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformers import WhisperTokenizerFast

from toolkit.data import tokens
from toolkit.data.tokens import Pieces, Ragged

LISTS = [[5, 6, 7], [], [8], [9, 10]]


def test_ragged_behaves_like_its_lists() -> None:
    ragged = Ragged.from_lists(LISTS)
    assert [ragged[i] for i in range(len(ragged))] == LISTS and ragged.lengths().tolist() == [3, 0, 1, 2]
    taken = ragged.take(np.array([3, 0, 1]))
    assert [taken[i] for i in range(3)] == [[9, 10], [5, 6, 7], []]
    wrapped = ragged.wrapped([1, 2], [0])
    assert [wrapped[i] for i in range(4)] == [[1, 2, *x, 0] for x in LISTS]
    joined = Ragged.concat([ragged, Ragged.from_lists([[11]])])
    assert [joined[i] for i in range(5)] == [*LISTS, [11]] and joined == Ragged.from_lists([*LISTS, [11]])


def test_pieces_share_whole_transcripts_and_cost_two_timestamps_a_segment() -> None:
    spaced = Ragged.from_lists([[1, 2], [3], [4, 4, 4]])
    own = Ragged.from_lists([[7], [8, 8]])  # clip 1's two segments
    pieces = Pieces(spaced, np.array([True, False, False]), own, np.array([0, 0, 2, 2]))
    assert [pieces[i] for i in range(3)] == [[[1, 2]], [[7], [8, 8]], []]
    assert pieces.costs().tolist() == [4, 7, 0]
    listed = Pieces.from_lists([[[1, 2]], [[7], [8, 8]], []])
    assert [listed[i] for i in range(3)] == [pieces[i] for i in range(3)] and listed.costs().tolist() == [4, 7, 0]


def test_encode_equals_the_tokenizer_and_reuses_its_cache(tiny_model: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = WhisperTokenizerFast.from_pretrained(tiny_model)
    texts = ["Hello world.", " It costs $20, Mr. Smith.", "", "Ünïcödé"] * 3
    monkeypatch.setattr(tokens, "BLOCK", 5)  # several blocks, the last one short
    for rank, world in ((0, 1), (1, 2)):
        got = tokens.encode(tokenizer, texts, tmp_path / "cache", rank=rank, world_size=world)
        assert [got[i] for i in range(len(texts))] == tokenizer(texts, add_special_tokens=False).input_ids
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 3

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("tokenised again instead of read from the cache")

    monkeypatch.setattr(type(tokenizer.backend_tokenizer), "encode_batch", refuse, raising=False)
    again = tokens.encode(tokenizer, texts, tmp_path / "cache")
    assert again == got
