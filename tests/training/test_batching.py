"""Batch arithmetic and the step-addressed sample order."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import partial

import numpy as np
import pytest

from toolkit.config import ConfigError
from toolkit.data.packing import pack
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
    batches = [[item.unit for item in batch] for batch in rest]
    assert sum(batches[:8], []) == mine[5:] and [len(b) for b in batches[:8]] == [2] * 7 + [1]
    assert len(rest) == len(batches) == 8 + 10


# --- packing: the units are windows laid out from each epoch's permutation ----------------------------


Layout = Callable[[np.ndarray], list[tuple[int, ...]]]


def packed_layout(num_clips: int, seed: int = 0) -> Layout:
    """A packing layout over ``num_clips`` synthetic clips of 0.5-14 s and 5-90 label tokens."""
    rng = np.random.default_rng(seed)
    durations = rng.uniform(0.5, 14.0, num_clips).astype(np.float32)
    tokens = rng.integers(5, 90, num_clips)
    return partial(pack, durations=durations, tokens=tokens, max_seconds=30.0, max_tokens=200, gap=0.3)


def epoch_windows(layout: Layout, n: int, seed: int, epoch: int) -> list[tuple[int, ...]]:
    return layout(np.random.default_rng([seed, epoch]).permutation(n))


def test_packed_steps_are_windows_of_each_epochs_permutation() -> None:
    layout = packed_layout(60)
    plan = BatchPlan.create(4, 2, 1)
    sampler = StepSampler(60, seed=5, rank=0, layout=layout)
    first = sampler.step_indices(0, plan)
    assert isinstance(first, list) and len(first) == 4 and all(isinstance(u, tuple) for u in first)
    stream = [u for step in range(30) for u in sampler.step_indices(step, plan)]
    epochs = [epoch_windows(layout, 60, 5, e) for e in range(6)]
    expected = [u for windows in epochs for u in windows]
    assert len(expected) >= len(stream) and stream == expected[: len(stream)]
    assert all(1 < len(windows) < 60 for windows in epochs)  # clips are packed
    assert epochs[0] != epochs[1]


def test_packed_every_clip_once_per_epoch() -> None:
    layout = packed_layout(50, seed=1)
    plan = BatchPlan.create(6, 3, 2)
    sampler = StepSampler(50, seed=2, rank=0, layout=layout)
    stream = [u for step in range(40) for u in sampler.step_indices(step, plan)]
    start = 0
    for epoch in range(3):
        size = len(epoch_windows(layout, 50, 2, epoch))
        clips = [c for window in stream[start : start + size] for c in window]
        assert sorted(clips) == list(range(50)), epoch
        start += size
    assert start <= len(stream)


def test_packed_ranks_share_the_same_windows_per_step() -> None:
    layout = packed_layout(45, seed=2)
    one = StepSampler(45, seed=9, rank=0, layout=layout)
    shards = [StepSampler(45, seed=9, rank=r, layout=layout) for r in range(2)]
    whole, sharded, small = BatchPlan.create(8, 4, 1), BatchPlan.create(8, 2, 2), BatchPlan.create(8, 1, 2)
    for step in range(25):  # several epochs: about 12 windows each
        single = sum(one.micro_batches(step, whole), [])
        union = [u for shard in shards for u in sum(shard.micro_batches(step, sharded), [])]
        assert Counter(union) == Counter(single) and union == single == one.step_indices(step, whole)
        assert len(union) == 8
        # A smaller micro-batch only regroups a rank's windows.
        assert sum(shards[1].micro_batches(step, small), []) == sum(shards[1].micro_batches(step, sharded), [])
        assert [len(b) for b in shards[0].micro_batches(step, sharded)] == [2, 2]


def test_packed_resume_needs_no_state_even_across_epoch_boundaries() -> None:
    layout = packed_layout(40, seed=3)
    plan = BatchPlan.create(5, 5, 1)
    reference = StepSampler(40, seed=4, rank=0, layout=layout)
    steps = [reference.step_indices(step, plan) for step in range(40)]
    ends = np.cumsum([len(epoch_windows(layout, 40, 4, e)) for e in range(30)])
    crossing = [s for s in range(40) if any(s * 5 < end < (s + 1) * 5 for end in ends)]
    assert len(crossing) >= 3  # epoch lengths are not multiples of 5 here
    for step in [*crossing, 39, 0, 17]:
        fresh = StepSampler(40, seed=4, rank=0, layout=layout)  # what a resumed run builds
        assert fresh.step_indices(step, plan) == steps[step], step
    # The batch sampler of a resumed run yields the rest of the uninterrupted one.
    two = BatchPlan.create(6, 1, 2)
    full = list(StepBatchSampler(StepSampler(40, seed=4, rank=1, layout=layout), two, 0, 12))
    resumed = list(StepBatchSampler(StepSampler(40, seed=4, rank=1, layout=layout), two, 7, 12))
    assert resumed == full[7 * 3 :] and len(full) == 12 * 3
    assert all(isinstance(item.unit, tuple) for batch in full for item in batch)
    # Items carry their stream position and the window before them: a resume rebuilds both.
    flat = [item for batch in full for item in batch]
    whole = [u for step in range(12) for u in StepSampler(40, seed=4, rank=0, layout=layout).step_indices(step, two)]
    for item in flat:
        assert whole[item.position] == item.unit
        assert item.previous == (whole[item.position - 1] if item.position else None)


def test_packed_epoch_of_increases_with_the_step() -> None:
    layout = packed_layout(40, seed=4)
    plan = BatchPlan.create(3, 3, 1)
    sampler = StepSampler(40, seed=1, rank=0, layout=layout)
    epochs = [sampler.epoch_of(step, plan) for step in range(60)]
    assert epochs[0] == 0.0
    assert all(b > a for a, b in zip(epochs, epochs[1:], strict=False)), epochs
    ends = np.cumsum([len(epoch_windows(layout, 40, 1, e)) for e in range(30)])
    for step, value in enumerate(epochs):
        position = step * 3
        epoch = int(np.searchsorted(ends, position, side="right"))
        assert int(value) == epoch
        begin = ends[epoch - 1] if epoch else 0
        assert value == pytest.approx(epoch + (position - begin) / (ends[epoch] - begin))
    assert epochs[-1] > 2  # several epochs were crossed


def test_packed_layout_from_a_real_packer() -> None:
    """The training loop's wiring: ``partial(packer.layout, durations=...)`` as the sampler's layout."""
    from toolkit.data.packing import Packer
    from toolkit.data.targets import Special, Targets

    rng = np.random.default_rng(0)
    n = 30
    first = [list(range(int(k))) for k in rng.integers(3, 40, n)]
    special = Special(prefix=(1, 2), eot=0, sot=1, notimestamps=2, startofprev=3, nospeech=4, timestamp_begin=5)
    targets = Targets(special, first, [[9, *f] for f in first], [[] for _ in first], np.zeros(n, bool),
                      np.full(n, -1), max_tokens=448)
    packer = Packer(targets, max_label_tokens=100)
    durations = rng.uniform(1.0, 9.0, n).astype(np.float32)
    sampler = StepSampler(n, seed=0, rank=0, layout=partial(packer.layout, durations=durations))
    plan = BatchPlan.create(4, 4, 1)
    stream = [u for step in range(10) for u in sampler.step_indices(step, plan)]
    for unit in stream:
        assert len(packer.window_labels(unit)) <= 100
        assert float(durations[list(unit)].sum()) + 0.3 * (len(unit) - 1) <= 30.0 or len(unit) == 1
    size = len(packer.layout(np.random.default_rng([0, 0]).permutation(n), durations))
    assert sorted(c for unit in stream[:size] for c in unit) == list(range(n))
