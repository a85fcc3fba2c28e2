"""Sharded, batched generation and corpus metrics.

Batches are formed over the whole eval set, sorted by duration (similar output lengths decode
together), and batch ``i`` goes to rank ``i % world``. Every batch therefore holds the same
utterances on 1 process as on N, which is what makes the WER identical across world sizes.

The batch size is a ceiling (the eval batch-size finder): generation runs in rounds of one batch
per rank, and after each round the ranks agree on whether any of them ran out of memory
(:func:`toolkit.training.finder.oom_ranks`). If one did, every rank drops that round's results,
halves the batch size and redoes the round from the same position of the sorted order; batches
before the back-off keep the assignment above, so with no out-of-memory error nothing changes.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object, reduce

from toolkit.data.collator import WhisperCollator
from toolkit.data.dataset import SpeechDataset
from toolkit.distributed import ignore_stop_signals
from toolkit.evaluation.wer import CorpusCounts
from toolkit.training.finder import (
    OutOfMemoryAtMicroBatchOne,
    UnrecoverableOutOfMemory,
    free_memory,
    is_out_of_memory,
    oom_ranks,
)

logger = logging.getLogger(__name__)


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    predictions: list[dict[str, str]] = field(default_factory=list)
    """Filled on every rank when asked for: id, reference, prediction, sorted by id."""
    batch_size: int = 0
    """The eval batch size generation finished with (the one asked for unless it backed off)."""
    backoffs: list[dict[str, int]] = field(default_factory=list)
    """Each out-of-memory back-off, in order: ``{"from": 8, "to": 4}``."""


def eval_batches(durations: np.ndarray, batch_size: int, world_size: int, rank: int) -> list[list[int]]:
    """This rank's batches: longest clips first, batches dealt round-robin over ranks."""
    order = np.argsort(-durations, kind="stable")
    batches = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    return batches[rank::world_size]


def eval_rounds(num_samples: int, batch_size: int, world_size: int) -> int:
    """Rounds (generate calls on every rank) for ``num_samples`` utterances: the largest shard's batch count."""
    return math.ceil(math.ceil(num_samples / batch_size) / world_size)


def round_batches(order: np.ndarray, start: int, batch_size: int, world_size: int, rank: int) -> list[list[int]]:
    """This rank's batches of ``order[start:]``, one per round while its slice is not empty.

    Round ``r`` covers positions ``[start + r*world*bs, start + (r+1)*world*bs)`` and rank ``k``
    takes the ``k``-th ``bs`` of them: from ``start = 0`` these are exactly :func:`eval_batches`.
    A rank's slice can only be empty in the last round, so batch ``j`` of the list is round ``j``.
    """
    stride = world_size * batch_size
    return [
        order[first : first + batch_size].tolist()
        for first in range(start + rank * batch_size, len(order), stride)
    ]


def generation_config_for(model: Any, *, max_new_tokens: int, num_beams: int) -> Any:
    config = copy.deepcopy(model.generation_config)
    config.max_new_tokens = max_new_tokens
    config.max_length = None
    config.num_beams = num_beams
    config.use_cache = True  # off in the model config for training; generation needs it
    config.return_timestamps = False
    return config


