"""Training on prepared shards: the same weights as on the audiofolder, and an exact resume after SIGKILL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import kill_tree, launch
from tests.training.test_resume import args_for, start, wait_for, weights
from toolkit.data.prepare import PrepareSettings, prepare
from toolkit.data.sources import open_source

pytestmark = pytest.mark.slow

PACKED = ("data.packing=true", "training.global_batch_size=4", "training.micro_batch_size=2")


def test_shards_train_like_the_audiofolder_and_resume_exactly(tiny_model: Path, corpus: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    prepare(open_source(str(corpus / "train"), split="train", text_column="sentence"), shards,
            PrepareSettings(shard_size=10))
    reference = tmp_path / "reference"
    assert launch(args_for(tiny_model, corpus, reference, *PACKED), processes=2).returncode == 0

    broken = tmp_path / "broken"
    on_shards = args_for(tiny_model, corpus, broken, *PACKED, f"data.train={shards}")
    proc = start(on_shards, processes=2)
    wait_for(broken / "checkpoints" / "checkpoint-4", proc)
    kill_tree(proc)
    assert not (broken / "final").exists(), "the run finished before it could be killed"
    resumed = launch(on_shards, processes=2)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr
    assert "4 prepared shards" in resumed.stderr
    a, b = weights(reference), weights(broken)
    assert all((a[k] == b[k]).all() for k in a), "the shard run's weights differ from the audiofolder run's"
    results = json.loads((broken / "results.json").read_text())
    assert results["steps"] == 8 and results["world_size"] == 2 and results["packing"]
