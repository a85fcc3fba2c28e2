"""The auto batch-size finder: the probe's search over micro-batches and its worst-case batch.

Why not accelerate's ``find_executable_batch_size`` or Trainer's ``auto_find_batch_size``: the first
shrinks the batch on the rank that failed while the others wait in a collective, the second never
rescales gradient accumulation (the optimisation changes) and refuses DeepSpeed. Here:

* Every rank learns of an out-of-memory error through one small all-reduce
  (:func:`toolkit.oom.oom_ranks`), placed where no other collective can be in flight, and all ranks
  back off together.
* A back-off halves the micro-batch (to the largest divisor of the per-rank batch at most half the
  old one) and so doubles accumulation: micro x accumulation x world size stays the configured
  global batch (:meth:`BatchPlan.smaller <toolkit.training.batching.BatchPlan.smaller>`).
* Where the agreement sits and how a failed step goes on differ per backend: see
  :mod:`toolkit.training.step`. The worst-case probe's batch is built by :func:`worst_case_batch`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from toolkit.data.collator import Batch
from toolkit.oom import Backoff, OutOfMemoryAtMicroBatchOne
from toolkit.training.batching import BatchPlan

logger = logging.getLogger(__name__)

def search(plan: BatchPlan, attempt: Callable[[int], list[int]], step: int = 0) -> tuple[BatchPlan, list[Backoff]]:
    """The plan with the largest micro-batch, from ``plan``'s down, for which ``attempt(micro)`` reports
    no rank out of memory.

    ``attempt`` runs on every rank and returns the agreed list of failing ranks, so every rank walks
    the same sizes. Raises :class:`OutOfMemoryAtMicroBatchOne` (on every rank) when 1 fails.
    """
    backoffs: list[Backoff] = []
    while failed := attempt(plan.micro_batch_size):
        smaller = plan.smaller()
        if smaller is None:
            raise OutOfMemoryAtMicroBatchOne(f"rank(s) {failed} ran out of memory at micro-batch 1")
        logger.warning("micro-batch %d ran out of memory on rank(s) %s; trying %d",
                       plan.micro_batch_size, failed, smaller.micro_batch_size)
        backoffs.append(Backoff(plan.micro_batch_size, smaller.micro_batch_size, step))
        plan = smaller
    return plan, backoffs


def worst_case_batch(
    micro: int, num_mel_bins: int, frames: int, label_tokens: int, vocab_size: int, device: torch.device,
    dtype: torch.dtype | None = None, seed: int = 0,
) -> Batch:
    """``micro`` full 30 s windows with ``label_tokens`` label tokens each: the most memory a step can take.

    Whisper pads every clip to 30 s, so only the label length varies between real batches.
    """
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(micro, num_mel_bins, frames, generator=generator)
    labels = torch.randint(0, vocab_size, (micro, label_tokens), generator=generator)
    batch = Batch(input_features=features, labels=labels, ids=[f"probe-{i}" for i in range(micro)], texts=[""] * micro)
    return batch.to(device, dtype)