@torch.no_grad()
def evaluate_model(
    model: Any,
    dataset: SpeechDataset,
    collator: WhisperCollator,
    tokenizer: Any,
    normalize: Callable[[str], str],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 225,
    num_beams: int = 1,
    synced_gpus: bool = False,
    num_workers: int = 0,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    collect_predictions: bool = False,
) -> EvalResult:
    """Transcribe ``dataset`` on all ranks and return the corpus metrics (same on every rank)."""
    state = PartialState()
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    # The first floating-point weight gives device and compute dtype (a quantised base also holds int8).
    param = next(p for p in model.parameters() if p.is_floating_point())
    device, dtype = param.device, param.dtype
    gen_config = generation_config_for(model, max_new_tokens=max_new_tokens, num_beams=num_beams)

    order = np.argsort(-dataset.durations, kind="stable")
    world, rank = state.num_processes, state.process_index
    counts = CorpusCounts.zero()
    predictions: list[dict[str, str]] = []
    backoffs: list[dict[str, int]] = []
    filler = None
    position, size = 0, batch_size
    while position < len(order):
        # A fresh loader from the first utterance not yet done, at the current size; a back-off
        # drops it (and its prefetching workers) and comes back here.
        mine = round_batches(order, position, size, world, rank)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=mine, collate_fn=collator, num_workers=num_workers,
            worker_init_fn=ignore_stop_signals,
        )
        batches = iter(loader) if mine else iter(())  # no workers to start for a rank with nothing left
        failing: list[int] = []
        for _ in range(eval_rounds(len(order) - position, size, world)):
            batch = next(batches, None)
            features = None
            if batch is not None:
                features = batch.input_features
            elif synced_gpus:
                # Under ZeRO-3 every generate step is a collective: a rank without a batch in this
                # round steps on a throw-away batch so that the others do not wait for it forever.
                if filler is None:
                    filler = collator([dataset[0]]).input_features
                features = filler
            hypotheses, failed = None, False
            if features is not None:
                try:
                    hypotheses = _transcribe(model, features.to(device, dtype), gen_config, tokenizer, synced_gpus, autocast)
                except Exception as exc:
                    if not is_out_of_memory(exc):
                        raise
                    if synced_gpus:
                        # The other ranks are inside this generate's collectives: no agreement is possible.
                        remedy = (
                            f"set evaluation.batch_size={size // 2}" if size > 1 else
                            "lower evaluation.max_new_tokens or evaluation.num_beams"
                        )
                        raise UnrecoverableOutOfMemory(
                            f"generation ran out of memory at eval batch {size} under ZeRO-3 (synced generation "
                            f"cannot back off: the other ranks are inside a collective); {remedy}"
                        ) from exc
                    failed = True
            # Synced generation raised above on any OOM: nothing to agree on.
            failing = [] if synced_gpus else oom_ranks(failed, state.device)
            if failing:
                break
            if batch is not None:
                counts.add_batch(batch.texts, hypotheses, normalize)
                if collect_predictions:
                    predictions += [
                        {"id": i, "reference": r, "prediction": h}
                        for i, r, h in zip(batch.ids, batch.texts, hypotheses, strict=True)
                    ]
            position = min(position + world * size, len(order))
        del batches, loader  # shuts down the prefetching workers
        if not failing:
            continue  # every round done: position reached the end
        # Out of the except block (its traceback held the failed attempt's tensors): free, then shrink.
        free_memory()
        if size == 1:
            raise OutOfMemoryAtMicroBatchOne(
                f"generation of one utterance does not fit in memory on rank(s) {failing} (eval batch 1); "
                f"lower evaluation.max_new_tokens ({max_new_tokens}) or evaluation.num_beams ({num_beams}), "
                "or load the model in a smaller mode (bf16/fp16 dtype, int8/nf4 quantization)"
            )
        smaller = size // 2
        logger.warning(
            "generation ran out of memory on rank(s) %s at eval batch %d; retrying with %d", failing, size, smaller
        )
        backoffs.append({"from": size, "to": smaller})
        size = smaller

    total = CorpusCounts.from_tensor(reduce(counts.to_tensor().to(state.device), reduction="sum").cpu())
    if state.num_processes > 1 and collect_predictions:
        predictions = gather_object(predictions)
    predictions.sort(key=lambda p: p["id"])
    seconds = time.perf_counter() - start
    metrics = {**total.metrics(), "seconds": round(seconds, 3)}
    metrics["utterances_per_second"] = round(total.num_samples / seconds, 3) if seconds > 0 else None
    if was_training:
        model.train()
    return EvalResult(metrics, predictions, batch_size=size, backoffs=backoffs)


def _transcribe(
    model: Any,
    features: torch.Tensor,
    gen_config: Any,
    tokenizer: Any,
    synced_gpus: bool,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> list[str]:
    with autocast():
        ids = model.generate(features, generation_config=gen_config, synced_gpus=synced_gpus)
    if not isinstance(ids, torch.Tensor):
        ids = ids["sequences"]
    return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]
