"""Checkpoint discovery, rotation (keeping the best), and clean-up of partial saves."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest

from toolkit.training.batching import BatchPlan
from toolkit.training.checkpoint import CheckpointManager, CheckpointWriteError, TrainState

PLAN = BatchPlan.create(8, 4, 1)


class FakeAccelerator:
    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, directory: str, safe_serialization: bool = True) -> None:
        (Path(directory) / "model.safetensors").write_text("weights")


def test_save_rotate_keep_best(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpt", keep=2, accelerator=FakeAccelerator())
    state = TrainState()
    for step, wer in [(10, 50.0), (20, 30.0), (30, 40.0), (40, 45.0)]:
        state.step = step
        state.record_eval(step, {"wer": wer})
        manager.save(state, PLAN)
    assert [s for s, _ in manager.complete()] == [20, 30, 40]
    assert state.best_step == 20
    loaded = TrainState.load(manager.latest())
    assert loaded.step == 40 and loaded.best_metric == 30.0 and len(loaded.eval_history) == 4


def test_partial_checkpoints_are_ignored_and_cleaned(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpt", keep=3, accelerator=FakeAccelerator())
    state = TrainState(step=5)
    manager.save(state, PLAN)
    (tmp_path / "ckpt" / ".checkpoint-10.tmp").mkdir()
    (tmp_path / "ckpt" / "checkpoint-15").mkdir()  # no trainer_state.json: not complete
    assert manager.latest() == tmp_path / "ckpt" / "checkpoint-5"
    manager.clean_partial()
    assert not (tmp_path / "ckpt" / ".checkpoint-10.tmp").exists()


def test_a_checkpoint_that_does_not_match_its_manifest_is_passed_over(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpt", keep=3, accelerator=FakeAccelerator())
    for step in (1, 2):
        manager.save(TrainState(step=step), PLAN, {"last_epoch": step})
    saved = manager.latest_saved()
    assert saved is not None and saved.state.step == 2 and saved.scheduler == {"last_epoch": 2}
    (tmp_path / "ckpt" / "checkpoint-2" / "model.safetensors").write_text("weightz")
    saved = manager.latest_saved()
    assert saved is not None and saved.state.step == 1


def test_a_full_disk_gives_a_clear_error_and_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = CheckpointManager(tmp_path / "ckpt", keep=3, accelerator=FakeAccelerator())
    manager.save(TrainState(step=1), PLAN)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10))
    with pytest.raises(CheckpointWriteError, match=r"no space left on .* needs about 0 MB and 0 MB are free"):
        manager.save(TrainState(step=2), PLAN)
    monkeypatch.undo()

    def full(directory: str, safe_serialization: bool = True) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(manager.accelerator, "save_state", full)
    with pytest.raises(CheckpointWriteError, match=r"could not write a checkpoint .*No space left.* MB free"):
        manager.save(TrainState(step=2), PLAN)
    assert [s for s, _ in manager.complete()] == [1] and not list((tmp_path / "ckpt").glob(".checkpoint-*"))
