"""Packed training under ``accelerate launch``: the same windows on 1 and 2 processes, exact resume,
and clip/window counts in the outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import launch, train_args
from tests.training.test_resume import kill_tree, start, wait_for

pytestmark = pytest.mark.slow

PACKED = ("data.packing=true", "data.eval=null", "data.num_workers=1", "training.global_batch_size=2",
          "training.micro_batch_size=1", "training.max_steps=6", "training.warmup_steps=1", "training.save_every=2",
          "output.keep_checkpoints=10")


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


def test_packed_runs_match_on_one_and_two_processes_and_count_clips(
    no_dropout: Path, corpus: Path, tmp_path: Path
) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    assert launch(train_args(no_dropout, corpus, one, *PACKED), processes=1).returncode == 0
    assert launch(train_args(no_dropout, corpus, two, *PACKED), processes=2).returncode == 0
    a, b = weights(one), weights(two)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    results = json.loads((two / "results.json").read_text())
    assert results["packing"] is True and results["train_windows"] == 12  # 6 steps x 2 windows
    # 32 short clips pack into windows of many each: more clips than windows, and speech (gaps
    # not counted) of at most 30 s per window.
    assert results["train_clips"] > results["train_windows"]
    assert 0 < results["train_audio_hours"] * 3600 <= 30 * results["train_windows"]
    line = next(json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines() if '"loss"' in x)
    assert line["samples_per_second"] > line["windows_per_second"] > 0


def test_a_killed_packed_run_resumes_to_the_same_weights(no_dropout: Path, corpus: Path, tmp_path: Path) -> None:
    reference, broken = tmp_path / "reference", tmp_path / "broken"
    assert launch(train_args(no_dropout, corpus, reference, *PACKED), processes=2).returncode == 0
    args = train_args(no_dropout, corpus, broken, *PACKED)
    proc = start(args, processes=2)
    wait_for(broken / "checkpoints" / "checkpoint-2", proc)
    kill_tree(proc)
    assert not (broken / "final").exists(), "the run finished before it could be killed"
    assert launch(args, processes=2).returncode == 0
    a, b = weights(reference), weights(broken)
    assert all((a[k] == b[k]).all() for k in a), "resumed packed weights differ from the unbroken run"
