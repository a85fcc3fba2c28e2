"""slurm/train.sbatch and slurm/evaluate.sbatch on a real Slurm cluster, in CPU mode.

train.sbatch runs with three launch configs, DDP (multi_node.yaml) and DeepSpeed ZeRO-2 and ZeRO-3
across the nodes (multi_node_zero{2,3}.yaml, DS_ACCELERATOR=cpu), each once to completion and once
preempted and requeued.

Needs a cluster with at least two idle nodes; on a single machine `scripts/slurm_local_cluster.sh`
starts one (two virtual nodes n1, n2). Without one, these tests skip (they fail instead when
TOOLKIT_REQUIRE_SLURM=1, as CI sets after starting the cluster). output.dir and the test data live
under pytest's tmp dir, which every node must see: true for the local cluster (one machine).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import write_audiofolder

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 300
ZERO2 = "launch_configs/multi_node_zero2.yaml"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
NO_CLUSTER = "no Slurm cluster: run scripts/slurm_local_cluster.sh (as root) to start a local 2-node one"
# CI sets this after starting the cluster, so that a broken cluster fails instead of skipping
REQUIRE = os.environ.get("TOOLKIT_REQUIRE_SLURM") == "1"

pytestmark = pytest.mark.slow


def idle_nodes() -> int:
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return 0
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    nodes = {line.split()[0] for line in out.splitlines() if line.split()[1:] and line.split()[1] in ("idle", "mix")}
    return len(nodes)


@pytest.fixture(scope="module")
def cluster() -> None:
    nodes = idle_nodes()
    if nodes < 2:
        message = f"{NO_CLUSTER} (sbatch or 2 idle nodes not found; found {nodes})"
        if REQUIRE:
            pytest.fail(f"TOOLKIT_REQUIRE_SLURM=1 but {message}")
        pytest.skip(message)


# -- fixtures (the audio: tests/conftest.py's write_audiofolder) ------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, cluster: None) -> dict[str, Path]:
    from toolkit.testing import make_tiny_whisper

    root = tmp_path_factory.mktemp("slurm")
    model = make_tiny_whisper(root / "tiny-whisper")
    train = write_audiofolder(root / "data" / "train", 8)
    dev = write_audiofolder(root / "data" / "dev", 4, start_seed=100)
    recipe = {
        "model": {"name_or_path": str(model)},
        "data": {"train": str(train), "eval": str(dev), "num_workers": 1},
        "training": {
            "max_steps": 2, "global_batch_size": 4, "micro_batch_size": 2, "learning_rate": 1e-4,
            "warmup_steps": 0, "log_every": 1, "save_every": 0, "mixed_precision": "no",
        },
        "evaluation": {"at_start": False, "every_steps": 0, "batch_size": 4, "max_new_tokens": 4},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return {"root": root, "recipe": root / "recipe.yaml", "cache": root / "cache", "model": model, "dev": dev}


def job_env(tiny: dict[str, Path]) -> dict[str, str]:
    """What sbatch exports to the job: CPU mode, one process per node, this interpreter's venv."""
    env = dict(os.environ)
    env.update(
        TOOLKIT_CPU="1", GPUS_PER_NODE="1", RECIPE=str(tiny["recipe"]), TOOLKIT_ROOT=str(REPO),
        OMP_NUM_THREADS="1", WHISPER_TOOLKIT_CACHE=str(tiny["cache"]), TOKENIZERS_PARALLELISM="false",
    )
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if sys.prefix != sys.base_prefix:
        env["VENV"] = sys.prefix
    for key in [k for k in env if k.startswith(("SLURM_", "SBATCH_"))]:
        del env[key]  # a test run inside a Slurm allocation must not leak its own job's settings
    return env


