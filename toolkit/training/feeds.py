"""What each optimizer step trains on: one feed object per kind of training data.

:class:`IndexedFeed` serves an indexed split (the cache or prepared shards): the step's samples are a
pure function of (seed, step) (:mod:`.batching`, :mod:`.mixture`), so a resumed run continues exactly
at any world size. :class:`toolkit.training.stream_feed.StreamFeed` serves ``data.streaming``. The
loop asks a feed for the step's :class:`StepSamples` (the loss's token count first: the loss is a sum
over the step divided by it) and then for this rank's micro-batches of the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from toolkit.config import TrainingConfig
from toolkit.data.collator import WhisperCollator
from toolkit.data.dataset import SpeechDataset
from toolkit.data.loader import build_loader
from toolkit.flops import training_flops
from toolkit.training.batching import BatchPlan, StepBatchSampler, StepSampler
from toolkit.training.mixture import MixtureSampler


@dataclass
class StepSamples:
    """One step's samples, counted over every rank."""

    tokens: int
    """Label tokens in the loss over the whole step (its denominator)."""
    clips: int
    seconds: float
    """Speech seconds."""
    windows: int
    """30 s encoder windows: the global batch."""
    flops: float
    units: list[Any] = field(default_factory=list)
    """The step's units (this rank's, for a stream), for :meth:`ids` when an update is skipped."""
    dataset: SpeechDataset | None = None

    def ids(self) -> list[str]:
        """The ids of the step's clips: looked up only when an update is skipped, never per step."""
        return self.dataset.clip_ids(self.units) if self.dataset is not None else []


class IndexedFeed:
    """Steps drawn by (seed, step) from an indexed split; the DataLoader's workers read the samples."""

    def __init__(self, dataset: SpeechDataset, sampler: StepSampler | MixtureSampler, collator: WhisperCollator, *,
                 num_workers: int, training: TrainingConfig, model_config: Any):
        self.dataset, self.sampler, self.collator = dataset, sampler, collator
        self.num_workers, self.training, self.model_config = num_workers, training, model_config

    def step_samples(self, step: int, plan: BatchPlan) -> StepSamples:
        items = self.sampler.step_items(step, plan)
        units = [item.unit for item in items]
        sizes = self.dataset.item_sizes(items)  # per window: the loss scale and the FLOP count need them
        return StepSamples(
            sum(tokens for tokens, _ in sizes), len(self.dataset.unit_clips(units)), self.dataset.unit_seconds(units),
            len(units), training_flops(self.model_config, [p for _, p in sizes], bool(self.training.gradient_checkpointing)),
            units, self.dataset,
        )

    def loader(self, start: int, plan: BatchPlan, skip_samples: int = 0) -> torch.utils.data.DataLoader:
        """This rank's micro-batches from step ``start`` on (its first ``skip_samples`` samples left out)."""
        return build_loader(
            self.dataset,
            StepBatchSampler(self.sampler, plan, start, self.training.max_steps, skip_samples,
                             will_need=self.dataset.will_need),
            self.collator,
            num_workers=self.num_workers,
            # Its own generator: creating the iterator draws a worker seed, which must not consume
            # the global RNG that dropout uses (a resumed run would then diverge from an unbroken one).
            generator=torch.Generator().manual_seed(self.training.seed + start),
        )

    def epoch_of(self, step: int, plan: BatchPlan) -> float:
        return self.sampler.epoch_of(step, plan)

    def worst_positions(self, packed_label_tokens: int | None) -> int:
        """The most decoder positions a sample can take (timestamps and prompts included)."""
        assert self.dataset.targets is not None
        return self.dataset.targets.worst_positions(packed_label_tokens if self.dataset.packer else None)

    @property
    def num_samples(self) -> int | None:
        return len(self.dataset)

    def state_dict(self) -> None:
        """Nothing to save: the step number is the position."""
        return None

    def load_state_dict(self, state: Any) -> None:
        del state
