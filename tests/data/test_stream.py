"""Streaming data layer: every row once per epoch across ranks, seeded order, exact JSON resume, decoding."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from tests.conftest import write_audiofolder
from toolkit.data.preprocess import process_chunk
from toolkit.data.sources import DataError
from toolkit.data.stream import STREAM_ID, RankStream, StreamSource, open_stream, upstream_epoch


def wav_bytes(seconds: float, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    sf.write(buffer, (0.1 * rng.standard_normal(int(seconds * 16_000))).astype(np.float32), 16_000, format="WAV")
    return buffer.getvalue()


def write_parquet(root: Path, shards: int, rows_per_shard: int, seconds: float = 0.02) -> Path:
    """``shards`` Parquet files of rows ``n`` (numbered across files), tiny WAV audio and a text."""
    root.mkdir(parents=True, exist_ok=True)
    audio = wav_bytes(seconds)  # the same clip for every row: only the order is under test
    n = 0
    for shard in range(shards):
        rows = []
        for _ in range(rows_per_shard):
            rows.append({"audio": {"bytes": audio, "path": f"clip-{n:04d}.wav"}, "text": f"row {n}", "n": n})
            n += 1
        pq.write_table(pa.Table.from_pylist(rows), root / f"train-{shard:05d}-of-{shards:05d}.parquet")
    return root


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_parquet(tmp_path_factory.mktemp("stream") / "three", shards=3, rows_per_shard=10)


@pytest.fixture(scope="module")
def four_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_parquet(tmp_path_factory.mktemp("stream") / "four", shards=4, rows_per_shard=7)


def stream(root: Path, *, seed: int = 0, rank: int = 0, world_size: int = 1, block_size: int = 8) -> RankStream:
    dataset = open_stream(str(root), "train", None, None, "text")
    return RankStream(dataset, seed=seed, rank=rank, world_size=world_size, block_size=block_size)


def numbers(rows: list[dict]) -> list[int]:
    return [row["n"] for row in rows]


def epochs_of(rank_stream: RankStream, count: int) -> dict[int, list[int]]:
    """The rows of this rank's first ``count`` epochs, by epoch (one row at a time, to see each row's epoch)."""
    seen: dict[int, list[int]] = {}
    while True:
        row = rank_stream.take(1)[0]
        epoch = rank_stream.state_dict()["epoch"]
        if epoch >= count:
            return seen
        seen.setdefault(epoch, []).append(row["n"])


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("fixture", ["three_shards", "four_shards"])
def test_every_row_once_per_epoch_across_ranks(world_size: int, fixture: str, request: pytest.FixtureRequest) -> None:
    # Three shards over two ranks: split_dataset_by_node deals every other row instead of whole shards.
    root = request.getfixturevalue(fixture)
    total = 30 if fixture == "three_shards" else 28
    per_epoch: dict[int, list[int]] = {0: [], 1: []}
    for rank in range(world_size):
        for epoch, rows in epochs_of(stream(root, rank=rank, world_size=world_size), 2).items():
            per_epoch[epoch] += rows
    for rows in per_epoch.values():
        assert sorted(rows) == list(range(total))


def test_order_depends_on_seed_and_epoch_only(three_shards: Path) -> None:
    first = epochs_of(stream(three_shards, seed=1), 2)
    assert first == epochs_of(stream(three_shards, seed=1), 2)
    assert first[0] != first[1]
    assert first[0] != epochs_of(stream(three_shards, seed=2), 1)[0]
    # The shard order too changes with the epoch and with the seed, not only the order within blocks:
    # the first block (8 of a shard's 10 rows) comes from another shard.
    assert upstream_epoch(1, 0) != upstream_epoch(1, 1) != upstream_epoch(2, 1)
    assert min(first[0][:8]) // 10 != min(first[1][:8]) // 10
    assert min(epochs_of(stream(three_shards, seed=0), 1)[0][:8]) // 10 != min(first[0][:8]) // 10


def test_rows_carry_stable_ids(three_shards: Path) -> None:
    rows = stream(three_shards).take(60)
    assert all(row[STREAM_ID] == f"clip-{row['n']:04d}.wav" for row in rows)


@pytest.mark.parametrize(
    ("world_size", "rank", "k", "m"),
    [
        (1, 0, 5, 12),  # mid-block, over the next block boundary
        (1, 0, 8, 8),  # at a block boundary
        (1, 0, 16, 20),  # block boundary, then across the end of the epoch (30 rows)
        (1, 0, 29, 10),  # one row before the end of the epoch
        (1, 0, 30, 10),  # exactly at the end of the epoch
        (1, 0, 37, 40),  # mid-block in the second epoch, into the third
        (2, 1, 3, 20),  # every-other-row split: 15 rows an epoch
        (2, 1, 15, 9),
        (2, 0, 8, 30),
    ],
)
def test_exact_resume(three_shards: Path, world_size: int, rank: int, k: int, m: int) -> None:
    unbroken = stream(three_shards, seed=3, rank=rank, world_size=world_size).take(k + m)
    first = stream(three_shards, seed=3, rank=rank, world_size=world_size)
    assert first.take(k) == unbroken[:k]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = stream(three_shards, seed=3, rank=rank, world_size=world_size)
    resumed.load_state_dict(state)
    assert resumed.take(m) == unbroken[k:]
    assert first.take(m) == unbroken[k:]  # saving does not disturb the stream that saved


def test_exact_resume_with_whole_shards_per_rank(four_shards: Path) -> None:
    unbroken = stream(four_shards, rank=1, world_size=2, block_size=5).take(40)
    for k in (4, 5, 14, 15, 17):
        first = stream(four_shards, rank=1, world_size=2, block_size=5)
        first.take(k)
        resumed = stream(four_shards, rank=1, world_size=2, block_size=5)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert numbers(resumed.take(40 - k)) == numbers(unbroken[k:])


def test_resume_twice_in_a_row(three_shards: Path) -> None:
    unbroken = numbers(stream(three_shards).take(50))
    current, got = stream(three_shards), []
    for size in (3, 11, 7, 20, 9):
        got += numbers(current.take(size))
        state = json.loads(json.dumps(current.state_dict()))
        current = stream(three_shards)
        current.load_state_dict(state)
    assert got == unbroken


def test_audiofolder_streams_and_resumes(tmp_path: Path) -> None:
    root = write_audiofolder(tmp_path / "af", 7, seconds=0.05)
    dataset = open_stream(str(root), "train", None, None, "sentence")
    unbroken = RankStream(dataset, seed=0, rank=0, world_size=1, block_size=3).take(16)
    assert Counter(row[STREAM_ID] for row in unbroken[:7]) == Counter(str(p) for p in root.glob("*.flac"))
    first = RankStream(dataset, seed=0, rank=0, world_size=1, block_size=3)
    first.take(5)
    resumed = RankStream(dataset, seed=0, rank=0, world_size=1, block_size=3)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed.take(11) == unbroken[5:]
    kept, skips = process_chunk(StreamSource(unbroken[:2], "audio", "sentence", "af"), 0, 2, "train",
                                target_sr=16_000, max_duration_s=30.0)
    assert len(kept["id"]) == 2 and not skips and all(kept["text"])


def test_load_state_dict_refuses_another_layout(three_shards: Path) -> None:
    source = stream(three_shards, world_size=2)
    source.take(3)
    state = source.state_dict()
    with pytest.raises(ValueError, match="world_size 2, this run has 1"):
        stream(three_shards).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        stream(three_shards, seed=9, world_size=2).load_state_dict(state)


def test_a_rank_without_rows_is_a_data_error(tmp_path: Path) -> None:
    root = write_parquet(tmp_path / "one", shards=1, rows_per_shard=1)
    assert len(stream(root, rank=0, world_size=2).take(3)) == 3  # the one row, epoch after epoch
    with pytest.raises(DataError, match="rank 1 of 2 gets no rows"):
        stream(root, rank=1, world_size=2).take(1)


def test_open_stream_errors_are_one_line(three_shards: Path, tmp_path: Path) -> None:
    cases = [
        ((str(three_shards), "train", None, "speech", "text"), "no column 'speech'"),
        ((str(three_shards), "train", None, None, "n"), "not text"),
        ((str(three_shards), "validation", None, None, "text"), "could not stream"),
        ((str(tmp_path / "missing"), "train", None, None, "text"), "no such directory"),
    ]
    for args, message in cases:
        with pytest.raises(DataError, match=message) as info:
            open_stream(*args)
        assert "\n" not in str(info.value)


def test_streamed_rows_decode_and_skip_by_preprocessing_rules() -> None:
    good = {"audio": {"bytes": wav_bytes(0.5), "path": "a.wav"}, "text": "  hello  ", STREAM_ID: "a.wav"}
    rows = [
        good,
        {**good, "audio": {"bytes": b"not audio at all", "path": "b.wav"}, STREAM_ID: "b.wav"},
        {**good, "audio": {"bytes": None, "path": "/nowhere/c.wav"}, STREAM_ID: "c.wav"},
        {**good, "text": "   ", STREAM_ID: "d.wav"},
        {**good, "audio": {"bytes": wav_bytes(1.0), "path": "e.wav"}, STREAM_ID: "e.wav"},
    ]
    kept, skips = process_chunk(StreamSource(rows, "audio", "text", "test"), 0, len(rows), "train",
                                target_sr=16_000, max_duration_s=0.75)
    assert kept["id"] == ["a.wav"] and kept["text"] == ["hello"] and kept["duration"] == [0.5]
    reasons = {skip.id: skip.reason for skip in skips}
    assert reasons["b.wav"].startswith("unreadable or corrupt audio") and reasons["c.wav"] == "missing file"
    assert reasons["d.wav"] == "empty transcript" and reasons["e.wav"].startswith("longer than 0.75 s")
