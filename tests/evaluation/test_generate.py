"""Sharded generation: batches independent of world size, the eval batch-size finder, end to end runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import last_json_line, launch
from toolkit.evaluation.generate import eval_rounds, round_batches


def eval_batches(durations: np.ndarray, batch_size: int, world_size: int, rank: int) -> list[list[int]]:
    """The reference deal: longest clips first, batches dealt round-robin over ranks (all at once)."""
    order = np.argsort(-durations, kind="stable")
    batches = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    return batches[rank::world_size]


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


@pytest.mark.parametrize(("world", "size", "n"), [(1, 5, 37), (2, 5, 37), (3, 4, 37), (4, 8, 10), (2, 1, 3), (3, 16, 2)])
def test_rounds_deal_the_same_batches_as_eval_batches(world: int, size: int, n: int) -> None:
    durations = np.random.default_rng(1).uniform(1, 30, size=n)
    order = np.argsort(-durations, kind="stable")
    rounds = eval_rounds(n, size, world)
    for rank in range(world):
        batches = round_batches(order, 0, size, world, rank)
        assert batches == eval_batches(durations, size, world, rank)
        # Batch j is round j's: positions [j*world*size + rank*size, ...).
        assert all(b == order[(j * world + rank) * size :][:size].tolist() for j, b in enumerate(batches))
        assert rounds - 1 <= len(batches) <= rounds  # only the last round can leave a rank empty
    assert len(round_batches(order, 0, size, world, 0)) == rounds  # rank 0 works in every round


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rounds_after_a_backoff_cover_the_rest_once(world: int) -> None:
    order = np.argsort(-np.random.default_rng(2).uniform(1, 30, size=41), kind="stable")
    done = world * 8  # one round at 8, then 4 from there
    shards = [round_batches(order, done, 4, world, rank) for rank in range(world)]
    covered = sorted(i for shard in shards for batch in shard for i in batch)
    assert covered == sorted(order[done:].tolist())
    assert all(len(batch) <= 4 for shard in shards for batch in shard)
    assert shards[0][0] == order[done : done + 4].tolist()
    assert max(len(s) for s in shards) == eval_rounds(41 - done, 4, world)


def test_settings_from_config_take_the_recipe_and_the_run() -> None:
    from toolkit.config import EvaluationConfig
    from toolkit.evaluation.generate import GenerationSettings

    settings = GenerationSettings.from_config(
        EvaluationConfig(batch_size=8, max_new_tokens=20, num_beams=2, static_cache=True), num_workers=3, synced_gpus=True
    )
    assert (settings.batch_size, settings.max_new_tokens, settings.num_beams, settings.static_cache) == (8, 20, 2, True)
    assert (settings.num_workers, settings.synced_gpus, settings.collect_predictions) == (3, True, False)
    assert GenerationSettings.from_config(EvaluationConfig(batch_size=8), batch_size=4).batch_size == 4
    with pytest.raises(TypeError):
        GenerationSettings.from_config(EvaluationConfig(), beams=2)  # a misspelt field is an error


@pytest.fixture(scope="module")
def tone_eval(tiny_model: Path, corpus: Path):
    """Model, dev set, collator, tokenizer and normaliser for direct evaluate_model calls."""
    from toolkit.config import DataConfig, ModelConfig
    from toolkit.data.collator import WhisperCollator
    from toolkit.data.pipeline import load_split
    from toolkit.evaluation.normalize import make_normalizer
    from toolkit.modeling import load_model

    loaded = load_model(ModelConfig(name_or_path=str(tiny_model)), dtype=None, device="cpu")
    split = load_split("eval", DataConfig(eval=str(corpus / "dev"), num_workers=0), tokenizer=None)
    collator = WhisperCollator(loaded.processor.feature_extractor, loaded.model.config.decoder_start_token_id)
    tokenizer = loaded.processor.tokenizer
    return loaded.model, split.dataset, collator, tokenizer, make_normalizer(loaded.english, tokenizer)


def _evaluate(tone_eval, batch_size: int, limit: int | None = None):
    from toolkit.evaluation.generate import GenerationSettings, evaluate_model
    from toolkit.oom import OutOfMemoryInjector

    model, dataset, collator, tokenizer, normalize = tone_eval
    handle = OutOfMemoryInjector(rank=0, limit=limit).attach(model, 0) if limit is not None else None
    try:
        settings = GenerationSettings(batch_size=batch_size, max_new_tokens=6, collect_predictions=True)
        return evaluate_model(model, dataset, collator, tokenizer, normalize, settings)
    finally:
        if handle is not None:
            handle.remove()


METRIC_KEYS = ("wer", "wer_ortho", "cer", "num_samples", "reference_words")


def test_generation_backs_off_to_the_size_that_fits(tone_eval, caplog: pytest.LogCaptureFixture) -> None:
    plain = _evaluate(tone_eval, 8)
    assert (plain.batch_size, plain.backoffs) == (8, [])
    with caplog.at_level("WARNING", logger="toolkit.evaluation.generate"):
        backed = _evaluate(tone_eval, 8, limit=2)
    assert {k: backed.metrics[k] for k in METRIC_KEYS} == {k: plain.metrics[k] for k in METRIC_KEYS}
    assert backed.metrics["num_samples"] == 10
    assert backed.batch_size == 2
    assert backed.backoffs == [{"from": 8, "to": 4}, {"from": 4, "to": 2}]
    assert backed.predictions == plain.predictions  # every utterance once, none from a dropped round
    assert "generation ran out of memory on rank(s) [0] at eval batch 8; retrying with 4" in caplog.text
    assert set(backed.metrics) == set(plain.metrics)  # the finder's fields are on EvalResult, not in metrics


def test_a_static_cache_decodes_the_same(tone_eval) -> None:
    from toolkit.evaluation.generate import GenerationSettings, evaluate_model, generation_config_for

    model, dataset, collator, tokenizer, normalize = tone_eval
    assert generation_config_for(model, max_new_tokens=6, num_beams=1, static_cache=True).cache_implementation == "static"
    results = [
        evaluate_model(model, dataset, collator, tokenizer, normalize,
                       GenerationSettings(batch_size=4, max_new_tokens=6, collect_predictions=True, static_cache=static))
        for static in (False, True)
    ]
    assert results[0].predictions == results[1].predictions
    assert {k: results[1].metrics[k] for k in METRIC_KEYS} == {k: results[0].metrics[k] for k in METRIC_KEYS}


def test_generation_that_fits_nowhere_stops(tone_eval) -> None:
    from toolkit.oom import OutOfMemoryAtMicroBatchOne

    with pytest.raises(OutOfMemoryAtMicroBatchOne, match="one utterance does not fit"):
        _evaluate(tone_eval, 4, limit=0)


def test_synced_generation_cannot_back_off(tone_eval) -> None:
    from toolkit.evaluation.generate import GenerationSettings, evaluate_model
    from toolkit.oom import OutOfMemoryInjector, UnrecoverableOutOfMemory

    model, dataset, collator, tokenizer, normalize = tone_eval
    handle = OutOfMemoryInjector(rank=0, limit=2).attach(model, 0)
    settings = GenerationSettings(batch_size=8, max_new_tokens=6, synced_gpus=True)
    try:
        with pytest.raises(UnrecoverableOutOfMemory, match=r"eval batch 8 .*evaluation.batch_size=4"):
            evaluate_model(model, dataset, collator, tokenizer, normalize, settings)
    finally:
        handle.remove()


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
    assert (metrics["batch_size"], metrics["backoffs"]) == (4, [])


def test_two_processes_back_off_together(tiny_model: Path, corpus: Path, tmp_path: Path) -> None:
    """Rank 1 runs out of memory above 2 utterances: both ranks back off 8 -> 4 -> 2 and the WER
    (and every prediction) is that of one process without any out-of-memory error. The 32 clips
    of ``train/`` give rank 1 a full batch in the first rounds (of dev's 10 it gets 2 at batch 8)."""
    args = ["evaluate", "--model", str(tiny_model), "--data", str(corpus / "train"),
            "--batch-size", "8", "--max-new-tokens", "6", "--num-workers", "1"]
    one = launch([*args, "--predictions", str(tmp_path / "one.jsonl")], processes=1, timeout=300)
    two = launch([*args, "--predictions", str(tmp_path / "two.jsonl")], processes=2,
                 env={"TOOLKIT_INJECT_OOM": "1:2"}, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    m1, m2 = last_json_line(one.stdout), last_json_line(two.stdout)
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    for key in METRIC_KEYS:
        assert m1[key] == m2[key], key
    assert m2["num_samples"] == 32
    assert (m1["batch_size"], m1["backoffs"]) == (8, [])
    assert m2["batch_size"] == 2
    assert m2["backoffs"] == [{"from": 8, "to": 4}, {"from": 4, "to": 2}]
    assert "generation ran out of memory on rank(s) [1] at eval batch 8; retrying with 4" in two.stderr
    # Each utterance once, none from a dropped round (a tiny random model's WER alone says little).
    rows = (tmp_path / "two.jsonl").read_text().splitlines()
    assert len(rows) == 32 and rows == (tmp_path / "one.jsonl").read_text().splitlines()


def test_generation_stops_at_one_and_a_half_times_the_longest_reference() -> None:
    from types import SimpleNamespace

    from toolkit.evaluation.generate import GenerationSettings, fitted_max_new_tokens

    settings = GenerationSettings(max_new_tokens=225)
    assert fitted_max_new_tokens(settings, SimpleNamespace(longest_reference=20)) == 38  # 1.5 x 20 + 8
    assert fitted_max_new_tokens(settings, SimpleNamespace(longest_reference=300)) == 225  # the ceiling
    assert fitted_max_new_tokens(settings, SimpleNamespace(longest_reference=None)) == 225  # unknown
