"""The worst-case probe: the largest micro-batch that fits a worst-case batch, before the first step.

Whisper pads every clip to a 30 s window, so only the label length varies between real batches;
the probe's batch is full windows with the longest label of the data (:func:`finder.worst_case_batch`).
At each size the backend's step object runs two forward/backward passes
(:meth:`~toolkit.training.step.TrainStep.probe`), which leave the weights, the gradients and the
random generators as they were: training after the probe is bit for bit what it would have been.
AdamW's states appear only at the first optimizer step; the back-off during training covers them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

from toolkit.memory.advice import device_memory
from toolkit.oom import Backoff, OutOfMemoryAtMicroBatchOne, is_out_of_memory, oom_ranks
from toolkit.training import finder
from toolkit.training.batching import BatchPlan
from toolkit.training.step import TrainStep

logger = logging.getLogger(__name__)


@dataclass
class ProbeResult:
    plan: BatchPlan
    backoffs: list[Backoff]
    summary: dict[str, Any]
    """``{from, to, label_tokens, seconds}``, as in metrics and results."""


def attempt(step: TrainStep, model_config: Any, label_tokens: int, plan: BatchPlan, micro: int) -> list[int]:
    """One probe size: the ranks that ran out of memory on a worst-case batch of ``micro`` samples.

    Building the batch can fail too (a global batch of 100000 asks for tens of GB of features), and
    so can it succeed on an overcommitting host only for the kernel's OOM killer to end the process
    when the pages are written: a batch whose features alone would take half the memory counts as
    out of memory without being allocated. The ranks agree on the batch before any pass runs.
    """
    frames = 2 * model_config.max_source_positions
    feature_bytes = micro * model_config.num_mel_bins * frames * 4
    batch = None
    if feature_bytes < device_memory(step.device) // 2:
        try:
            batch = finder.worst_case_batch(micro, model_config.num_mel_bins, frames, label_tokens,
                                            model_config.vocab_size, step.device, step.input_dtype)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
    failed = oom_ranks(batch is None, step.device)
    if failed or batch is None:
        return failed
    return step.probe(batch, plan.with_micro_batch(micro))


def run_probe(step: TrainStep, plan: BatchPlan, model_config: Any, label_tokens: int, at_step: int) -> ProbeResult:
    """Walk down from ``plan``'s micro-batch to the first that fits on every rank."""
    tick = time.perf_counter()
    try:
        found, backoffs = finder.search(plan, partial(attempt, step, model_config, label_tokens, plan), step=at_step)
    except OutOfMemoryAtMicroBatchOne as exc:
        raise OutOfMemoryAtMicroBatchOne(
            f"probe: {exc} (30 s clips, {label_tokens} label tokens); {step.parts.advice()}"
        ) from None
    seconds = time.perf_counter() - tick
    logger.info("probe: micro-batch %d fits a worst-case batch (30 s clips, %d label tokens); %.1f s",
                found.micro_batch_size, label_tokens, seconds)
    summary = {"from": plan.micro_batch_size, "to": found.micro_batch_size, "label_tokens": label_tokens,
               "seconds": round(seconds, 2)}
    return ProbeResult(found, backoffs, summary)
