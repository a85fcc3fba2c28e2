"""``data.streaming``: training from a stream, bad rows counted and replaced, and an exact resume at the
same world size (after SIGKILL, on 2 processes) that is refused at another."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, kill_tree, launch
from tests.training.test_resume import args_for, start, wait_for, weights
from toolkit.config import ConfigError, load_config
from toolkit.training.loop import TrainingRun

STREAM = ("data.streaming=true", "data.stream_block=5", "data.packing=false", "training.global_batch_size=4",
          "training.micro_batch_size=2")


def write_stream(corpus: Path, root: Path, shards: int = 4) -> Path:
    """``corpus``'s clips as Parquet shards (audio bytes and sentence), plus one corrupt row."""
    import csv

    rows = [{"audio": {"bytes": (corpus / r["file_name"]).read_bytes(), "path": r["file_name"]}, "sentence": r["sentence"]}
            for r in csv.DictReader((corpus / "metadata.csv").open())]
    rows.insert(5, {"audio": {"bytes": b"not audio", "path": "broken.flac"}, "sentence": "a broken clip"})
    root.mkdir(parents=True)
    per = -(-len(rows) // shards)
    for shard in range(shards):
        pq.write_table(pa.Table.from_pylist(rows[shard * per : (shard + 1) * per]), root / f"train-{shard:05d}.parquet")
    return root


@pytest.fixture(scope="module")
def stream_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_stream(corpus / "train", tmp_path_factory.mktemp("stream") / "parquet")


@pytest.mark.usefixtures("fresh_accelerate")
def test_a_streamed_run_counts_and_replaces_bad_rows(tiny_model: Path, corpus: Path, stream_dir: Path,
                                                      tmp_path: Path) -> None:
    args = args_for(tiny_model, corpus, tmp_path / "run", *STREAM, f"data.train={stream_dir}", steps=20)[3:]
    run = TrainingRun(load_config(ROOT / "recipes" / "demo.yaml", args))
    run.setup()
    assert run.data.train is None and run.feed.num_samples is None
    results = run.run()
    # 32 good rows and a broken one; 80 clips read the stream twice and a half, every step full.
    assert results["steps"] == 20 and results["train_clips"] == 80
    skipped = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert results["skipped"] == len(skipped) in (2, 3)  # once per epoch it was read in
    assert {s["id"] for s in skipped} == {"broken.flac"}
    assert skipped[0]["reason"].startswith("unreadable or corrupt audio")
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-20" / "trainer_state.json").read_text())
    assert len(state["stream"]) == 1 and state["stream"][0]["epoch"] == 2
    assert len(state["stream_skips"]) == len(skipped)


@pytest.mark.parametrize("override, message", [
    ("data.train=[{path: a}]", "data.streaming reads one data.train"),
    ("data.max_train_samples=4", "without data.max_train_samples"),
    ("data.stream_block=0", "data.stream_block must be >= 1"),
])
def test_streaming_settings_are_checked_on_load(tiny_model: Path, tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "recipes" / "demo.yaml", [f"model.name_or_path={tiny_model}", "data.train=x",
                                                      "data.streaming=true", override, f"output.dir={tmp_path}"])


@pytest.mark.slow
def test_sigkill_then_resume_of_a_stream_is_exact_on_the_same_world_size(tiny_model: Path, corpus: Path,
                                                                         stream_dir: Path, tmp_path: Path) -> None:
    streamed = (*STREAM, f"data.train={stream_dir}")
    reference = tmp_path / "reference"
    done = launch(args_for(tiny_model, corpus, reference, *streamed), processes=2)
    assert done.returncode == 0, done.stderr[-3000:]

    broken = tmp_path / "broken"
    proc = start(args_for(tiny_model, corpus, broken, *streamed), processes=2)
    wait_for(broken / "checkpoints" / "checkpoint-4", proc)
    kill_tree(proc)
    assert not (broken / "final").exists(), "the run finished before it could be killed"
    refused = launch(args_for(tiny_model, corpus, broken, *streamed), processes=1)
    assert refused.returncode != 0
    assert "checkpointed on 2 processes and resumes on 1" in refused.stderr
    resumed = launch(args_for(tiny_model, corpus, broken, *streamed), processes=2)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-3000:]
    a, b = weights(reference), weights(broken)
    assert all((a[k] == b[k]).all() for k in a), "the resumed stream's weights differ from the unbroken run's"
    results = json.loads((broken / "results.json").read_text())
    assert results["steps"] == 8 and results["world_size"] == 2
