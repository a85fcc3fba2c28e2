"""Estimates: a scenario accepts the model as stats, a config or a name; bad settings are refused."""

from __future__ import annotations

import pytest

from toolkit.memory import SIZES, ModelStats, PlanError, Scenario, estimate


def test_estimate_accepts_a_config_or_a_name(small: ModelStats) -> None:
    settings = dict(gpus=1, micro_batch=4, label_tokens=200, gradient_checkpointing=True)
    by_stats = estimate("lora", Scenario(small, **settings))
    assert estimate("lora", Scenario.of(SIZES["small"].config(), **settings)).total == by_stats.total
    assert estimate("lora", Scenario.of("openai/whisper-small", **settings)).total == by_stats.total
    with pytest.raises(PlanError, match="unknown mode"):
        estimate("zero4", Scenario(small))


def test_a_scenario_checks_its_settings(small: ModelStats) -> None:
    for bad, message in (({"gpus": 0}, "--gpus"), ({"micro_batch": 0}, "--micro-batch"),
                         ({"label_tokens": 449}, "--label-tokens"), ({"lora_rank": 0}, "--lora-rank"),
                         ({"attention": "flash"}, "attention"), ({"lora_targets": ()}, "LoRA targets")):
        with pytest.raises(PlanError, match=message):
            Scenario(small, **bad)
