"""The auto batch-size finder: the back-off arithmetic, the fault injector, and real 2-process runs in
which one rank runs out of memory (DDP, DeepSpeed ZeRO-2, LoRA on an int8 base).

The multi-process runs compare with a run started directly at the smaller micro-batch (same seed,
dropout-free model): equal loss curves and final weights show that no sample was lost or doubled and
no optimizer step was lost or repeated. Every launch has a timeout, so a hang fails instead of blocking.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ds_launch, launch, train_args
from toolkit import oom
from toolkit.config import ConfigError
from toolkit.training import finder
from toolkit.training.batching import BatchPlan, StepBatchSampler, StepSampler

TIMEOUT_S = 300


# -- arithmetic and parts ---------------------------------------------------------------------------


def test_back_off_halves_micro_and_doubles_accumulation_keeping_the_global_batch() -> None:
    plan = BatchPlan.create(64, 16, 4)
    sizes = []
    while plan is not None:
        assert plan.micro_batch_size * plan.accumulation * plan.world_size == 64
        sizes.append((plan.micro_batch_size, plan.accumulation))
        plan = plan.smaller()
    assert sizes == [(16, 1), (8, 2), (4, 4), (2, 8), (1, 16)]


def test_back_off_with_a_per_rank_batch_that_is_not_a_power_of_two_stays_on_divisors() -> None:
    plan = BatchPlan.create(24, 12, 2)
    sizes = []
    while plan is not None:
        sizes.append(plan.micro_batch_size)
        plan = plan.smaller()
    assert sizes == [12, 6, 3, 1]


def test_a_global_batch_that_does_not_split_over_the_processes_is_refused() -> None:
    with pytest.raises(ConfigError, match="cannot be split evenly over 3 processes"):
        BatchPlan.create(16, 4, 3)
    with pytest.raises(ValueError, match="does not divide"):
        BatchPlan.create(16, 4, 2).with_micro_batch(3)


def test_step_batch_sampler_skips_the_micro_batches_a_continued_step_already_did() -> None:
    plan = BatchPlan.create(8, 2, 1)
    sampler = StepSampler(20, seed=1, rank=0)
    full = list(StepBatchSampler(sampler, plan, 3, 5))
    skipped = StepBatchSampler(sampler, plan, 3, 5, skip_samples=3 * plan.micro_batch_size)
    assert list(skipped) == full[3:] and len(skipped) == len(full) - 3


def test_search_walks_down_to_the_largest_size_that_fits_on_every_rank() -> None:
    tried: list[int] = []

    def attempt(micro: int) -> list[int]:
        tried.append(micro)
        return [1] if micro > 3 else []

    plan, backoffs = finder.search(BatchPlan.create(32, 16, 2), attempt)
    assert plan.micro_batch_size == 2 and plan.accumulation == 8 and tried == [16, 8, 4, 2]
    assert [b.to_dict() for b in backoffs] == [{"step": 0, "from": 16, "to": 8}, {"step": 0, "from": 8, "to": 4},
                                               {"step": 0, "from": 4, "to": 2}]
    with pytest.raises(oom.OutOfMemoryAtMicroBatchOne, match=r"rank\(s\) \[0\]"):
        finder.search(BatchPlan.create(4, 4, 1), lambda micro: [0])


def test_the_worst_case_batch_is_full_windows_with_the_longest_label() -> None:
    batch = finder.worst_case_batch(3, 80, 3000, 448, 51865, torch.device("cpu"))
    assert batch.input_features.shape == (3, 80, 3000) and batch.labels is not None
    assert batch.labels.shape == (3, 448) and int(batch.labels.max()) < 51865


# -- real runs on 2 processes -------------------------------------------------------------------------


def args_for(model: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return train_args(model, corpus, out, "data.eval=null", "training.max_steps=3", "training.global_batch_size=16",
                      *extra)


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def assert_same_training(a: Path, b: Path, *, weights: str = "final/model.safetensors") -> None:
    assert losses(a) == pytest.approx(losses(b), rel=1e-5) and len(losses(a)) == 3
    wa, wb = load_file(a / weights), load_file(b / weights)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def reference(no_dropout: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DDP on 2 processes started directly at micro-batch 2 (global 16 = 2 x 4 x 2)."""
    out = tmp_path_factory.mktemp("reference")
    result = launch(args_for(no_dropout, corpus, out, "training.micro_batch_size=2"), processes=2, timeout=TIMEOUT_S)
    assert result.returncode == 0
    assert results(out)["world_size"] == 2 and results(out)["backoffs"] == []
    return out


