"""``python -m toolkit bench --config``: the record's figures, ``--clips``, and what it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import last_json_line, launch, train_args

KEYS = ("train_samples_per_second", "train_windows_per_second", "audio_hours_per_hour", "tokens_per_second", "mfu",
        "peak_memory_bytes", "loader_wait_fraction", "eval_utterances_per_second", "eval_wer_normalized",
        "preprocess_seconds", "preprocessed_bytes", "world_size", "device", "settings", "steady_samples_per_second")


def bench_args(model: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    args = train_args(model, corpus, out, *extra)
    return ["bench", *args[1:]]


@pytest.mark.slow
def test_bench_prints_the_figures_and_counts_clips_of_packed_windows(tiny_model: Path, corpus: Path, tmp_path: Path) -> None:
    result = launch([*bench_args(tiny_model, corpus, tmp_path / "plain"), "--steps", "3", "--warmup-steps", "1"],
                    processes=1)
    assert result.returncode == 0, result.stderr[-3000:]
    record = last_json_line(result.stdout)
    assert all(key in record for key in KEYS)
    assert record["steps"] == 3 and record["train_clips"] == 24 == record["train_windows"]
    assert record["world_size"] == 1 and record["mfu"] is None  # no peak for a CPU
    assert record["eval_utterances"] == 10 and record["eval_utterances_per_second"] > 0
    assert record["preprocessed_bytes"] > 0 and 0 <= record["loader_wait_fraction"] < 1
    assert "settings.global_batch_size" in result.stdout  # the human table, before the JSON line
    lines = [json.loads(x) for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert all("windows_per_second" in x and "mfu" in x and "audio_hours_per_hour" in x for x in lines if "loss" in x)

    # Packed: --clips picks the step count from the windows' clips; a peak gives an MFU.
    packed = launch([*bench_args(tiny_model, corpus, tmp_path / "packed", "data.packing=true", "data.eval=null",
                                 "training.global_batch_size=1", "training.micro_batch_size=1"),
                     "--clips", "40", "--peak-tflops", "1"], processes=1)
    assert packed.returncode == 0, packed.stderr[-3000:]
    record = last_json_line(packed.stdout)
    assert record["train_clips"] >= 40 > record["train_clips"] - 23  # the last window overshoots by < one window
    assert record["train_windows"] == record["steps"] < record["train_clips"]
    assert record["mfu"] is not None and record["mfu"] > 0 and record["eval_utterances_per_second"] is None
    results = json.loads((tmp_path / "packed" / "results.json").read_text())
    assert results["packing"] is True and results["train_clips"] == record["train_clips"]


def test_bench_refuses_steps_with_clips_and_a_missing_recipe(tiny_model: Path, corpus: Path, tmp_path: Path) -> None:
    from toolkit.cli import EXIT_CONFIG, main

    args = bench_args(tiny_model, corpus, tmp_path / "run")
    assert main([*args, "--steps", "1", "--clips", "8"]) == EXIT_CONFIG
    assert main(["bench"]) == EXIT_CONFIG  # neither --config nor `features`


def test_overrides_may_follow_options() -> None:
    from toolkit.cli import parse

    args = parse(["bench", "--config", "r.yaml", "--clips", "4", "data.packing=true", "training.seed=1"])
    assert args.overrides == ["data.packing=true", "training.seed=1"] and args.clips == 4
    with pytest.raises(SystemExit):
        parse(["train", "--config", "r.yaml", "--bogus"])
