"""slurm/prepare.sbatch as a 2-task job array on the local Slurm cluster (see tests/test_slurm.py)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_slurm import JOB_TIMEOUT_S, cluster, job_env, submit, tail, tiny  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow


def wait_array(job: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, timeout=30).stdout
        if not out.strip():
            return
        time.sleep(1)
    subprocess.run(["scancel", job], timeout=30)
    pytest.fail(f"array job {job} not done after {JOB_TIMEOUT_S} s:\n" + "\n".join(tail(log) for log in logs))


def test_prepare_sbatch_array_writes_the_shards_and_one_index(tiny: dict[str, Path]) -> None:  # noqa: F811
    out = tiny["root"] / "shards"
    train = tiny["root"] / "data" / "train"
    log = tiny["root"] / "prepare-%a.log"
    job = submit("slurm/prepare.sbatch", ["--array=0-1", f"--output={log}"],
                 ["--data", str(train), "--out", str(out), "--shard-size", "3"], job_env(tiny))
    logs = [tiny["root"] / f"prepare-{task}.log" for task in (0, 1)]
    wait_array(job, logs)
    summaries = [json.loads(log.read_text().strip().splitlines()[-1]) for log in logs]
    assert [(s["task"], s["tasks"]) for s in summaries] == [(0, 2), (1, 2)]
    assert sum(s["shards_built"] for s in summaries) == 3  # 8 rows, 3 per shard: tasks build 2 and 1
    assert any(s["index_written"] for s in summaries)
    index = json.loads((out / "index.json").read_text())
    assert index["samples"] == 8 and len(index["shards"]) == 3
