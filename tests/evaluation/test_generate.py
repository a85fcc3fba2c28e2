"""Sharded generation: batches independent of world size, and a single-process run end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from toolkit.evaluation.generate import eval_batches, eval_rounds


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_batches_are_the_same_whatever_the_world_size(world: int) -> None:
    durations = np.random.default_rng(0).uniform(1, 30, size=37)
    reference = eval_batches(durations, 5, 1, 0)
    shards = [eval_batches(durations, 5, world, rank) for rank in range(world)]
    assert sorted(map(tuple, (b for shard in shards for b in shard))) == sorted(map(tuple, reference))
    assert sorted(i for batch in reference for i in batch) == list(range(37))
    assert max(len(s) for s in shards) == eval_rounds(37, 5, world)
    first = reference[0]
    assert durations[first].min() >= durations[reference[-1]].max()


def test_evaluate_single_process(tiny_model: Path, corpus: Path) -> None:
    from toolkit.config import DataConfig, EvaluationConfig, ModelConfig
    from toolkit.evaluation.run import run_evaluate

    metrics = run_evaluate(
        ModelConfig(name_or_path=str(tiny_model)),
        DataConfig(eval=str(corpus / "dev")),
        EvaluationConfig(batch_size=4, max_new_tokens=8),
        predictions_path=None,
    )
    assert metrics["num_samples"] == 10 and metrics["world_size"] == 1
    assert metrics["wer"] >= 0 and metrics["reference_words"] > 0
    assert set(metrics) >= {"wer", "wer_ortho", "cer", "num_samples", "seconds"}
