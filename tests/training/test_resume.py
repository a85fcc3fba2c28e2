"""Interrupted runs: SIGKILL mid-run resumes to the same weights; SIGTERM checkpoints and exits 75."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import ROOT, kill_tree, launch, train_args

pytestmark = pytest.mark.slow


def args_for(model: Path, corpus: Path, out: Path, *extra: str, steps: int = 8) -> list[str]:
    return train_args(model, corpus, out, "data.eval=null", "data.num_workers=1", f"training.max_steps={steps}",
                      "training.warmup_steps=2", "training.save_every=2", "output.keep_checkpoints=10", *extra)


def start(args: list[str], processes: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "toolkit", *args]
    if processes == 1:
        cmd = [sys.executable, "-m", "toolkit", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {path.name} appeared: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            kill_tree(proc)
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.05)


def weights(run: Path) -> dict:
    return load_file(run / "final" / "model.safetensors")


def test_sigkill_then_resume_matches_an_unbroken_run(tiny_model: Path, corpus: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    assert launch(args_for(tiny_model, corpus, reference), processes=2).returncode == 0

    broken = tmp_path / "broken"
    proc = start(args_for(tiny_model, corpus, broken), processes=2)
    wait_for(broken / "checkpoints" / "checkpoint-4", proc)
    kill_tree(proc)
    assert not (broken / "final").exists(), "the run finished before it could be killed"
    steps_done = max(int(p.name.split("-")[1]) for p in (broken / "checkpoints").glob("checkpoint-*"))
    assert steps_done < 8

    resumed = launch(args_for(tiny_model, corpus, broken), processes=2)
    assert resumed.returncode == 0
    assert f"resumed from {broken / 'checkpoints' / f'checkpoint-{steps_done}'} at step {steps_done}" in resumed.stderr
    results = json.loads((broken / "results.json").read_text())
    assert results["steps"] == 8 and results["world_size"] == 2
    a, b = weights(reference), weights(broken)
    assert all((a[k] == b[k]).all() for k in a), "resumed weights differ from the unbroken run"
    losses = [json.loads(line)["loss"] for line in (broken / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    ref_losses = [json.loads(line)["loss"] for line in (reference / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert len(ref_losses) == 8
    assert losses == ref_losses  # one line per step, none duplicated by the resume


def test_sigterm_to_the_process_group_checkpoints_and_exits_75(tiny_model: Path, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = args_for(tiny_model, corpus, out, "training.save_every=0", steps=40)
    proc = start(args, processes=1)
    wait_for(out / "metrics.jsonl", proc)
    # Like Slurm, signal every process of the job, DataLoader workers included.
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 75, proc.stderr.read()[-3000:]
    saved = [p.name for p in (out / "checkpoints").glob("checkpoint-*")]
    assert len(saved) == 1 and not (out / "final").exists()
    step = int(saved[0].split("-")[1])
    assert 0 < step < 40