@pytest.mark.slow
def test_oom_on_rank_1_mid_step_backs_off_both_ranks_and_trains_as_the_smaller_micro_batch(
    no_dropout: Path, corpus: Path, reference: Path, tmp_path: Path
) -> None:
    # Rank 1 fails on the step's second micro-batch of 4: the first one's gradient is already in.
    out = tmp_path / "run"
    result = launch(args_for(no_dropout, corpus, out, "training.micro_batch_size=4"), processes=2,
                    env={oom.INJECT_ENV: "1:2:1"}, timeout=TIMEOUT_S)
    assert result.returncode == 0
    summary = results(out)
    assert summary["world_size"] == 2
    assert (summary["micro_batch_size"], summary["gradient_accumulation_steps"], summary["global_batch_size"]) == (2, 4, 16)
    assert summary["backoffs"] == [{"step": 0, "from": 4, "to": 2}] and summary["probe"] is None
    # Both ranks learnt of it (each logs the back-off), and metrics.jsonl records it at its step.
    for rank in (0, 1):
        assert f"rank {rank}: out of memory on rank(s) [1] at step 0: micro-batch 4 -> 2" in result.stderr
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 0, "backoff": {"step": 0, "from": 4, "to": 2}, "micro_batch_size": 2,
            "gradient_accumulation_steps": 4} in lines
    assert_same_training(out, reference)


