"""Checkpoints: atomic ``save_state`` directories, resume from the newest valid one, keep the best.

A checkpoint is written by all ranks into ``.checkpoint-N.tmp``; rank 0 then writes the loop's
state (``trainer_state.json``: step, best WER, back-offs, the batch plan it trained at), the lr
schedule (``scheduler.json``) and, last, the manifest of every file (:mod:`.manifest`), and renames
the directory to ``checkpoint-N`` (``output.dir`` must be on a filesystem all nodes share).

Nothing is unpickled from a checkpoint: model weights are safetensors, the optimizer and per-rank
RNG states are loaded by accelerate with ``weights_only=True``, the schedule and the loop's state
are JSON; accelerate's ``custom_checkpoint_*.pkl`` (which it unpickles unrestricted) is never
written or read, and DeepSpeed's shards are scanned before DeepSpeed unpickles them
(:func:`toolkit.training.zero.check_shards_are_plain`). On resume a checkpoint that does not match
its manifest is skipped, with the reason logged, for the newest one that does.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from toolkit.distributed import broadcast_from_main
from toolkit.training.batching import BatchPlan
from toolkit.training.manifest import verify, write_manifest

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
SCHEDULER_FILE = "scheduler.json"
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
    baseline_eval: dict[str, Any] | None = None
    """The starting model's metrics (``evaluation.at_start``): kept across resumes, for the guard."""
    nonfinite_steps: list[dict[str, Any]] = field(default_factory=list)
    """Steps whose update was skipped: ``{step, reason, ids}`` (also in ``skipped.jsonl``)."""
    fingerprint: dict[str, Any] = field(default_factory=dict)
    """What defines the optimisation (:mod:`.fingerprint`); a resume that changes it is refused."""
    recipe_changes: list[dict[str, Any]] = field(default_factory=list)
    """Changes accepted with ``training.resume=force``: ``{step, changes: {key: [before, after]}}``."""
    stream: list[dict[str, Any]] | None = None
    """``data.streaming``: every rank's stream position (:class:`toolkit.data.stream.RankStream`), by rank."""
    stream_skips: list[dict[str, Any]] = field(default_factory=list)
    """``data.streaming``: the rows skipped so far (``skipped.jsonl`` is rewritten at each start)."""

    def save(self, directory: Path, plan: BatchPlan) -> None:
        """Write the state with the batch plan it was trained at (derived here, never kept twice)."""
        batch = {"micro_batch_size": plan.micro_batch_size, "gradient_accumulation_steps": plan.accumulation}
        (directory / STATE_FILE).write_text(json.dumps({**asdict(self), **batch}, indent=2))

    @classmethod
    def load(cls, directory: Path) -> TrainState:
        return SavedState.read(directory).state

    def evals_since_start(self) -> list[dict[str, Any]]:
        """Every evaluation in order, the starting model's first when it was evaluated."""
        start = [{"step": 0, **self.baseline_eval}] if self.baseline_eval is not None else []
        return start + self.eval_history

    def record_eval(self, step: int, metrics: dict[str, Any]) -> bool:
        """Remember an evaluation; True when it is the best so far by its ``score`` (the WER, plus the
        weighted guard metrics: :mod:`toolkit.training.evals`)."""
        self.eval_history.append({"step": step, **metrics})
        value = metrics.get("score", metrics.get("wer"))
        if value is not None and (self.best_metric is None or value < self.best_metric):
            self.best_metric, self.best_step = value, step
            return True
        return False


class CheckpointInvalid(ValueError):
    """A checkpoint directory cannot be resumed from; the message says why."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, most often); the previous one is intact."""


@dataclass
class SavedState:
    """A checkpoint's own JSON files, read once: the loop state, the micro-batch, the lr schedule."""

    path: Path
    state: TrainState
    micro_batch_size: int | None
    scheduler: dict[str, Any] | None = None

    @classmethod
    def read(cls, directory: Path) -> SavedState:
        """Parse and check the JSON files of ``directory``; :class:`CheckpointInvalid` says what is wrong."""
        try:
            values = json.loads((directory / STATE_FILE).read_text())
            scheduler_file = directory / SCHEDULER_FILE
            scheduler = json.loads(scheduler_file.read_text()) if scheduler_file.exists() else None
        except (OSError, ValueError) as exc:
            raise CheckpointInvalid(f"unreadable {exc.__class__.__name__}: {exc}") from None
        if not isinstance(values, dict) or not isinstance(values.get("step"), int):
            raise CheckpointInvalid(f"{STATE_FILE} has no step")
        match = NAME.match(directory.name)
        if match and int(match.group(1)) != values["step"]:
            raise CheckpointInvalid(f"{STATE_FILE} says step {values['step']}")
        micro = values.pop("micro_batch_size", None)
        values.pop("gradient_accumulation_steps", None)  # derived from the micro-batch and the recipe
        try:
            state = TrainState(**values)
        except TypeError as exc:
            raise CheckpointInvalid(f"{STATE_FILE}: {exc}") from None
        return cls(directory, state, micro, scheduler)


