"""Batch arithmetic and the step-addressed sample order.

The global batch is the invariant: ``global = micro x accumulation x world``. Accumulation and
the per-rank share are derived here and nowhere else.

Sample order is a pure function of (seed, step): the data stream is the concatenation of one
seeded permutation per epoch (with packing, of the windows packed from it), and optimizer step
``s`` consumes stream positions ``[s*G, (s+1)*G)``. Rank ``r`` takes its contiguous share of those G samples and cuts it into
micro-batches. So resuming at step ``s`` needs no saved dataloader state, and changing the
micro-batch (the OOM back-off) regroups the very same samples of each step.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from toolkit.config import ConfigError
from toolkit.data.dataset import Item, Unit

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPlan:
    global_batch_size: int
    micro_batch_size: int
    world_size: int

    @property
    def per_rank(self) -> int:
        return self.global_batch_size // self.world_size

    @property
    def accumulation(self) -> int:
        return self.per_rank // self.micro_batch_size

    @classmethod
    def create(cls, global_batch_size: int, micro_batch_size: int, world_size: int) -> BatchPlan:
        """Check that the global batch splits evenly; lower the micro-batch to a divisor if needed."""
        if global_batch_size % world_size:
            raise ConfigError(
                f"training.global_batch_size={global_batch_size} cannot be split evenly over {world_size} processes; "
                f"use a multiple of {world_size}"
            )
        per_rank = global_batch_size // world_size
        micro = min(micro_batch_size, per_rank)
        while per_rank % micro:
            micro -= 1
        if micro != micro_batch_size:
            logger.info(
                "training.micro_batch_size=%d does not divide the %d samples per process; using %d",
                micro_batch_size, per_rank, micro,
            )
        return cls(global_batch_size, micro, world_size)

    def with_micro_batch(self, micro_batch_size: int) -> BatchPlan:
        if self.per_rank % micro_batch_size:
            raise ValueError(f"micro-batch {micro_batch_size} does not divide the per-process batch {self.per_rank}")
        return BatchPlan(self.global_batch_size, micro_batch_size, self.world_size)

    def smaller(self) -> BatchPlan | None:
        """The plan after an out-of-memory back-off, None at micro-batch 1.

        The micro-batch becomes the largest divisor of the per-process batch that is at most half of
        it (exactly half when the per-process batch is a power of two), so accumulation at least
        doubles and the global batch is unchanged.
        """
        candidate = self.micro_batch_size // 2
        while candidate >= 1 and self.per_rank % candidate:
            candidate -= 1
        return self.with_micro_batch(candidate) if candidate else None

    def describe(self) -> str:
        return (
            f"global batch {self.global_batch_size} = micro-batch {self.micro_batch_size} "
            f"x accumulation {self.accumulation} x {self.world_size} process(es)"
        )


class RankShare:
    """What a rank takes of a step: its contiguous share of the step's items, cut into micro-batches."""

    rank: int

    def step_items(self, step: int, plan: BatchPlan) -> list[Item]:  # pragma: no cover - interface
        raise NotImplementedError

    def micro_items(self, step: int, plan: BatchPlan, offset: int = 0) -> list[list[Item]]:
        """This rank's micro-batches of ``step`` from its ``offset``-th unit on.

        A step continued after a back-off starts at the units already done, which need not be a
        multiple of the new micro-batch (20 per rank: micro-batch 5 -> 2); its last micro-batch
        may then be smaller than the others.
        """
        share = plan.per_rank
        mine = self.step_items(step, plan)[self.rank * share : (self.rank + 1) * share][offset:]
        m = plan.micro_batch_size
        return [mine[i : i + m] for i in range(0, len(mine), m)]

    def micro_batches(self, step: int, plan: BatchPlan, offset: int = 0) -> list[list[Any]]:
        """:meth:`micro_items`' units."""
        return [[item.unit for item in batch] for batch in self.micro_items(step, plan, offset)]