@pytest.mark.slow
def test_the_probe_finds_the_size_before_the_first_step_and_changes_nothing_else(
    no_dropout: Path, corpus: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    # The final evaluation (batch 4, 10 clips) backs off too, on its own.
    args = args_for(no_dropout, corpus, out, "training.micro_batch_size=auto", f"data.eval={corpus / 'dev'}",
                    "evaluation.batch_size=4")
    result = launch(args, processes=2, env={oom.INJECT_ENV: "1:2"}, timeout=TIMEOUT_S)
    assert result.returncode == 0
    summary = results(out)
    assert summary["probe"]["from"] == 8 and summary["probe"]["to"] == 2
    assert summary["backoffs"] == [{"step": 0, "from": 8, "to": 4}, {"step": 0, "from": 4, "to": 2}]
    assert summary["backoff_seconds"] == 0  # nothing failed once training had started
    assert summary["eval_batch_size"] == 2 and summary["eval_backoffs"] == [{"step": 3, "from": 4, "to": 2}]
    assert summary["eval"]["num_samples"] == 10
    assert_same_training(out, reference)


@pytest.mark.slow
def test_resume_keeps_the_found_micro_batch_without_probing(no_dropout: Path, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = args_for(no_dropout, corpus, out, "training.micro_batch_size=auto", "training.save_every=1",
                    "output.keep_checkpoints=5")
    first = launch(args, processes=2, env={oom.INJECT_ENV: "1:2"}, timeout=TIMEOUT_S)
    assert first.returncode == 0 and results(out)["micro_batch_size"] == 2
    state = json.loads((out / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert (state["micro_batch_size"], state["gradient_accumulation_steps"]) == (2, 4)
    # Resumed without the injector: a run that forgot the size would train (and probe) at 8.
    # A longer linear schedule is a changed optimisation: resumed on purpose.
    again = launch([*args, "training.max_steps=5", "training.resume=force"], processes=2, timeout=TIMEOUT_S)
    assert again.returncode == 0 and "resumed from" in again.stderr
    summary = results(out)
    assert summary["steps"] == 5 and summary["micro_batch_size"] == 2 and summary["gradient_accumulation_steps"] == 4
    assert summary["probe"] is None and len(summary["backoffs"]) == 2  # the first run's, kept
    resumed = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["micro_batch_size"] for x in resumed if x["step"] > 3 and "loss" in x] == [2, 2]


@pytest.mark.slow
def test_oom_at_micro_batch_1_stops_every_rank_with_a_clear_message(
    no_dropout: Path, corpus: Path, tmp_path: Path
) -> None:
    result = launch(args_for(no_dropout, corpus, tmp_path / "run", "training.micro_batch_size=2"), processes=2,
                    env={oom.INJECT_ENV: "1:0"}, timeout=TIMEOUT_S)
    assert result.returncode != 0
    for rank in (0, 1):
        assert f"out of memory [rank {rank}]: rank(s) [1] ran out of memory at micro-batch 1" in result.stderr
    assert "python -m toolkit plan" in result.stderr and "lora-int8" in result.stderr
    assert "Traceback" not in result.stderr.split("out of memory [rank")[0]


@pytest.mark.slow
def test_lora_on_an_int8_base_backs_off_to_the_same_training(no_dropout: Path, corpus: Path, tmp_path: Path) -> None:
    lora = ("training.method=lora", "model.quantization=int8", "training.learning_rate=1e-2")
    direct, backed = tmp_path / "direct", tmp_path / "backed"
    assert launch(args_for(no_dropout, corpus, direct, *lora, "training.micro_batch_size=2"), processes=2,
                  timeout=TIMEOUT_S).returncode == 0
    assert launch(args_for(no_dropout, corpus, backed, *lora, "training.micro_batch_size=8"), processes=2,
                  env={oom.INJECT_ENV: "1:2"}, timeout=TIMEOUT_S).returncode == 0
    assert results(backed)["backoffs"] == [{"step": 0, "from": 8, "to": 4}, {"step": 0, "from": 4, "to": 2}]
    assert results(backed)["world_size"] == 2
    assert_same_training(backed, direct, weights="final/adapter/adapter_model.safetensors")


@pytest.mark.slow
def test_deepspeed_zero2_backs_off_mid_step_and_after_the_probe(
    no_dropout: Path, corpus: Path, tmp_path: Path
) -> None:
    def run(name: str, micro: str, inject: str | None) -> Path:
        out = tmp_path / name
        env = {oom.INJECT_ENV: inject} if inject else {}
        result = ds_launch("ds_zero2", args_for(no_dropout, corpus, out, f"training.micro_batch_size={micro}"),
                           tmp_path / f"{name}.log", env=env, timeout=TIMEOUT_S)
        assert result.returncode == 0
        assert results(out)["world_size"] == 2
        return out

    direct = run("direct", "2", None)
    # The engine is re-prepared (micro 4 -> 2, accumulation 2 -> 4) after the first micro-batch of
    # step 0 has been reduced into ZeRO's buffers; the step continues with the rest of its samples.
    mid_step = run("mid-step", "4", "1:2:1")
    assert results(mid_step)["backoffs"] == [{"step": 0, "from": 4, "to": 2}]
    assert (results(mid_step)["micro_batch_size"], results(mid_step)["gradient_accumulation_steps"]) == (2, 4)
    assert_same_training(mid_step, direct)
    probed = run("probed", "auto", "1:2")
    assert results(probed)["probe"]["to"] == 2
    assert_same_training(probed, direct)


@pytest.mark.slow
def test_the_backoff_benchmark_compares_with_a_run_started_at_the_size_found(
    no_dropout: Path, corpus: Path, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    args = train_args(no_dropout, corpus, tmp_path / "unused", "data.eval=null", "training.max_steps=2")[1:]
    env = {**os.environ, "OMP_NUM_THREADS": "1", oom.INJECT_ENV: "0:2"}
    result = subprocess.run([sys.executable, "scripts/bench_backoff.py", "--start", "8", "--out", str(tmp_path),
                             "--", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["backed_off"]["micro_batch_size"] == 2 and len(report["backed_off"]["backoffs"]) == 2
    assert report["direct"]["start"] == "2" and report["direct"]["backoffs"] == []
    assert report["seconds_lost_to_backoff_and_probe"] > 0 and report["throughput_ratio"] > 0
