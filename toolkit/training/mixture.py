"""Several corpora in one training stream, mixed by weight, still a pure function of (seed, step).

Each corpus ``c`` has its own unit stream: a :class:`~toolkit.training.batching.StepSampler` over its
rows (its own seeded permutation per epoch, keyed ``[seed, c, epoch]``, and with packing its own
windows, so a window never mixes corpora or languages). The mixed stream draws, for every position
of step ``s``, which corpus it comes from, from ``rng([seed, MIX_KEY, s])`` by the corpora's
weights; the ``k``-th draw of corpus ``c`` takes unit ``k`` of its stream. Where a step starts in
each corpus stream is the count of that corpus's draws before it: counted per block of
``MIX_BLOCK`` steps and kept, so locating any step costs at most one block of draws beyond the
blocks already counted, and a resume at step 100,000 counts 98 blocks once.

The units are global row numbers of the combined split (corpus ``c``'s rows start at ``offsets[c]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np

from toolkit.data.corpora import Mix
from toolkit.data.dataset import Item, Unit
from toolkit.training.batching import BatchPlan, RankShare, StepSampler

MIX_KEY = 0x6D6978  # "mix": keeps the corpus draws apart from every other seeded stream
MIX_BLOCK = 1024


class MixtureSampler(RankShare):
    """The units of each step drawn from several corpus streams by weight (``StepSampler``'s interface)."""

    def __init__(self, streams: Sequence[StepSampler], offsets: Sequence[int], weights: Sequence[float],
                 seed: int, rank: int):
        if not len(streams) == len(offsets) == len(weights) or not streams:
            raise ValueError("one stream, offset and weight per corpus")
        total = float(sum(weights))
        self.streams, self.offsets = list(streams), [int(o) for o in offsets]
        self.weights = np.asarray(weights, dtype=np.float64) / total
        self.seed, self.rank = seed, rank
        self._block_counts: list[np.ndarray] = [np.zeros(len(streams), dtype=np.int64)]
        """Draws of each corpus before block ``b`` (``b * MIX_BLOCK`` steps), for the blocks counted so far."""
        self._block_batch: int | None = None
        self._last: tuple[int, np.ndarray] | None = None
        """The last step asked for and its counts: the next step's count starts from there."""

    # -- which corpus each position comes from -------------------------------------------------------
    def draws(self, step: int, global_batch: int) -> np.ndarray:
        """The corpus of each of step ``step``'s ``global_batch`` positions."""
        rng = np.random.default_rng([self.seed, MIX_KEY, step])
        return rng.choice(len(self.streams), size=global_batch, p=self.weights)

    def counts_before(self, step: int, global_batch: int) -> np.ndarray:
        """Draws of each corpus at the positions before step ``step``."""
        if self._block_batch not in (None, global_batch):  # counted for another global batch
            self._block_counts, self._last = self._block_counts[:1], None
        self._block_batch = global_batch
        block = step // MIX_BLOCK
        while len(self._block_counts) <= block:
            start = (len(self._block_counts) - 1) * MIX_BLOCK
            self._block_counts.append(self._block_counts[-1] + self._counted(start, start + MIX_BLOCK, global_batch))
        # Steps come in order: count on from the last one asked for when it lies in this block.
        start, counts = block * MIX_BLOCK, self._block_counts[block]
        if self._last is not None and start <= self._last[0] <= step:
            start, counts = self._last
        counts = counts + self._counted(start, step, global_batch)
        self._last = (step, counts)
        return counts.copy()

    def _counted(self, start: int, stop: int, global_batch: int) -> np.ndarray:
        counts = np.zeros(len(self.streams), dtype=np.int64)
        for step in range(start, stop):
            counts += np.bincount(self.draws(step, global_batch), minlength=len(self.streams))
        return counts

    # -- units ------------------------------------------------------------------------------------------
    def unit_at(self, corpus: int, position: int) -> Unit:
        """Unit ``position`` of corpus ``corpus``'s stream, as global row numbers."""
        unit = self.streams[corpus].unit_at(position)
        return unit if isinstance(unit, tuple) else int(unit) + self.offsets[corpus]

    def step_items(self, step: int, plan: BatchPlan) -> list[Item]:
        """The units of ``step`` at their positions in the mixed stream; a packed window also names
        the window before it in its own corpus's stream (its previous text)."""
        g = plan.global_batch_size
        draws = self.draws(step, g)
        next_position = self.counts_before(step, g)
        items = []
        for i, corpus in enumerate(draws.tolist()):
            k = int(next_position[corpus])
            next_position[corpus] += 1
            unit = self.unit_at(corpus, k)
            previous = self.unit_at(corpus, k - 1) if isinstance(unit, tuple) and k else None
            items.append(Item(unit, step * g + i, previous))
        return items

    def step_indices(self, step: int, plan: BatchPlan) -> Any:
        return [item.unit for item in self.step_items(step, plan)]

    def epoch_of(self, step: int, plan: BatchPlan) -> float:
        """The furthest any corpus stream has gone, in its own epochs."""
        before = self.counts_before(step, plan.global_batch_size)
        return max(stream.epoch_at(int(n)) for stream, n in zip(self.streams, before, strict=True))


def build_sampler(dataset: Any, mix: Mix | None, seed: int, rank: int) -> StepSampler | MixtureSampler:
    """The run's sampler: one stream over ``dataset``, or (several corpora) one per corpus, mixed."""
    if mix is None:
        layout = partial(dataset.packer.layout, durations=dataset.durations) if dataset.packer else None
        return StepSampler(len(dataset), seed, rank, layout)
    streams = []
    for corpus, (offset, size) in enumerate(zip(mix.offsets, mix.sizes, strict=True)):
        layout = partial(corpus_layout, dataset.packer, dataset.durations, offset) if dataset.packer else None
        streams.append(StepSampler(size, seed, rank, layout, key=(corpus,)))
    return MixtureSampler(streams, mix.offsets, mix.weights, seed, rank)


def corpus_layout(packer: Any, durations: np.ndarray, offset: int, order: np.ndarray) -> Sequence[tuple[int, ...]]:
    """A corpus's packed windows from its own clip order (its local numbers, ``offset`` into the split)."""
    return packer.layout(order + offset, durations)
