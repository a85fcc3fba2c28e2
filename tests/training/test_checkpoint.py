"""Checkpoint discovery, rotation (keeping the best), and clean-up of partial saves."""

from __future__ import annotations

from pathlib import Path

from toolkit.training.batching import BatchPlan
from toolkit.training.checkpoint import CheckpointManager, TrainState

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
