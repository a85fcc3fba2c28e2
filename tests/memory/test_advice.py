"""Advice: the recommendation, and what a run out of memory at micro-batch 1 is told."""

from __future__ import annotations

from toolkit.launch import LaunchInfo
from toolkit.memory import GIB, Estimate, advice_at_micro_batch_one, current_mode, recommend, resolve_config


def fake(mode: str, gib: float) -> Estimate:
    return Estimate(mode, weights=int(gib * GIB), grads=0, optimizer=0, activations=0, overhead=0)


def test_recommend_picks_the_fastest_fitting_mode() -> None:
    estimates = [fake("full", 20), fake("full-adamw8bit", 15), fake("zero2", 12), fake("lora", 6), fake("qlora-nf4", 3)]
    assert recommend(estimates, 16 * GIB).mode == "full-adamw8bit"
    assert recommend(estimates, 13 * GIB).mode == "zero2"
    assert recommend(list(reversed(estimates)), 13 * GIB).mode == "zero2"  # by speed, not list order
    assert recommend(estimates, 2 * GIB) is None


def test_modes_are_named_as_plan_names_them() -> None:
    ddp, zero3 = LaunchInfo(world_size=2), LaunchInfo(world_size=2, deepspeed=True, zero_stage=3, offload_optimizer=True)
    assert current_mode("full", "none", "adamw", ddp) == "full"
    assert current_mode("full", "none", "adamw8bit", ddp) == "full-adamw8bit"
    assert current_mode("full", "none", "adamw", zero3) == "zero3-offload"
    assert current_mode("lora", "int8", "adamw", ddp) == "lora-int8"
    assert current_mode("lora", "nf4", "adamw", ddp) == "qlora-nf4"


def test_advice_at_micro_batch_one_names_the_modes_that_fit() -> None:
    _, large = resolve_config("large-v3")
    advice = advice_at_micro_batch_one(large, "full", 1, 448, True, 16 * 2**30)
    assert "lora-int8" in advice and "launch_configs/1gpu.yaml" in advice and "python -m toolkit plan" in advice
    assert "full (" not in advice
    nothing = advice_at_micro_batch_one(large, "full", 1, 448, False, 2**30)
    assert "gradient_checkpointing" in nothing and "no mode" in nothing


def test_gradient_checkpointing_auto_follows_the_planner(tmp_path, monkeypatch) -> None:
    """``auto`` turns checkpointing on only where the planner expects the run not to fit without it."""
    import torch

    from toolkit.config import RunConfig
    from toolkit.memory import advice

    config = RunConfig()
    config.model.name_or_path = "openai/whisper-small"  # a known size: no download needed
    config.training.global_batch_size = 16  # about 24 GiB without checkpointing at 448 label tokens, 10 with
    monkeypatch.setattr(advice, "device_memory", lambda device: 80 * GIB)
    assert advice.checkpointing_needed(config, 1, torch.device("cpu")) is False
    monkeypatch.setattr(advice, "device_memory", lambda device: 16 * GIB)
    assert advice.checkpointing_needed(config, 1, torch.device("cpu")) is True
    config.model.name_or_path = str(tmp_path / "not-a-model")  # unreadable: the safe side
    assert advice.checkpointing_needed(config, 1, torch.device("cpu")) is True
