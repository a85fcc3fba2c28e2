"""Checkpoints: atomic ``save_state`` directories, resume from the newest complete one, keep the best.

A checkpoint is written by all ranks into ``.checkpoint-N.tmp`` and renamed to ``checkpoint-N``
by rank 0 once every rank has finished, so a directory with the final name is always complete
(``output.dir`` must be on a filesystem all nodes share). The loop's own state (step, best WER,
back-offs, and the batch plan it trained at) is ``trainer_state.json`` inside it, next to accelerate's model, optimizer,
scheduler and per-rank RNG states.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from toolkit.training.batching import BatchPlan

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainState:
    """What the loop needs besides model/optimizer/scheduler/RNG to continue exactly."""

    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    backoffs: list[dict[str, int]] = field(default_factory=list)
    """Training back-offs, ``{step, from, to}``: the probe's (at the step it ran before) and the loop's."""
    eval_batch_size: int | None = None
    """The generation batch the last evaluation finished with; later ones start there."""
    eval_backoffs: list[dict[str, int]] = field(default_factory=list)
    eval_history: list[dict[str, Any]] = field(default_factory=list)

    def save(self, directory: Path, plan: BatchPlan) -> None:
        """Write the state with the batch plan it was trained at (derived here, never kept twice)."""
        batch = {"micro_batch_size": plan.micro_batch_size, "gradient_accumulation_steps": plan.accumulation}
        (directory / STATE_FILE).write_text(json.dumps({**asdict(self), **batch}, indent=2))

    @classmethod
    def load(cls, directory: Path) -> TrainState:
        return SavedState.read(directory).state

    def record_eval(self, step: int, metrics: dict[str, Any]) -> bool:
        """Remember an evaluation; True when it is the best WER so far."""
        self.eval_history.append({"step": step, **metrics})
        if self.best_metric is None or metrics["wer"] < self.best_metric:
            self.best_metric, self.best_step = metrics["wer"], step
            return True
        return False


@dataclass
class SavedState:
    """A checkpoint's ``trainer_state.json``, read once: the state and the micro-batch it was trained at."""

    path: Path
    state: TrainState
    micro_batch_size: int | None

    @classmethod
    def read(cls, directory: Path) -> SavedState:
        values = json.loads((directory / STATE_FILE).read_text())
        micro = values.pop("micro_batch_size", None)
        values.pop("gradient_accumulation_steps", None)  # derived from the micro-batch and the recipe
        return cls(directory, TrainState(**values), micro)


class CheckpointManager:
    def __init__(self, root: Path, keep: int, accelerator: Any):
        self.root = root
        self.keep = keep
        self.accelerator = accelerator

    def path_for(self, step: int) -> Path:
        return self.root / f"checkpoint-{step}"

    def complete(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            match = NAME.match(child.name)
            if match and (child / STATE_FILE).is_file():
                found.append((int(match.group(1)), child))
        return sorted(found)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1][1] if done else None

    def latest_saved(self) -> SavedState | None:
        """The newest complete checkpoint's state, or None for a fresh run."""
        latest = self.latest()
        return SavedState.read(latest) if latest is not None else None

    def clean_partial(self) -> None:
        """Remove temp directories a killed run left behind (rank 0, before anyone writes)."""
        if self.accelerator.is_main_process and self.root.is_dir():
            for child in self.root.glob(".checkpoint-*.tmp"):
                shutil.rmtree(child, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def save(self, state: TrainState, plan: BatchPlan) -> Path:
        final = self.path_for(state.step)
        if final.is_dir():
            return final
        tmp = self.root / f".checkpoint-{state.step}.tmp"
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp), safe_serialization=True)
        if self.accelerator.is_main_process:
            state.save(tmp, plan)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            tmp.rename(final)
            self._rotate(state.best_step)
            logger.info("saved %s", final)
        self.accelerator.wait_for_everyone()
        return final

    def _rotate(self, best_step: int | None) -> None:
        done = self.complete()
        keep = {step for step, _ in done[-self.keep :]}
        if best_step is not None:
            keep.add(best_step)
        for step, path in done:
            if step not in keep:
                shutil.rmtree(path, ignore_errors=True)
