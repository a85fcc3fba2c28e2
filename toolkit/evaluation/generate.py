"""Sharded, batched generation and corpus metrics.

Batches are formed over the whole eval set, sorted by duration (similar output lengths decode
together), and batch ``i`` goes to rank ``i % world``. Every batch therefore holds the same
utterances on 1 process as on N, which is what makes the WER identical across world sizes.
"""

from __future__ import annotations

import contextlib
import copy
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


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    predictions: list[dict[str, str]] = field(default_factory=list)
    """Filled on every rank when asked for: id, reference, prediction, sorted by id."""


def eval_batches(durations: np.ndarray, batch_size: int, world_size: int, rank: int) -> list[list[int]]:
    """This rank's batches: longest clips first, batches dealt round-robin over ranks."""
    order = np.argsort(-durations, kind="stable")
    batches = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    return batches[rank::world_size]


def eval_rounds(num_samples: int, batch_size: int, world_size: int) -> int:
    """Generate calls every rank makes when generation is synced (ZeRO-3): the largest shard's count."""
    return math.ceil(math.ceil(num_samples / batch_size) / world_size)


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

    batches = eval_batches(dataset.durations, batch_size, state.num_processes, state.process_index)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=collator, num_workers=num_workers,
        worker_init_fn=ignore_stop_signals,
    )
    counts = CorpusCounts.zero()
    predictions: list[dict[str, str]] = []
    rounds = 0
    for batch in loader:
        hypotheses = _transcribe(model, batch.input_features.to(device, dtype), gen_config, tokenizer, synced_gpus, autocast)
        counts.add_batch(batch.texts, hypotheses, normalize)
        if collect_predictions:
            predictions += [
                {"id": i, "reference": r, "prediction": h} for i, r, h in zip(batch.ids, batch.texts, hypotheses, strict=True)
            ]
        rounds += 1
    if synced_gpus:
        # Under ZeRO-3 every generate step is a collective: a rank with one batch fewer keeps
        # stepping on a throw-away batch so that the others do not wait for it forever.
        filler = collator([dataset[0]]).input_features.to(device, dtype)
        for _ in range(rounds, eval_rounds(len(dataset), batch_size, state.num_processes)):
            _transcribe(model, filler, gen_config, tokenizer, synced_gpus, autocast)

    total = CorpusCounts.from_tensor(reduce(counts.to_tensor().to(state.device), reduction="sum").cpu())
    if state.num_processes > 1 and collect_predictions:
        predictions = gather_object(predictions)
    predictions.sort(key=lambda p: p["id"])
    seconds = time.perf_counter() - start
    metrics = {**total.metrics(), "seconds": round(seconds, 3)}
    metrics["utterances_per_second"] = round(total.num_samples / seconds, 3) if seconds > 0 else None
    if was_training:
        model.train()
    return EvalResult(metrics, predictions)


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