class StepSampler(RankShare):
    """Which units (clips, or packed windows) each optimizer step uses, on every rank.

    Without a ``layout`` a unit is a clip and every epoch holds ``num_samples`` of them. With one
    (packing), epoch ``e``'s units are ``layout(order_e)``: windows packed from that epoch's clip
    order, so an epoch's length varies and positions are located through the epochs' running sums.
    The batch plan is always passed in.
    """

    def __init__(self, num_samples: int, seed: int, rank: int,
                 layout: Callable[[np.ndarray], Sequence[tuple[int, ...]]] | None = None, key: tuple[int, ...] = ()):
        """``key``: extra seed words (a corpus's number in a mixture), so that streams differ."""
        if num_samples <= 0:
            raise ValueError("no training samples")
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.layout = layout
        self.key = key
        self._ends: list[int] = []
        """Running unit counts at the end of each epoch laid out so far (packing only)."""

    @lru_cache(maxsize=4)  # noqa: B019 - a handful of epochs per sampler, freed with it
    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, *self.key, epoch]).permutation(self.num_samples)

    @lru_cache(maxsize=4)  # noqa: B019
    def _epoch_units(self, epoch: int) -> Sequence[tuple[int, ...]]:
        assert self.layout is not None
        return self.layout(self._epoch_order(epoch))

    def _epoch_end(self, epoch: int) -> int:
        while len(self._ends) <= epoch:
            start = self._ends[-1] if self._ends else 0
            self._ends.append(start + len(self._epoch_units(len(self._ends))))
        return self._ends[epoch]

    def _locate(self, position: int) -> tuple[int, int]:
        """(epoch, offset within it) of a stream position, for a packed stream."""
        while not self._ends or self._ends[-1] <= position:
            self._epoch_end(len(self._ends))
        epoch = bisect.bisect_right(self._ends, position)
        return epoch, position - (self._ends[epoch - 1] if epoch else 0)

    def step_indices(self, step: int, plan: BatchPlan) -> Any:
        """All ``global_batch_size`` units of ``step``, in rank order: an int array of clip rows, or
        (packing) a list of windows."""
        g = plan.global_batch_size
        if self.layout is not None:
            units = []
            for position in range(step * g, (step + 1) * g):
                epoch, offset = self._locate(position)
                units.append(self._epoch_units(epoch)[offset])
            return units
        positions = np.arange(step * g, (step + 1) * g)
        epochs, offsets = np.divmod(positions, self.num_samples)
        out = np.empty(g, dtype=np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self._epoch_order(int(epoch))[offsets[mask]]
        return out

    def rank_indices(self, step: int, plan: BatchPlan) -> Any:
        share = plan.per_rank
        return self.step_indices(step, plan)[self.rank * share : (self.rank + 1) * share]

    def step_items(self, step: int, plan: BatchPlan) -> list[Item]:
        """The units of ``step`` at their stream positions (what label layouts are drawn from); a
        packed window also names the window before it in the stream, its previous text."""
        g = plan.global_batch_size
        units = self.step_indices(step, plan)
        if self.layout is None:
            return [Item(int(unit), step * g + i) for i, unit in enumerate(units)]
        before = [self._unit_at(step * g - 1) if step else None, *units[:-1]]
        return [Item(unit, step * g + i, prev) for i, (unit, prev) in enumerate(zip(units, before, strict=True))]

    def _unit_at(self, position: int) -> tuple[int, ...]:
        epoch, offset = self._locate(position)
        return self._epoch_units(epoch)[offset]

    def unit_at(self, position: int) -> Unit:
        """The unit at stream ``position``: a row number, or (packing) a window."""
        if self.layout is not None:
            return self._unit_at(position)
        epoch, offset = divmod(position, self.num_samples)
        return int(self._epoch_order(epoch)[offset])

    def epoch_at(self, position: int) -> float:
        """Epochs done at stream ``position`` (fractional)."""
        if self.layout is None:
            return position / self.num_samples
        epoch, offset = self._locate(position)
        return epoch + offset / len(self._epoch_units(epoch))

    def epoch_of(self, step: int, plan: BatchPlan) -> float:
        return self.epoch_at(step * plan.global_batch_size)


PREFETCH_STEPS = 2
"""Steps ahead whose units ``will_need`` hears of (remote shards are fetched that far ahead)."""


class StepBatchSampler:
    """A DataLoader ``batch_sampler`` that yields this rank's micro-batches for steps ``[start, stop)``."""

    def __init__(self, sampler: StepSampler, plan: BatchPlan, start: int, stop: int, skip_samples: int = 0,
                 will_need: Callable[[list[Unit]], None] | None = None):
        """``skip_samples``: this rank's samples of step ``start`` already done (a step continued after a
        back-off). ``will_need``: told, as each step starts, this rank's units of the next steps."""
        self.sampler, self.plan = sampler, plan
        self.start, self.stop, self.skip_samples = start, stop, skip_samples
        self.will_need = will_need

    def __iter__(self) -> Iterator[list[Item]]:
        for step in range(self.start, self.stop):
            if self.will_need is not None:
                ahead = range(step if step == self.start else step + PREFETCH_STEPS,
                              min(step + PREFETCH_STEPS + 1, self.stop))
                self.will_need([item.unit for s in ahead for batch in self.sampler.micro_items(s, self.plan)
                                for item in batch])
            yield from self.sampler.micro_items(step, self.plan, self.skip_samples if step == self.start else 0)

    def __len__(self) -> int:
        if self.stop <= self.start:
            return 0
        first = -(-(self.plan.per_rank - self.skip_samples) // self.plan.micro_batch_size)
        return first + (self.stop - self.start - 1) * self.plan.accumulation
