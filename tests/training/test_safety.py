"""Never lose a run: damaged checkpoints, a planted pickle, a changed recipe, two runs in one
directory, a dead launcher, a full disk. Each test reproduces the fault on a real (1- or 2-process)
run of a tiny model, then checks what the toolkit does."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, launch, train_args
from toolkit.training.lock import OutputLock

TIMEOUT_S = 300


class Planted:
    """Unpickling this runs ``os.system`` (what a planted checkpoint file would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def args_for(model: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    """A constant lr schedule: extending such a run changes nothing already optimised, so it resumes freely."""
    return train_args(model, corpus, out, "data.eval=null", "training.save_every=1", "output.keep_checkpoints=3",
                      "training.global_batch_size=4", "training.lr_scheduler=constant", *extra)


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, corpus: Path) -> Path:
    """A finished 3-step run with checkpoints 1, 2 and 3, to copy and damage."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert launch(args_for(tiny_model, corpus, out, "training.max_steps=3"), processes=1,
                  timeout=TIMEOUT_S).returncode == 0
    return out


def copy_run(base: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base, out)
    shutil.rmtree(out / "final")
    return out


def truncate(path: Path, size: int) -> None:
    with path.open("r+b") as handle:
        handle.truncate(size)


DAMAGE = {
    "truncated weights": lambda c: truncate(c / "model.safetensors", 1000),
    "truncated state": lambda c: truncate(c / "trainer_state.json", 10),
    "empty state": lambda c: (c / "trainer_state.json").write_text("{}"),
    "state deleted": lambda c: (c / "trainer_state.json").unlink(),
    "manifest deleted": lambda c: (c / "manifest.json").unlink(),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(
    damage: str, three_steps: Path, tmp_path: Path, tiny_model: Path, corpus: Path
) -> None:
    out = copy_run(three_steps, tmp_path)
    DAMAGE[damage](out / "checkpoints" / "checkpoint-3")
    result = launch(args_for(tiny_model, corpus, out, "training.max_steps=5"), processes=1, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint-3 cannot be resumed from" in result.stderr and "resumed from" in result.stderr
    assert "checkpoint-2 at step 2" in result.stderr
    assert json.loads((out / "results.json").read_text())["steps"] == 5
    # Step 3 was redone and its checkpoint rewritten whole (not skipped because the directory existed).
    from toolkit.training.manifest import verify

    assert verify(out / "checkpoints" / "checkpoint-3") is None


@pytest.mark.slow
def test_a_planted_pickle_is_never_unpickled(three_steps: Path, tmp_path: Path, tiny_model: Path, corpus: Path) -> None:
    out = copy_run(three_steps, tmp_path)
    marker = tmp_path / "pwned"
    with (out / "checkpoints" / "checkpoint-3" / "custom_checkpoint_0.pkl").open("wb") as handle:
        pickle.dump(Planted(marker), handle)
    result = launch(args_for(tiny_model, corpus, out, "training.max_steps=4"), processes=1, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not marker.exists()
    assert "unexpected file(s) not written by the toolkit: custom_checkpoint_0.pkl" in result.stderr


def test_a_planted_deepspeed_shard_is_refused_before_deepspeed_unpickles_it(tmp_path: Path) -> None:
    from toolkit.config import ConfigError
    from toolkit.training.zero import CHECKPOINT_SUBDIR, check_shards_are_plain

    marker = tmp_path / "pwned"
    shards = tmp_path / "checkpoint-1" / CHECKPOINT_SUBDIR
    shards.mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(2)}}, shards / "mp_rank_00_model_states.pt")
    check_shards_are_plain(tmp_path / "checkpoint-1")  # plain tensors and containers pass
    torch.save({"optimizer": Planted(marker)}, shards / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(ConfigError, match="not a plain DeepSpeed shard"):
        check_shards_are_plain(tmp_path / "checkpoint-1")
    assert not marker.exists()


@pytest.mark.slow
def test_a_torn_metrics_line_does_not_block_resume(three_steps: Path, tmp_path: Path, tiny_model: Path, corpus: Path) -> None:
    out = copy_run(three_steps, tmp_path)
    with (out / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 4, "loss": 1.2')  # a kill during a write
    result = launch(args_for(tiny_model, corpus, out, "training.max_steps=4"), processes=1, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x][-1] == 4


@pytest.mark.slow
def test_a_changed_recipe_is_refused_with_a_diff_unless_forced(
    three_steps: Path, tmp_path: Path, tiny_model: Path, corpus: Path
) -> None:
    out = copy_run(three_steps, tmp_path)
    recipe = (out / "recipe.yaml").read_text()
    changed = args_for(tiny_model, corpus, out, "training.max_steps=5", "training.learning_rate=5e-4",
                       "training.lr_scheduler=linear")
    refused = launch(changed, processes=1, timeout=TIMEOUT_S)
    assert refused.returncode == 2
    assert "training.learning_rate: 0.001 -> 0.0005" in refused.stderr
    assert "training.lr_scheduler: 'constant' -> 'linear'" in refused.stderr and "training.max_steps: None -> 5" in refused.stderr
    assert "training.resume=force" in refused.stderr
    forced = launch([*changed, "training.resume=force"], processes=1, timeout=TIMEOUT_S)
    assert forced.returncode == 0, forced.stderr[-3000:]
    state = json.loads((out / "checkpoints" / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["recipe_changes"][0]["step"] == 3
    assert state["recipe_changes"][0]["changes"]["training.learning_rate"] == [0.001, 0.0005]
    assert (out / "recipe.yaml").read_text() == recipe and (out / "recipe.resume-3.yaml").exists()


@pytest.mark.slow
def test_changed_training_data_is_refused(three_steps: Path, tmp_path: Path, tiny_model: Path, corpus: Path) -> None:
    out = copy_run(three_steps, tmp_path)
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    metadata = data / "train" / "metadata.csv"
    metadata.write_text(metadata.read_text().replace("lazy dog", "lazy cat"))
    result = launch(args_for(tiny_model, data, out, "training.max_steps=3"), processes=1, timeout=TIMEOUT_S)
    assert result.returncode == 2 and "data.train (content)" in result.stderr


@pytest.mark.slow
def test_a_second_run_on_the_same_output_dir_is_refused(tmp_path: Path, tiny_model: Path, corpus: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    with OutputLock(out):
        result = launch(args_for(tiny_model, corpus, out, "training.max_steps=1"), processes=1, timeout=TIMEOUT_S)
    assert result.returncode == 2 and "is in use by another run" in result.stderr and '"pid"' in result.stderr
    assert not (out / "checkpoints").exists()


@pytest.mark.slow
def test_the_lock_is_held_past_the_first_steps(tmp_path: Path, tiny_model: Path, corpus: Path) -> None:
    from tests.training.test_resume import kill_tree, start, wait_for

    out = tmp_path / "run"
    first = start(args_for(tiny_model, corpus, out, "training.max_steps=500", "training.save_every=2"), processes=1)
    try:
        wait_for(out / "checkpoints" / "checkpoint-2", first)  # two steps done
        second = launch(args_for(tiny_model, corpus, out, "training.max_steps=1"), processes=1, timeout=TIMEOUT_S)
        assert second.returncode == 2 and "is in use by another run" in second.stderr
    finally:
        kill_tree(first)


@pytest.mark.slow
def test_ranks_stop_and_checkpoint_when_the_launcher_is_killed(tmp_path: Path, tiny_model: Path, corpus: Path) -> None:
    out = tmp_path / "run"
    args = args_for(tiny_model, corpus, out, "training.max_steps=500", "training.save_every=0")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "toolkit", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + TIMEOUT_S
    while not (out / "metrics.jsonl").exists() or '"loss"' not in (out / "metrics.jsonl").read_text():
        assert time.monotonic() < deadline and proc.poll() is None, "the run did not start"
        time.sleep(0.5)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "toolkit" in " ".join(p.cmdline())]
    assert len(ranks) == 2
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher's group; the ranks live in sessions of their own
    proc.wait()
    _, alive = psutil.wait_procs(ranks, timeout=120)
    assert not alive, "ranks outlived their launcher"
    saved = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert saved, "no checkpoint from the stop signal"
    assert all(bool(torch.isfinite(w).all()) for w in load_file(saved[-1] / "model.safetensors").values())


@pytest.fixture
def small_disk(tmp_path: Path) -> Path:
    """A 9 MB tmpfs: room for one checkpoint of the tiny model (about 5 MB), not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=9m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()[:100]})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_stops_with_a_clear_message_and_an_intact_checkpoint(
    small_disk: Path, tiny_model: Path, corpus: Path
) -> None:
    from toolkit.training.manifest import verify

    out = small_disk / "run"
    result = launch(args_for(tiny_model, corpus, out, "training.max_steps=4"), processes=1, timeout=TIMEOUT_S)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "no space left on" in result.stderr and "checkpoint-1 is intact" in result.stderr
    assert "Traceback" not in result.stderr
    assert verify(out / "checkpoints" / "checkpoint-1") is None
    assert not list((out / "checkpoints").glob(".checkpoint-*"))
