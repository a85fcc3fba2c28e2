"""``python -m toolkit bench --config RECIPE [key=value ...]``: how fast a recipe trains and evaluates.

It runs the recipe as ``train`` would (same launch, same code path), for ``--steps N`` optimizer
steps or until ``--clips N`` clips have been seen, then one evaluation pass of ``data.eval``, and
prints a table and one JSON line (the last line of stdout, main process only):

* ``train_samples_per_second`` (clips/s), ``train_windows_per_second`` (30 s encoder windows/s;
  the same as clips/s without packing), ``audio_hours_per_hour``, ``tokens_per_second`` (label
  tokens), all over the training steps' wall time (probe, evaluation and saving excluded);
* ``mfu``: model FLOPs (:mod:`toolkit.flops`) per second over the devices' peak (null where the
  device is not in the table and ``--peak-tflops`` is not given: CPUs);
* the same rates as ``steady_*`` over the steps after ``--warmup-steps`` (default 2: allocator
  growth, kernel selection and the workers' start are in the first ones);
* ``peak_memory_bytes`` (the largest over ranks: accelerator memory, or resident memory on CPU),
  ``loader_wait_fraction`` (rank 0's share of step time spent waiting for a batch);
* ``eval_utterances_per_second``, ``eval_wer_normalized`` and ``eval_wer`` (orthographic), in percent;
* ``preprocess_seconds`` and ``preprocessed_bytes`` of the training split (decoding and caching,
  a cold cache unless it was filled before), ``world_size``, ``device`` and the settings used.

Evaluation during training is turned off (``evaluation.every_steps=0``); ``output.dir`` must not hold
a run (a bench never resumes).
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass
from typing import Any

import torch

from toolkit.config import ConfigError, RunConfig
from toolkit.training.loop import TrainingRun
from toolkit.training.metrics import StepStats, Window, peak_memory_gib
from toolkit.training.optim import build_scheduler
from toolkit.training.step import DDPStep


@dataclass(frozen=True)
class BenchOptions:
    steps: int | None = None
    """Optimizer steps to run (default: the recipe's training.max_steps)."""
    clips: int | None = None
    """Instead of steps: run the fewest steps that see at least this many clips."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of one device, for MFU where the built-in table does not know the device."""
    warmup_steps: int = 2
    """Steps left out of the ``steady_*`` figures (start-up: allocator, kernel selection, workers)."""


def prepare_config(config: RunConfig, options: BenchOptions) -> None:
    """Turn the recipe into a bench run: no evaluation during training, a step count, a fresh output."""
    if options.steps is not None and options.clips is not None:
        raise ConfigError("give --steps or --clips, not both")
    if options.steps is not None:
        if options.steps <= 0:
            raise ConfigError(f"--steps must be positive, got {options.steps}")
        config.training.max_steps = options.steps
    if options.warmup_steps < 0:
        raise ConfigError(f"--warmup-steps must be >= 0, got {options.warmup_steps}")
    if options.clips is not None and options.clips <= 0:
        raise ConfigError(f"--clips must be positive, got {options.clips}")
    config.evaluation.every_steps = 0
    config.evaluation.at_start = False
    config.training.save_every = 0
    if config.output.final_model == "best":
        config.output.final_model = "last"


class BenchRun(TrainingRun):
    """A :class:`TrainingRun` whose length may be given in clips, which refuses to resume."""

    def __init__(self, config: RunConfig, options: BenchOptions):
        super().__init__(config)
        self.options = options

    def train_step(self, step: int) -> StepStats:
        stats = super().train_step(step)
        if step - self.first_step >= self.options.warmup_steps:
            self.steady.add(stats)
        return stats

    def setup(self) -> None:
        super().setup()
        self.first_step = self.state.step
        self.steady = Window()
        if self.saved is not None:
            raise ConfigError(f"output.dir {self.out} holds a run; a bench needs a fresh output.dir")
        if self.options.clips is not None:
            self._fit_steps(self.options.clips)
        if self.options.peak_tflops:
            self.peak_flops = self.options.peak_tflops * 1e12 * self.accelerator.num_processes
        self.steady.peak_flops = self.peak_flops

    def _fit_steps(self, clips: int) -> None:
        """Set training.max_steps to the fewest steps that see ``clips`` clips (windows hold several)."""
        steps = seen = 0
        if self.data.train is None:  # a stream (data.streaming): one clip per sample
            steps = -(-clips // self.plan.global_batch_size)
        while seen < clips and self.data.train is not None:
            seen += len(self.data.train.dataset.unit_clips(self.sampler.step_indices(steps, self.plan)))
            steps += 1
        cfg = self.config.training
        if steps != cfg.max_steps:
            if not isinstance(self.step, DDPStep):  # DeepSpeed drives its own copy of the schedule
                raise ConfigError("--clips cannot change the step count under DeepSpeed; use --steps")
            cfg.max_steps = steps
            cfg.warmup_steps = min(cfg.warmup_steps, steps)
            self.step.parts.scheduler = build_scheduler(self.step.parts.optimizer, cfg)


def figures(run: BenchRun, results: dict[str, Any]) -> dict[str, Any]:
    """The bench's JSON record from a finished run's ``results`` (every rank calls it: one collective)."""
    acc = run.accelerator
    mine = torch.tensor([int(peak_memory_gib(acc.device) * 2**30)], dtype=torch.int64, device=acc.device)
    peak_bytes = int(acc.gather(mine).max())  # the largest over ranks
    evaluation = results.get("eval") or {}
    cfg = run.config
    device = torch.cuda.get_device_name(acc.device) if acc.device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    return {
        "train_samples_per_second": results["train_samples_per_second"],
        "train_windows_per_second": results["train_windows_per_second"],
        "audio_hours_per_hour": results["train_audio_hours_per_hour"],
        "tokens_per_second": results["train_tokens_per_second"],
        "mfu": results["train_mfu"],
        "peak_memory_bytes": peak_bytes,
        "loader_wait_fraction": results["train_loader_wait_fraction"],
        **{f"steady_{key.removeprefix('train_')}": value for key, value in run.steady.rates().items()},
        "steady_steps": f"after the first {run.options.warmup_steps}",
        "eval_utterances_per_second": evaluation.get("utterances_per_second"),
        "eval_wer_normalized": evaluation.get("wer"),
        "eval_wer": evaluation.get("wer_ortho"),
        "eval_utterances": evaluation.get("num_samples"),
        "train_clips": results["train_clips"],
        "train_windows": results["train_windows"],
        "train_audio_hours": results["train_audio_hours"],
        "train_seconds": results["train_runtime_s"],
        "steps": results["steps"],
        "preprocess_seconds": round(run.data.train_seconds, 2),
        "preprocessed_bytes": run.data.train.bytes_on_disk if run.data.train else None,
        "world_size": acc.num_processes,
        "device": device,
        "settings": {
            "model": cfg.model.name_or_path,
            "global_batch_size": run.plan.global_batch_size,
            "micro_batch_size": run.plan.micro_batch_size,
            "gradient_accumulation_steps": run.plan.accumulation,
            "packing": cfg.data.packing,
            "features_on": cfg.data.features_on,
            "num_workers": cfg.data.num_workers,
            "mixed_precision": cfg.training.mixed_precision,
            "gradient_checkpointing": cfg.training.gradient_checkpointing,
            "eval_batch_size": results.get("eval_batch_size"),
            "torch_threads": torch.get_num_threads(),
            "peak_flops": run.peak_flops,
        },
    }


def table(record: dict[str, Any]) -> str:
    """The record as aligned ``name  value`` lines (settings last)."""
    rows = [(k, v) for k, v in record.items() if k != "settings"]
    rows += [(f"settings.{k}", v) for k, v in record["settings"].items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {_format(v)}" for k, v in rows)


def _format(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return str(value)


def bench(config: RunConfig, options: BenchOptions) -> dict[str, Any]:
    """Run the bench; print the table and the JSON line on the main process; the record on every rank."""
    prepare_config(config, options)
    run = BenchRun(config, options)
    try:
        run.setup()
        results = run.run()
        record = figures(run, results)
    finally:
        run.close()
    if run.accelerator.is_main_process:
        print(table(record), flush=True)
        print(json.dumps(record), flush=True)
    return record
