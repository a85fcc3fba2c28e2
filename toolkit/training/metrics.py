"""Run metrics: what a step did, sums over log windows, and the writers.

Each log line is one JSON object in ``metrics.jsonl``; the same scalars go to TensorBoard.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from toolkit.flops import peak_flops

logger = logging.getLogger(__name__)


@dataclass
class StepStats:
    """What one optimizer step did; ``loss_sum`` is this rank's, the counts are the global step's."""

    loss_sum: torch.Tensor
    tokens: int
    samples: int
    """Clips (with packing, all the clips in the step's windows)."""
    audio_seconds: float
    seconds: float
    grad_norm: float | None = None
    applied: bool = True
    """False when the update was skipped (non-finite loss or gradient norm): its loss is left out."""
    windows: int = 0
    """30 s encoder windows (the global batch); equal to ``samples`` without packing."""
    flops: float = 0.0
    """Model FLOPs of the step, over all ranks (:func:`toolkit.flops.training_flops`)."""
    loader_seconds: float = 0.0
    """Time this rank waited for the DataLoader during the step."""


RATE_KEYS = (
    "train_samples_per_second", "train_windows_per_second", "train_audio_hours_per_hour",
    "train_tokens_per_second", "train_mfu", "train_loader_wait_fraction",
)


class Window:
    """Sums of :class:`StepStats` over a span of steps (between two log lines, or the whole run)."""

    def __init__(self, peak_flops: float | None = None) -> None:
        self.peak_flops = peak_flops
        """The whole run's peak FLOP/s (per device x devices), for MFU; None where unknown."""
        self.reset()

    def reset(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.tokens = self.samples = self.windows = 0
        self.audio = self.seconds = self.flops = self.loader_seconds = 0.0
        self.grad_norm: float | None = None

    def add(self, stats: StepStats) -> None:
        if stats.applied:
            self.losses.append(stats.loss_sum)
            self.tokens += stats.tokens
        self.samples += stats.samples
        self.windows += stats.windows
        self.audio += stats.audio_seconds
        self.seconds += stats.seconds
        self.flops += stats.flops
        self.loader_seconds += stats.loader_seconds
        if stats.applied:  # a skipped step's norm may be NaN, which JSON cannot hold
            self.grad_norm = stats.grad_norm

    def rates(self) -> dict[str, float | None]:
        """Throughput over the window, keyed as in ``results.json`` (``train_`` prefix)."""
        if not self.seconds:
            return dict.fromkeys(RATE_KEYS)
        mfu = self.flops / self.seconds / self.peak_flops if self.peak_flops else None
        return {
            "train_samples_per_second": round(self.samples / self.seconds, 4),
            "train_windows_per_second": round(self.windows / self.seconds, 4),
            # audio seconds per wall second: the same ratio as audio hours per hour
            "train_audio_hours_per_hour": round(self.audio / self.seconds, 3),
            "train_tokens_per_second": round(self.tokens / self.seconds, 2),
            "train_mfu": round(mfu, 5) if mfu is not None else None,
            "train_loader_wait_fraction": round(self.loader_seconds / self.seconds, 4),
        }

    def flush(self, accelerator: Accelerator) -> dict[str, Any]:
        """Mean token loss over all ranks (one all-reduce) and throughput; then start a new window.

        The loss is None when every step of the window was skipped as non-finite.
        """
        summed = torch.stack(self.losses).sum() if self.losses else torch.zeros((), device=accelerator.device)
        total = float(accelerator.reduce(summed, reduction="sum"))
        values: dict[str, Any] = {"loss": total / self.tokens if self.tokens else None}
        values.update({key.removeprefix("train_"): value for key, value in self.rates().items()})
        if self.grad_norm is not None:
            values["grad_norm"] = round(self.grad_norm, 5)
        self.reset()
        return values


class MetricsLogger:
    """Writes on the main process only; other ranks get a no-op logger."""

    def __init__(self, output_dir: Path, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.writer = None
        self.failed: set[str] = set()
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
        """Drop lines from steps after the checkpoint we resume from (those steps are redone), and a
        line torn by a kill during a write."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                logger.warning("metrics.jsonl: dropping a torn line (%d characters)", len(line))
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Append one line (and TensorBoard scalars); a full disk costs the line, never the run."""
        if not self.enabled:
            return
        record = {"step": step, **values}
        try:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as exc:
            self._warn_once("metrics.jsonl", exc)
        if self.writer is not None:
            try:
                for key, value in values.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        self.writer.add_scalar(key, value, step)
                self.writer.flush()
            except Exception as exc:  # tensorboard's writer raises OSError, or its own errors from a thread
                self._warn_once("tensorboard", exc)
                self.writer = None  # a writer that failed once keeps failing: metrics.jsonl goes on

    def _warn_once(self, what: str, exc: BaseException) -> None:
        if what not in self.failed:
            self.failed.add(what)
            logger.warning("cannot write %s (%s); training goes on without it", what, exc)

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception as exc:
                self._warn_once("tensorboard", exc)


def peak_memory_gib(device: torch.device) -> float:
    """Peak accelerator memory allocated by torch; on CPU, the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def run_peak_flops(device: torch.device, mixed_precision: str, world_size: int) -> float | None:
    """Peak FLOP/s of ``world_size`` devices like ``device`` at the run's precision; None where unknown (CPU)."""
    if device.type != "cuda":
        return None
    if mixed_precision == "no":
        dtype = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "float32"
    else:
        dtype = {"bf16": "bfloat16", "fp16": "float16"}[mixed_precision]
    peak = peak_flops(torch.cuda.get_device_name(device), dtype)
    return peak * world_size if peak else None