class CheckpointManager:
    def __init__(self, root: Path, keep: int, accelerator: Any):
        self.root = root
        self.keep = keep
        self.accelerator = accelerator

    def path_for(self, step: int) -> Path:
        return self.root / f"checkpoint-{step}"

    def named(self) -> list[tuple[int, Path]]:
        """Directories with a checkpoint's final name, oldest first (intact or not: see :meth:`latest_saved`)."""
        if not self.root.is_dir():
            return []
        return sorted((int(m.group(1)), c) for c in self.root.iterdir() if (m := NAME.match(c.name)) and c.is_dir())

    def complete(self) -> list[tuple[int, Path]]:
        """Checkpoints with their final name and a state file, oldest first."""
        return [(step, path) for step, path in self.named() if (path / STATE_FILE).is_file()]

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1][1] if done else None

    def latest_saved(self) -> SavedState | None:
        """The newest checkpoint that matches its manifest and parses, or None for a fresh run.

        Rank 0 checks (each file is read once, not once per rank) and tells the others.
        """
        chosen: list[str | None] = [None]  # rank 0 fills it in
        if self.accelerator.is_main_process:
            for _, path in reversed(self.named()):
                try:
                    problem = verify(path)
                    if problem is None:
                        SavedState.read(path)
                except CheckpointInvalid as exc:
                    problem = str(exc)
                if problem is None:
                    chosen[0] = str(path)
                    break
                logger.warning("checkpoint %s cannot be resumed from: %s; trying an older one", path, problem)
        path = broadcast_from_main(chosen[0])
        return SavedState.read(Path(path)) if path else None

    def clean_partial(self) -> None:
        """Remove temp directories a killed run left behind (rank 0, before anyone writes)."""
        if self.accelerator.is_main_process and self.root.is_dir():
            for child in self.root.glob(".checkpoint-*.tmp"):
                shutil.rmtree(child, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def save(self, state: TrainState, plan: BatchPlan, scheduler: dict[str, Any] | None = None) -> Path:
        """Write ``checkpoint-{state.step}`` atomically; the lr schedule's ``state_dict`` goes to JSON."""
        final = self.path_for(state.step)
        if self.accelerator.is_main_process:
            self._check_space()
        if final.is_dir():
            problem = verify(final)
            if problem is None:
                return final  # the same step saved already (a best checkpoint that is also the last)
            self.accelerator.wait_for_everyone()
            if self.accelerator.is_main_process:
                logger.warning("replacing %s: %s", final, problem)
                shutil.rmtree(final)
        tmp = self.root / f".checkpoint-{state.step}.tmp"
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        try:
            self.accelerator.save_state(str(tmp), safe_serialization=True)
            self.accelerator.wait_for_everyone()
            if self.accelerator.is_main_process:
                state.save(tmp, plan)
                if scheduler is not None:
                    (tmp / SCHEDULER_FILE).write_text(json.dumps(scheduler))
                write_manifest(tmp)  # last: its presence means every rank's files are complete
        except (OSError, RuntimeError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise self._write_error(exc) from None
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            tmp.rename(final)
            self._rotate(state.best_step)
            logger.info("saved %s", final)
        self.accelerator.wait_for_everyone()
        return final

    def _check_space(self) -> None:
        """Refuse to start a save that cannot fit, judged by the size of the newest checkpoint."""
        newest = self.latest()
        if newest is None:
            return
        needed = sum(p.stat().st_size for p in newest.rglob("*") if p.is_file())
        free = shutil.disk_usage(self.root).free
        if free < needed:
            raise CheckpointWriteError(
                f"no space left on {self.root} for the next checkpoint: it needs about {needed / 2**20:.0f} MB "
                f"and {free / 2**20:.0f} MB are free; {newest} is intact: free some space and rerun to resume"
            )

    def _write_error(self, exc: BaseException) -> CheckpointWriteError:
        free = shutil.disk_usage(self.root).free if self.root.exists() else 0
        newest = self.latest()
        return CheckpointWriteError(
            f"could not write a checkpoint in {self.root} ({exc.__class__.__name__}: {str(exc)[:200]}); "
            f"{free / 2**20:.0f} MB free; the newest checkpoint ({newest or 'none'}) is intact"
        )

    def _rotate(self, best_step: int | None) -> None:
        done = self.complete()
        keep = {step for step, _ in done[-self.keep :]}
        if best_step is not None:
            keep.add(best_step)
        for step, path in done:
            if step not in keep:
                shutil.rmtree(path, ignore_errors=True)