def zero2_env(tiny: dict[str, Path], config: str = ZERO2) -> dict[str, str]:
    """DeepSpeed ZeRO-2 (or ``config``) over the nodes; TOOLKIT_CPU=1 stays: train.sbatch must turn it
    into DS_ACCELERATOR=cpu, not ACCELERATE_USE_CPU=1 (set here too, as a careless submitter's shell might)."""
    env = job_env(tiny)
    env.update(LAUNCH_CONFIG=config, ACCELERATE_USE_CPU="1")
    return env


def submit(script: str, sbatch_args: list[str], args: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *sbatch_args, script, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_info(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_job(job: str, log: Path, timeout: float = JOB_TIMEOUT_S) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job)
        if info.get("JobState") in TERMINAL:
            return info
        time.sleep(1)
    subprocess.run(["scancel", job], timeout=30)
    pytest.fail(f"job {job} not done after {timeout} s ({job_info(job).get('JobState')}):\n{tail(log)}")


def tail(log: Path, lines: int = 60) -> str:
    text = log.read_text(errors="replace") if log.exists() else "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def train_steps(run: Path) -> list[int]:
    return [line["step"] for line in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in line]


def deepspeed_layout(run: Path, step: int) -> tuple[int | None, int]:
    from toolkit.training.zero import checkpoint_layout

    return checkpoint_layout(run / "checkpoints" / f"checkpoint-{step}")


def preempt(tiny: dict[str, Path], name: str, max_steps: int, env: dict[str, str]) -> tuple[Path, Path, dict[str, str]]:
    """Submit a 2-node training job, send USR1 to its batch shell once training has begun (as
    --signal=B:USR1@120 does before the time limit) and wait for the requeued job to end."""
    out, log = tiny["root"] / f"run-{name}", tiny["root"] / f"train-{name}.log"
    job = submit("slurm/train.sbatch", ["--nodes=2", f"--output={log}"],
                 [f"output.dir={out}", f"training.max_steps={max_steps}"], env)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (metrics.exists() and metrics.read_text().strip()):  # training has begun
        info = job_info(job)
        if info.get("JobState") in TERMINAL or time.monotonic() > deadline:
            subprocess.run(["scancel", job], timeout=30)
            pytest.fail(f"job {job} never started training ({info.get('JobState')}):\n{tail(log)}")
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    return out, log, wait_job(job, log)


def test_train_sbatch_two_nodes(tiny: dict[str, Path]) -> None:
    out, log = tiny["root"] / "run-2nodes", tiny["root"] / "train-2nodes.log"
    job = submit("slurm/train.sbatch", ["--nodes=2", f"--output={log}"], [f"output.dir={out}"], job_env(tiny))
    info = wait_job(job, log)
    assert info["JobState"] == "COMPLETED", f"{info.get('JobState')} {info.get('ExitCode')}:\n{tail(log)}"
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2, results
    assert results["steps"] == 2


def test_train_sbatch_requeues_on_preemption(tiny: dict[str, Path]) -> None:
    """USR1 to the batch shell (as --signal=B:USR1@120 sends before the time limit): checkpoint,
    exit 75, `scontrol requeue`, and the restarted job resumes and finishes."""
    max_steps = 40  # the stop signal comes after step 1: leaves ~20 s of steps to interrupt
    _, results = requeued_run(tiny, "preempt", max_steps, job_env(tiny))
    assert results["world_size"] == 2
    assert results["steps"] == max_steps


def requeued_run(tiny: dict[str, Path], name: str, max_steps: int, env: dict[str, str]) -> tuple[Path, dict]:
    """A job preempted once (:func:`preempt`) that was requeued, resumed and completed: (output dir, results)."""
    out, log, info = preempt(tiny, name, max_steps, env)
    text = log.read_text(errors="replace")
    assert info["JobState"] == "COMPLETED", f"{info.get('JobState')} {info.get('ExitCode')}:\n{tail(log)}"
    assert int(info["Restarts"]) == 1, f"job was not requeued:\n{tail(log)}"
    assert "preempted (exit 75): requeueing" in text, tail(log)
    assert "resumed from" in text, tail(log)
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("stage", [2, 3])
def test_train_sbatch_two_nodes_zero(tiny: dict[str, Path], stage: int) -> None:
    """DeepSpeed ZeRO-2 and ZeRO-3 across 2 nodes: one `accelerate launch` per node (the 'standard' launcher)."""
    config = f"launch_configs/multi_node_zero{stage}.yaml"
    out, log = tiny["root"] / f"run-zero{stage}", tiny["root"] / f"train-zero{stage}.log"
    job = submit("slurm/train.sbatch", ["--nodes=2", f"--output={log}"], [f"output.dir={out}"],
                 zero2_env(tiny, config))
    info = wait_job(job, log)
    assert info["JobState"] == "COMPLETED", f"{info.get('JobState')} {info.get('ExitCode')}:\n{tail(log)}"
    assert f"launch config {config} (DeepSpeed)" in log.read_text(errors="replace"), tail(log)
    results = json.loads((out / "results.json").read_text())
    assert (results["world_size"], results["steps"]) == (2, 2), results
    # ZeRO shards, one optimizer partition per rank: DeepSpeed really ran (not dropped for plain DDP)
    assert deepspeed_layout(out, 2) == (stage, 2)


@pytest.mark.parametrize("stage", [2, 3])
def test_train_sbatch_zero_requeues_on_preemption(tiny: dict[str, Path], stage: int) -> None:
    """The preemption path of test_train_sbatch_requeues_on_preemption under ZeRO-2 and ZeRO-3 on 2
    nodes: every rank writes its DeepSpeed shards, the requeued job loads them and ends at max_steps."""
    max_steps = 30  # the stop signal comes after step 1 or 2: ~0.6 s a step here leaves ~15 s to interrupt
    config = f"launch_configs/multi_node_zero{stage}.yaml"
    out, results = requeued_run(tiny, f"preempt-zero{stage}", max_steps, zero2_env(tiny, config))
    assert (results["world_size"], results["steps"]) == (2, max_steps), results
    assert train_steps(out) == list(range(1, max_steps + 1)), "a step was lost or repeated by the resume"
    assert deepspeed_layout(out, max_steps) == (stage, 2)


def test_train_sbatch_refuses_a_one_machine_deepspeed_config_on_two_nodes(tiny: dict[str, Path]) -> None:
    """ds_zero2.yaml has no 'standard' multi-node launcher: accelerate would run pdsh (ssh) on 2 nodes."""
    out, log = tiny["root"] / "run-ds-refused", tiny["root"] / "train-ds-refused.log"
    env = {**zero2_env(tiny), "LAUNCH_CONFIG": "launch_configs/ds_zero2.yaml"}
    info = wait_job(submit("slurm/train.sbatch", ["--nodes=2", f"--output={log}"], [f"output.dir={out}"], env), log)
    assert info["JobState"] == "FAILED" and info["ExitCode"].startswith("2:"), f"{info}:\n{tail(log)}"
    assert "use launch_configs/multi_node_zero2.yaml or multi_node_zero3.yaml" in log.read_text(), tail(log)
    assert not out.exists()


def test_evaluate_sbatch(tiny: dict[str, Path]) -> None:
    result, log = tiny["root"] / "eval.json", tiny["root"] / "eval.log"
    args = ["--model", str(tiny["model"]), "--data", str(tiny["dev"]), "--split", "dev", "--batch-size", "4",
            "--max-new-tokens", "4"]
    job = submit("slurm/evaluate.sbatch", [f"--output={result}", f"--error={log}"], args, job_env(tiny))
    info = wait_job(job, log)
    assert info["JobState"] == "COMPLETED", f"{info.get('JobState')} {info.get('ExitCode')}:\n{tail(log)}"
    lines = result.read_text().strip().splitlines()
    assert len(lines) == 1, lines
    metrics = json.loads(lines[0])
    assert metrics["num_samples"] == 4
    assert metrics["wer"] >= 0
