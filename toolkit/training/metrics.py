"""Run metrics: one JSON object per line in ``metrics.jsonl`` and the same scalars in TensorBoard."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch


class MetricsLogger:
    """Writes on the main process only; other ranks get a no-op logger."""

    def __init__(self, output_dir: Path, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=resume_step or None)
        except ImportError:  # tensorboard is a dependency, but a stripped install should still train
            print("tensorboard is not installed; metrics go to metrics.jsonl only", file=sys.stderr)

    def _truncate_after(self, step: int) -> None:
        """Drop lines from steps after the checkpoint we resume from: those steps are redone."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def peak_memory_gib(device: torch.device) -> float:
    """Peak accelerator memory allocated by torch; on CPU, the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux
