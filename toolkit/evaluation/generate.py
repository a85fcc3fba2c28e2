"""Sharded, batched generation and corpus metrics.

Batches are formed over the whole eval set, sorted by duration (similar output lengths decode
together), and batch ``i`` goes to rank ``i % world``. Every batch therefore holds the same
utterances on 1 process as on N, which is what makes the WER identical across world sizes.

The batch size is a ceiling (the eval batch-size finder): generation runs in rounds of one batch
per rank (:func:`_generate_round`), and after each round the ranks agree on whether any of them ran
out of memory (:func:`toolkit.oom.oom_ranks`). If one did, every rank drops that round's results,
halves the batch size and redoes the round from the same position of the sorted order
(:func:`_generate_all`); batches before the back-off keep the assignment above, so with no
out-of-memory error nothing changes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object, reduce

from toolkit.config import EvaluationConfig
from toolkit.data.collator import Batch, WhisperCollator
from toolkit.data.dataset import SpeechDataset
from toolkit.data.loader import build_loader
from toolkit.evaluation.signals import count_repeated, share
from toolkit.evaluation.wer import CorpusCounts
from toolkit.oom import (
    Backoff,
    OutOfMemoryAtMicroBatchOne,
    UnrecoverableOutOfMemory,
    free_memory,
    is_out_of_memory,
    oom_ranks,
)

logger = logging.getLogger(__name__)

RoundFn = Callable[[Any, Any, int, int], tuple[Any, bool]]
"""One rank's part of a generation round: (run, batch or None, eval batch size, first position) ->
(outputs, ran out of memory)."""
GENERATION_ADVICE = ("lower evaluation.max_new_tokens or evaluation.num_beams, or load the model in a smaller mode "
                     "(bf16/fp16 dtype, int8/nf4 quantization)")


@dataclass(frozen=True)
class GenerationSettings:
    """How :func:`evaluate_model` generates: the recipe's ``evaluation`` section plus the run's settings."""

    batch_size: int = EvaluationConfig.batch_size  # the recipe's defaults, written once
    """Utterances per generate() call on one process, at most (halved on out-of-memory)."""
    max_new_tokens: int = EvaluationConfig.max_new_tokens
    """Generation length limit (tokens after the prompt)."""
    num_beams: int = EvaluationConfig.num_beams
    """1 is greedy decoding."""
    static_cache: bool = EvaluationConfig.static_cache
    """A static KV cache (transformers compiles the decoding step with it on CUDA)."""
    synced_gpus: bool = False
    """ZeRO-3: every generate step is a collective (weights are gathered from all ranks)."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    """Context each generate() call runs in (the training run's mixed precision)."""
    collect_predictions: bool = False
    """Also return id/reference/prediction rows (gathered on every rank)."""
    language: str | None = None
    """Whisper language to decode in (one of several eval sets); None: the model's generation config's."""
    task: str | None = None
    """Whisper task to decode with; None: the model's generation config's."""

    @classmethod
    def from_config(cls, eval_cfg: EvaluationConfig, **run: Any) -> GenerationSettings:
        """``eval_cfg``'s batch size and decoding limits; ``run`` sets (or overrides) any field."""
        recipe = cls(batch_size=eval_cfg.batch_size, max_new_tokens=eval_cfg.max_new_tokens, num_beams=eval_cfg.num_beams,
                     static_cache=eval_cfg.static_cache)
        return dataclasses.replace(recipe, **run)


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    predictions: list[dict[str, str]] = field(default_factory=list)
    """Filled on every rank when asked for: id, reference, prediction, sorted by id."""
    batch_size: int = 0
    """The eval batch size generation finished with (the one asked for unless it backed off)."""
    backoffs: list[dict[str, int]] = field(default_factory=list)
    """Each out-of-memory back-off, in order: ``{"from": 8, "to": 4}`` (:meth:`toolkit.oom.Backoff.to_dict`)."""
    counts: CorpusCounts | None = None
    """The error counts summed over ranks, which add up over eval sets (:mod:`toolkit.evaluation.sets`)."""
    repeated: int | None = None
    """Short-form: hypotheses that repeat a 4-gram 3 or more times (``repetition_rate``'s numerator)."""


def eval_rounds(num_samples: int, batch_size: int, world_size: int) -> int:
    """Rounds (generate calls on every rank) for ``num_samples`` utterances: the largest shard's batch count."""
    return math.ceil(math.ceil(num_samples / batch_size) / world_size)


def round_batches(order: np.ndarray, start: int, batch_size: int, world_size: int, rank: int) -> list[list[int]]:
    """This rank's batches of ``order[start:]``, one per round while its slice is not empty.

    Round ``r`` covers positions ``[start + r*world*bs, start + (r+1)*world*bs)`` and rank ``k``
    takes the ``k``-th ``bs`` of them: from ``start = 0``, batch ``i`` of the sorted order goes to
    rank ``i % world``. A rank's slice can only be empty in the last round, so batch ``j`` of the
    list is round ``j``.
    """
    stride = world_size * batch_size
    return [
        order[first : first + batch_size].tolist()
        for first in range(start + rank * batch_size, len(order), stride)
    ]


def fitted_max_new_tokens(settings: GenerationSettings, dataset: SpeechDataset) -> int:
    """The generation limit: ``settings.max_new_tokens``, or less when the references are shorter.

    A batch decodes until its last sequence ends, so one hypothesis that loops runs the whole batch
    to the limit. The limit is therefore 1.5x the longest reference (in tokens, prompt included) plus
    8, when that is below the configured one: every hypothesis as long as a reference still ends on
    its own, and a loop stops early (it is an error either way).
    """
    if dataset.longest_reference is None:
        return settings.max_new_tokens
    return min(settings.max_new_tokens, math.ceil(1.5 * dataset.longest_reference) + 8)


def generation_config_for(model: Any, *, max_new_tokens: int, num_beams: int, static_cache: bool = False,
                          language: str | None = None, task: str | None = None) -> Any:
    """The model's generation config with these limits; ``language``/``task`` (when set) replace its prompt."""
    config = copy.deepcopy(model.generation_config)
    if language is not None:
        config.language = language
    if task is not None:
        config.task = task
    if static_cache:
        config.cache_implementation = "static"
    config.max_new_tokens = max_new_tokens
    config.max_length = None
    config.num_beams = num_beams
    config.use_cache = True  # off in the model config for training; generation needs it
    config.return_timestamps = False
    return config


@dataclass
class _Evaluation:
    """One :func:`evaluate_model` call: what every round uses, and what the rounds kept so far."""

    model: Any
    dataset: SpeechDataset
    collator: WhisperCollator
    tokenizer: Any
    normalize: Callable[[str], str]
    settings: GenerationSettings
    state: PartialState
    gen_config: Any
    device: torch.device
    dtype: torch.dtype
    counts: CorpusCounts = field(default_factory=CorpusCounts.zero)
    repeated: int = 0
    """Hypotheses that repeat a 4-gram 3 or more times (normalised text)."""
    predictions: list[dict[str, str]] = field(default_factory=list)
    filler: Batch | None = None
    """ZeRO-3's throw-away input for a rank with no batch left in a round (built once, on demand)."""

    def record(self, batch: Batch, hypotheses: list[str]) -> None:
        """Count a round's batch (called only once every rank has agreed that the round succeeded)."""
        self.counts.add_batch(batch.texts, hypotheses, self.normalize)
        self.repeated += count_repeated([self.normalize(h) for h in hypotheses])
        if self.settings.collect_predictions:
            self.predictions += [
                {"id": i, "reference": r, "prediction": h}
                for i, r, h in zip(batch.ids, batch.texts, hypotheses, strict=True)
            ]


@torch.no_grad()
def evaluate_model(
    model: Any,
    dataset: SpeechDataset,
    collator: WhisperCollator,
    tokenizer: Any,
    normalize: Callable[[str], str],
    settings: GenerationSettings,
) -> EvalResult:
    """Transcribe ``dataset`` on all ranks and return the corpus metrics (same on every rank)."""
    state = PartialState()
    start = time.perf_counter()
    with evaluating(model) as param:
        run = _Evaluation(
            model, dataset, collator, tokenizer, normalize, settings, state,
            gen_config=generation_config_for(model, max_new_tokens=fitted_max_new_tokens(settings, dataset),
                                             num_beams=settings.num_beams, static_cache=settings.static_cache,
                                             language=settings.language, task=settings.task),
            device=param.device, dtype=param.dtype,
        )
        size, backoffs = walk_rounds(run, _generate_round, "utterance", GENERATION_ADVICE)
    summed, predictions = gather_results(
        state, torch.cat([run.counts.to_tensor(), torch.tensor([run.repeated])]), run.predictions,
        settings.collect_predictions,
    )
    total = CorpusCounts.from_tensor(summed[:-1])
    seconds = time.perf_counter() - start
    metrics = {**total.metrics(), "repetition_rate": share(int(summed[-1]), total.num_samples),
               "seconds": round(seconds, 3)}
    metrics["utterances_per_second"] = round(total.num_samples / seconds, 3) if seconds > 0 else None
    return EvalResult(metrics, predictions, batch_size=size, backoffs=[b.to_dict() for b in backoffs], counts=total,
                      repeated=int(summed[-1]))


@contextlib.contextmanager
def evaluating(model: Any) -> Iterator[torch.nn.Parameter]:
    """The model in eval mode (train mode again afterwards if it was); yields its first floating-point
    weight, which gives the device and compute dtype (a quantised base also holds int8)."""
    was_training = model.training
    model.eval()
    try:
        yield next(p for p in model.parameters() if p.is_floating_point())
    finally:
        if was_training:
            model.train()


def gather_results(state: PartialState, local: torch.Tensor, predictions: list[dict[str, str]],
                   collect: bool) -> tuple[torch.Tensor, list[dict[str, str]]]:
    """This rank's counts summed over all ranks, and (when collected) every rank's prediction rows
    sorted by id."""
    summed = reduce(local.to(state.device), reduction="sum").cpu()
    if state.num_processes > 1 and collect:
        predictions = gather_object(predictions)
    predictions.sort(key=lambda p: p["id"])
    return summed, predictions


def walk_rounds(run: Any, decode_round: RoundFn, item: str, advice: str) -> tuple[int, list[Backoff]]:
    """Walk the sorted order in rounds, halving the batch on every agreed out-of-memory error.

    ``run`` has ``dataset``, ``collator``, ``settings`` and ``state``, and ``record(batch, outputs)``;
    ``decode_round(run, batch, size, first)`` decodes this rank's batch of a round (``first``: its
    place in the sorted order) and returns ``(outputs, ran_out_of_memory)``. ``item`` names what is
    decoded, ``advice`` what to lower when one does not fit. Returns the batch size it finished with and the back-offs.
    """
    order = np.argsort(-run.dataset.durations, kind="stable")
    position, size = 0, run.settings.batch_size
    backoffs: list[Backoff] = []
    while position < len(order):
        position, failing = _rounds_from(run, decode_round, order, position, size)
        if not failing:
            continue  # every round done: position reached the end
        # Out of the except block (its traceback held the failed attempt's tensors): free, then shrink.
        free_memory()
        if size == 1:
            raise OutOfMemoryAtMicroBatchOne(
                f"generation of one {item} does not fit in memory on rank(s) {failing} (eval batch 1); {advice}"
            )
        smaller = size // 2
        logger.warning(
            "generation ran out of memory on rank(s) %s at eval batch %d; retrying with %d", failing, size, smaller
        )
        backoffs.append(Backoff(size, smaller))
        size = smaller
    return size, backoffs


def _rounds_from(run: Any, decode_round: RoundFn, order: np.ndarray, position: int, size: int) -> tuple[int, list[int]]:
    """Rounds at ``size`` from ``position`` until the end or a round some rank ran out of memory in.

    Returns the position of the first item not yet done and the failing ranks (empty at the end).
    """
    world, rank = run.state.num_processes, run.state.process_index
    # A fresh loader from the first item not yet done, at the current size; a back-off drops it
    # (and its prefetching workers) on return.
    mine = round_batches(order, position, size, world, rank)
    loader = build_loader(run.dataset, mine, run.collator, num_workers=run.settings.num_workers)
    batches = iter(loader) if mine else iter(())  # no workers to start for a rank with nothing left
    for _ in range(eval_rounds(len(order) - position, size, world)):
        batch = next(batches, None)
        outputs, failed = decode_round(run, batch, size, position + rank * size)
        # Synced generation raised in its round on any OOM: nothing to agree on.
        failing = [] if getattr(run.settings, "synced_gpus", False) else oom_ranks(failed, run.state.device)
        if failing:
            return position, failing
        if batch is not None:
            run.record(batch, outputs)
        position = min(position + world * size, len(order))
    return position, []


def _generate_round(run: _Evaluation, batch: Batch | None, size: int, first: int) -> tuple[list[str] | None, bool]:
    """This rank's part of one round: ``(hypotheses, False)``, or ``(None, True)`` if it ran out of memory.

    ``batch`` is None for a rank with nothing left in the last round; under ZeRO-3 it still steps,
    on a throw-away batch. ``size`` is the round's eval batch size (for the error message).
    """
    if batch is None and run.settings.synced_gpus and run.filler is None:
        # Under ZeRO-3 every generate step is a collective: a rank without a batch in this round steps
        # on a throw-away batch so that the others do not wait for it forever.
        run.filler = run.collator([run.dataset[0]])
    batch = batch if batch is not None else (run.filler if run.settings.synced_gpus else None)
    if batch is None:
        return None, False
    try:
        return _transcribe(run, batch.to(run.device, run.dtype).input_features), False
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        if run.settings.synced_gpus:
            # The other ranks are inside this generate's collectives: no agreement is possible.
            remedy = (
                f"set evaluation.batch_size={size // 2}" if size > 1 else
                "lower evaluation.max_new_tokens or evaluation.num_beams"
            )
            raise UnrecoverableOutOfMemory(
                f"generation ran out of memory at eval batch {size} under ZeRO-3 (synced generation "
                f"cannot back off: the other ranks are inside a collective); {remedy}"
            ) from exc
    return None, True


def _transcribe(run: _Evaluation, features: torch.Tensor) -> list[str]:
    synced = run.settings.synced_gpus
    with run.settings.autocast():
        ids = run.model.generate(features, generation_config=run.gen_config, synced_gpus=synced)
    if not isinstance(ids, torch.Tensor):
        ids = ids["sequences"]
    return [text.strip() for text in run.tokenizer.batch_decode(ids, skip_special_tokens=True)]
