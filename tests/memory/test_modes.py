"""The mode catalogue: its order, its fields, and the launch configs it names."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tests.conftest import ROOT
from toolkit.memory import MODE_NAMES, MODES, PlanError, find_mode, get_mode, launch_config
from toolkit.memory.states import ZERO3_MAX_LIVE_PARAMETERS


def test_order_is_fastest_first() -> None:
    assert MODE_NAMES == (
        "full", "full-adamw8bit", "zero2", "zero3", "lora", "zero2-offload", "zero3-offload", "lora-int8", "qlora-nf4"
    )


def test_each_mode_is_told_apart_by_its_fields() -> None:
    fields = ("sharding", "offload", "base", "optimizer", "trainable")
    for mode in MODES:
        assert find_mode(**{key: getattr(mode, key) for key in fields}) is mode
    assert find_mode(trainable="full", sharding="zero3", offloaded=True) is get_mode("zero3-offload")
    with pytest.raises(PlanError, match="no mode has"):
        find_mode(trainable="lora", sharding="zero2")
    with pytest.raises(PlanError, match="unknown mode"):
        get_mode("zero4")


def test_the_catalogue_refuses_fields_it_has_no_formula_for() -> None:
    full = get_mode("full")
    for changes in ({"base": "int8"}, {"offload": "optimizer"}, {"sharding": "zero2"},
                    {"trainable": "lora", "base": "fp32"}, {"base": "fp64"}):
        with pytest.raises(PlanError, match="mode full"):
            dataclasses.replace(full, **changes)
    with pytest.raises(PlanError, match="ZeRO-2 offloads"):
        dataclasses.replace(get_mode("zero2-offload"), offload="optimizer+params")


@pytest.mark.skipif(not (ROOT / "launch_configs" / "ds_zero3.yaml").is_file(), reason="no DeepSpeed launch configs")
def test_assumptions_match_the_deepspeed_launch_configs() -> None:
    for name in ("ds_zero3.yaml", "ds_zero3_offload.yaml"):  # zero_init=False in zero3_model_states
        assert "zero3_init_flag: false" in (ROOT / "launch_configs" / name).read_text()
    for name in ("zero3.json", "zero3_offload.json"):
        zero = json.loads((ROOT / "launch_configs" / "deepspeed" / name).read_text())["zero_optimization"]
        assert zero["stage3_max_live_parameters"] == ZERO3_MAX_LIVE_PARAMETERS
    for mode in MODES:  # every launch config a mode names exists
        assert (ROOT / launch_config(mode, 1).split()[0]).is_file(), mode.name
