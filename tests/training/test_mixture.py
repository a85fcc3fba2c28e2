"""MixtureSampler: corpora mixed by weight, a pure function of (seed, step), one corpus per window."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from toolkit.data.packing import pack
from toolkit.training import mixture
from toolkit.training.batching import BatchPlan, StepSampler
from toolkit.training.mixture import MixtureSampler

SIZES = (50, 20)  # corpus 0: rows 0-49, corpus 1: rows 50-69


def _mixture(weights: tuple[float, ...] = (0.7, 0.3), rank: int = 0, seed: int = 7, packed: bool = False) -> MixtureSampler:
    offsets = np.cumsum((0, *SIZES[:-1])).tolist()
    durations = np.full(sum(SIZES), 9.0)
    costs = np.ones(sum(SIZES), dtype=np.int64)
    streams = []
    for c, (n, offset) in enumerate(zip(SIZES, offsets, strict=True)):
        layout = None
        if packed:  # windows of global rows, from this corpus's order only
            layout = partial(lambda order, o: pack(order + o, durations, costs, 30.0, 100), o=offset)
        streams.append(StepSampler(n, seed, rank, layout, key=(c,)))
    return MixtureSampler(streams, offsets, weights, seed, rank)


def test_corpus_counts_over_100_steps_are_within_binomial_noise() -> None:
    plan = BatchPlan(16, 16, 1)
    sampler = _mixture()
    rows = np.concatenate([sampler.step_indices(s, plan) for s in range(100)])
    share = float(np.mean(rows < SIZES[0]))
    sd = (0.7 * 0.3 / 1600) ** 0.5
    assert abs(share - 0.7) < 3 * sd  # 1,600 draws: 0.7 +- 0.034
    assert sampler.counts_before(100, 16).tolist() == [int((rows < 50).sum()), int((rows >= 50).sum())]


def test_each_corpus_stream_is_its_own_permutation() -> None:
    plan = BatchPlan(8, 8, 1)
    sampler = _mixture((0.5, 0.5))
    rows = [int(r) for s in range(30) for r in sampler.step_indices(s, plan)]
    first = [r for r in rows if r >= 50][:20]
    second = [r for r in rows if r < 50][:50]
    assert sorted(first) == list(range(50, 70)) and sorted(second) == list(range(50))  # one epoch each, no repeats


def test_steps_are_a_pure_function_of_seed_and_step_on_any_world_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mixture, "MIX_BLOCK", 4)  # several counted blocks before step 37
    whole = _mixture().step_indices(37, BatchPlan(16, 16, 1))
    fresh = _mixture()
    assert [int(u) for u in fresh.step_indices(37, BatchPlan(16, 16, 1))] == [int(u) for u in whole]
    walked = _mixture()
    for step in range(38):
        units = walked.step_indices(step, BatchPlan(16, 16, 1))
    assert [int(u) for u in units] == [int(u) for u in whole]
    for step in (5, 36, 37, 2):  # back, within a block, and forward again: the same as a fresh sampler's
        assert walked.step_indices(step, BatchPlan(16, 16, 1)) == _mixture().step_indices(step, BatchPlan(16, 16, 1))
    shares = [_mixture(rank=r).micro_batches(37, BatchPlan(16, 4, 2)) for r in (0, 1)]
    assert [int(u) for part in shares for batch in part for u in batch] == [int(u) for u in whole]
    assert _mixture(seed=8).step_indices(37, BatchPlan(16, 16, 1)) != whole


def test_packed_windows_hold_one_corpus_and_name_their_predecessor() -> None:
    plan = BatchPlan(6, 6, 1)
    sampler = _mixture(packed=True)
    seen: dict[int, tuple[int, ...]] = {}
    for step in range(5):
        for item in sampler.step_items(step, plan):
            corpus = int(item.unit[0] >= 50)
            assert all(int(r >= 50) == corpus for r in item.unit) and 1 <= len(item.unit) <= 3  # 3 x 9 s fit
            assert item.previous == seen.get(corpus)
            seen[corpus] = item.unit
    assert sampler.epoch_of(5, plan) > 0
