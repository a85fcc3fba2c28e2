"""Batch arithmetic and the step-addressed sample order."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.config import ConfigError
from toolkit.training.batching import BatchPlan, StepBatchSampler, StepSampler


def test_plan_derives_accumulation() -> None:
    plan = BatchPlan.create(16, 4, 2)
    assert (plan.per_rank, plan.accumulation) == (8, 2)
    assert plan.describe() == "global batch 16 = micro-batch 4 x accumulation 2 x 2 process(es)"


def test_plan_lowers_micro_to_a_divisor() -> None:
    assert BatchPlan.create(16, 16, 2).micro_batch_size == 8
    assert BatchPlan.create(24, 5, 2).micro_batch_size == 4


def test_plan_refuses_uneven_global_batch() -> None:
    with pytest.raises(ConfigError, match="training.global_batch_size=15 cannot be split evenly over 2 processes"):
        BatchPlan.create(15, 4, 2)


def test_epochs_are_permutations_and_order_is_seeded() -> None:
    plan = BatchPlan.create(8, 4, 1)
    sampler = StepSampler(32, seed=1, rank=0)
    epoch0 = np.concatenate([sampler.step_indices(s, plan) for s in range(4)])
    assert sorted(epoch0) == list(range(32))
    epoch1 = np.concatenate([sampler.step_indices(s, plan) for s in range(4, 8)])
    assert sorted(epoch1) == list(range(32)) and not np.array_equal(epoch0, epoch1)
    same = StepSampler(32, seed=1, rank=0)
    assert np.array_equal(same.step_indices(5, plan), sampler.step_indices(5, plan))
    assert not np.array_equal(StepSampler(32, 2, 0).step_indices(0, plan), sampler.step_indices(0, plan))


def test_steps_spanning_an_epoch_boundary() -> None:
    plan = BatchPlan.create(4, 4, 1)
    sampler = StepSampler(10, seed=0, rank=0)
    stream = np.concatenate([sampler.step_indices(s, plan) for s in range(5)])
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))


def test_ranks_share_the_step_and_micro_size_only_regroups() -> None:
    whole, sharded, small = BatchPlan.create(8, 8, 1), BatchPlan.create(8, 2, 2), BatchPlan.create(8, 1, 2)
    one = StepSampler(50, seed=3, rank=0)
    shards = [StepSampler(50, seed=3, rank=r) for r in range(2)]
    for step in range(10):
        assert np.array_equal(np.concatenate([s.rank_indices(step, sharded) for s in shards]), one.step_indices(step, whole))
        assert sum(shards[1].micro_batches(step, small), []) == sum(shards[1].micro_batches(step, sharded), [])


def test_batch_sampler_resumes_mid_run() -> None:
    plan = BatchPlan.create(8, 2, 2)
    sampler = StepSampler(40, seed=0, rank=1)
    full = list(StepBatchSampler(sampler, plan, 0, 6))
    assert len(full) == len(StepBatchSampler(sampler, plan, 0, 6)) == 12
    assert list(StepBatchSampler(sampler, plan, 4, 6)) == full[8:]


def test_a_continued_step_starts_at_the_samples_done_even_off_the_new_micro_batch() -> None:
    # 20 per rank: micro-batch 5 backs off to 2, which does not divide the 5 samples already done.
    before = BatchPlan.create(40, 5, 2)
    after = before.smaller()
    assert after is not None and after.micro_batch_size == 2
    sampler = StepSampler(100, seed=0, rank=1)
    mine = sampler.rank_indices(3, before).tolist()
    rest = StepBatchSampler(sampler, after, 3, 5, skip_samples=5)
    batches = list(rest)
    assert sum(batches[:8], []) == mine[5:] and [len(b) for b in batches[:8]] == [2] * 7 + [1]
    assert len(rest) == len(batches) == 8 + 10
