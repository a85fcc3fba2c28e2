"""Stop signals: a preemption (Slurm's SIGTERM, ``scancel --signal=USR1``) ends a run at a step boundary.

The loop checks :class:`StopSignal` after every step, saves a checkpoint and raises
:class:`Preempted`; the CLI turns that into exit code :data:`EXIT_PREEMPTED`, on which
``slurm/train.sbatch`` requeues the job.
"""

from __future__ import annotations

import signal
from typing import Any

from toolkit.distributed import STOP_SIGNALS

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; the sbatch script requeues on it


class Preempted(Exception):
    """A stop signal arrived; a checkpoint was saved at ``step``."""

    def __init__(self, step: int):
        super().__init__(f"stopped by signal; checkpoint saved at step {step}; rerun the same command to resume")
        self.step = step


class StopSignal:
    """Remembers SIGTERM/SIGUSR1 (Slurm preemption, ``scancel --signal``) until the next step boundary."""

    SIGNALS = STOP_SIGNALS

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum
