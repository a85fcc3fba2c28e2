"""toolkit prepare: WebDataset shards, their tables and index, reruns, tasks, and reading them back."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import write_audiofolder
from toolkit.config import DataConfig
from toolkit.data.pipeline import load_split, open_split
from toolkit.data.prepare import PrepareSettings, prepare
from toolkit.data.shards import ShardSet, open_shards
from toolkit.data.sources import DataError, open_source

SETTINGS = PrepareSettings(shard_size=4)


def _folder(root: Path, n: int = 10) -> Path:
    """``n`` tone clips, plus a row with a missing file and one with an empty transcript (2 skips)."""
    write_audiofolder(root, n)
    with (root / "metadata.csv").open("a", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["missing.flac", "No such file."])
        writer.writerow(["clip-000.flac", ""])
    return root


def _source(root: Path):  # noqa: ANN202
    return open_source(str(root), split="train", text_column="sentence")


def test_shards_are_webdataset_tars_with_a_table_and_an_index(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "data")
    result = prepare(_source(folder), tmp_path / "out", SETTINGS)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert result.index == index and result.built == 3 and result.reused == 0
    assert [s["samples"] for s in index["shards"]] == [4, 4, 2] and index["samples"] == 10
    assert index["skipped"] == 2 and index["source_rows"] == 12
    assert index["hours"] == pytest.approx(index["seconds"] / 3600, abs=1e-4)
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert [(s["id"], s["reason"]) for s in skipped][1] == ("clip-000.flac", "empty transcript")
    assert skipped[0]["id"].endswith("missing.flac") and skipped[0]["kind"] == "error"
    with tarfile.open(tmp_path / "out" / "shard-000001.tar") as tar:
        names = tar.getnames()
        assert names[:4] == ["000000.flac", "000000.json", "000001.flac", "000001.json"]
        meta = json.loads(tar.extractfile("000000.json").read())
        audio, rate = sf.read(io.BytesIO(tar.extractfile("000000.flac").read()))
    assert meta["id"] == "clip-004.flac" and meta["text"] and rate == 16_000
    assert meta["duration"] == pytest.approx(len(audio) / rate, abs=1e-4)
    assert set(meta) == {"id", "text", "duration", "scale", "segments", "recording", "no_speech", "language"}


def test_a_rerun_rebuilds_only_the_shards_whose_rows_changed(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "data")
    out = tmp_path / "out"
    first = prepare(_source(folder), out, SETTINGS)
    again = prepare(_source(folder), out, SETTINGS)
    assert (again.built, again.reused) == (0, 3) and again.index == first.index
    rows = (folder / "metadata.csv").read_text().replace("A stitch in time saves nine.", "A stitch in time.", 1)
    (folder / "metadata.csv").write_text(rows)  # row 1: shard 0 only
    changed = prepare(_source(folder), out, SETTINGS)
    assert (changed.built, changed.reused) == (1, 2)
    assert [s["key"] for s in changed.index["shards"]][1:] == [s["key"] for s in first.index["shards"]][1:]
    assert changed.index["shards"][0]["key"] != first.index["shards"][0]["key"]


def test_tasks_split_the_shards_and_the_last_one_writes_the_index(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "data")
    whole = prepare(_source(folder), tmp_path / "one", SETTINGS).index
    first = prepare(_source(folder), tmp_path / "two", SETTINGS, task=0, tasks=2)
    assert first.built == 2 and first.index is None and not (tmp_path / "two" / "index.json").exists()
    second = prepare(_source(folder), tmp_path / "two", SETTINGS, task=1, tasks=2, num_proc=2)
    assert second.built == 1 and second.index is not None
    assert [s["sha256"] for s in second.index["shards"]] == [s["sha256"] for s in whole["shards"]]


def test_a_shorter_source_removes_the_shards_it_no_longer_has(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "data")
    out = tmp_path / "out"
    prepare(_source(folder), out, SETTINGS)
    prepare(_source(folder), out, SETTINGS, max_items=5)
    assert sorted(p.name for p in out.glob("shard-*")) == [f"shard-00000{i}.{x}" for i in range(2) for x in ("json", "tar")]


def test_training_data_from_shards_equals_the_audiofolder(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "data")
    prepare(_source(folder), tmp_path / "out", SETTINGS)
    cfg_dir = DataConfig(train=str(folder), cache_dir=str(tmp_path / "cache"))
    cfg_shards = DataConfig(train=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
    assert isinstance(open_split("train", cfg_shards), ShardSet)
    a, b = load_split("train", cfg_dir, None), load_split("train", cfg_shards, None)
    assert len(a.dataset) == len(b.dataset) == 10 and len(a.skips) == len(b.skips) == 2
    for i in range(10):
        x, y = a.dataset[i], b.dataset[i]
        assert (x.id, x.text, x.scale, x.segments) == (y.id, y.text, y.scale, y.segments)
        assert (x.pcm == y.pcm).all()
    assert b.total_items == 12
    first = DataConfig(train=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), max_train_samples=5)
    assert open_split("train", first).meta.column("id").to_pylist() == [a.dataset[i].id for i in range(5)]


def test_remote_shards_are_fetched_checked_and_cached_within_the_cap(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "data")
    out = tmp_path / "out"
    index = prepare(_source(folder), out, SETTINGS).index
    biggest = max(s["bytes"] for s in index["shards"])
    remote = open_shards(f"pipe:cat {out}/{{name}}", tmp_path / "cache", max_bytes=biggest + 20_000)
    local = open_shards(str(out), tmp_path / "unused", max_bytes=1)
    assert [remote.audio(r) for r in range(10)] == [local.audio(r) for r in range(10)]
    cached = [p for p in (tmp_path / "cache").rglob("*.tar")]
    assert len(cached) == 1 and cached[0].name.endswith("shard-000002.tar")  # the cap keeps the newest only
    remote.will_need(remote.meta.column("shard").to_numpy()[:1] * 0)  # shard 0 in the background
    assert remote.audio(0) == local.audio(0)
    through_fsspec = open_shards(f"local://{out}/index.json", tmp_path / "cache3", max_bytes=10**9)
    assert [through_fsspec.audio(r) for r in range(10)] == [local.audio(r) for r in range(10)]
    assert len(list((tmp_path / "cache3").rglob("*.tar"))) == 3
    data = bytearray((out / "shard-000001.tar").read_bytes())
    data[2000] ^= 0xFF  # inside the first FLAC member
    (out / "shard-000001.tar").write_bytes(bytes(data))
    tampered = open_shards(f"pipe:cat {out}/{{name}}", tmp_path / "cache2", max_bytes=10**9)
    with pytest.raises(DataError, match="SHA-256"):
        tampered.audio(4)


@pytest.mark.parametrize("broken, message", [
    ("missing", "no index.json"),
    ("pipe", "exited with 1"),
    ("version", "not a whisper-toolkit shard index"),
    ("table", "does not match index.json"),
])
def test_a_broken_prepared_directory_is_one_clear_error(tmp_path: Path, broken: str, message: str) -> None:
    folder = _folder(tmp_path / "data", n=4)
    out = tmp_path / "out"
    prepare(_source(folder), out, SETTINGS)
    index = json.loads((out / "index.json").read_text())
    if broken == "missing":
        spec = str(tmp_path / "nowhere")
    elif broken == "pipe":
        spec = f"pipe:cat {tmp_path}/nowhere/{{name}}"
    else:
        spec = str(out)
        if broken == "version":
            (out / "index.json").write_text(json.dumps({**index, "version": 99}))
        else:
            table = json.loads((out / "shard-000000.json").read_text())
            (out / "shard-000000.json").write_text(json.dumps({**table, "key": "stale"}))
    with pytest.raises(DataError, match=message):
        open_shards(spec, tmp_path / "cache", 10**9)


def test_prepare_cli_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from toolkit.cli import main

    folder = _folder(tmp_path / "data", n=4)
    assert main(["prepare", "--data", str(folder), "--out", str(tmp_path / "out"), "--shard-size", "3"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["shards"] == 2 and summary["samples"] == 4 and summary["skipped"] == 2 and summary["index_written"]
    assert main(["prepare", "--data", str(folder), "--out", str(tmp_path / "o2"), "--shard-size", "0"]) == 2
    assert "--shard-size must be >= 1" in capsys.readouterr().err


def test_a_shard_that_disappears_is_one_clear_error(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "data", n=4)
    prepare(_source(folder), tmp_path / "out", SETTINGS)
    shards = open_shards(str(tmp_path / "out"), tmp_path / "cache", 10**9)
    (tmp_path / "out" / "shard-000000.tar").unlink()
    with pytest.raises(DataError, match="shard missing"):
        shards.audio(0)


def test_loader_workers_memory_map_the_metadata_instead_of_copying_it(tmp_path: Path) -> None:
    import pickle

    folder = _folder(tmp_path / "data", n=6)
    prepare(_source(folder), tmp_path / "out", SETTINGS)
    shards = open_shards(str(tmp_path / "out"), tmp_path / "cache", 10**9).subset(np.array([5, 0, 3]))
    payload = pickle.dumps(shards)
    assert len(payload) < 5000  # the table itself stays out of the pickle
    copy = pickle.loads(payload)
    assert copy.meta.equals(shards.meta) and [copy.audio(r) for r in range(3)] == [shards.audio(r) for r in range(3)]
    assert len(list((tmp_path / "cache" / "meta").glob("*.arrow"))) == 1
