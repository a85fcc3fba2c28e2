"""The ``plan`` command: recommendations, suggestions, JSON lines, argument errors, memory sizes."""

from __future__ import annotations

import json

import pytest

from toolkit.cli import main
from toolkit.memory import GIB, MODE_NAMES, PlanError, get_mode, launch_config, parse_memory


def test_recommendations_on_a_16gb_card(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "small", "--gpu-memory", "16GB"]) == 0
    out = capsys.readouterr().out
    assert "recommended: full " in out and "launch_configs/1gpu.yaml" in out
    assert main(["plan", "--model", "openai/whisper-large-v3", "--gpu-memory", "16GB"]) == 0
    out = capsys.readouterr().out
    # A frozen 16-bit base + adapters fits; it ranks above the offload modes (no CPU Adam, no PCIe).
    assert "recommended: lora (LoRA adapters on a frozen 16-bit base)" in out and "13.53 of 14.90 GiB" in out
    assert "(with --gpus 8, zero2 fits" in out  # sharded over 8 GPUs, ZeRO-2 needs no offload
    assert main(["plan", "--model", "large-v3", "--gpu-memory", "16GB", "--micro-batch", "32"]) == 0
    assert "nothing fits in 14.90 GiB per GPU; try --micro-batch 16 (lora" in capsys.readouterr().out
    for row in ("full ", "zero3 ", "qlora-nf4 "):
        assert any(line.startswith(row) for line in out.splitlines())


def test_nothing_fits_says_so_and_suggests(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "large-v3", "--gpu-memory", "6GB", "--micro-batch", "16"]) == 0
    out = capsys.readouterr().out
    assert "nothing fits in 5.59 GiB per GPU" in out
    assert "try --micro-batch 4 (zero2-offload" in out
    assert main(["plan", "--model", "large-v3", "--gpu-memory", "500MB", "--micro-batch", "1"]) == 0
    assert "use GPUs with more memory" in capsys.readouterr().out


def test_json_lines_parse_and_carry_the_components(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "turbo", "--gpu-memory", "24GiB", "--gpus", "2", "--micro-batch", "8", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["mode"] for line in lines] == list(MODE_NAMES)
    for line in lines:
        for key in ("estimated_gib", "fits", "weights_gib", "grads_gib", "optimizer_gib", "activations_gib",
                    "overhead_gib", "allocated_gib", "recipe", "launch_config", "bytes", "detail"):
            assert key in line, key
        assert isinstance(line["fits"], bool) and line["gpus"] == 2 and line["micro_batch"] == 8
        assert line["fits"] == (line["estimated_gib"] <= 24)
        parts = sum(line["bytes"][k] for k in ("weights", "grads", "optimizer", "activations", "overhead"))
        assert abs(parts - line["estimated_gib"] * GIB) <= 0.005 * GIB
    by_mode = {line["mode"]: line for line in lines}
    assert by_mode["zero3"]["launch_config"] == "launch_configs/ds_zero3.yaml --num_processes 2"
    assert launch_config(get_mode("zero2-offload"), 1) == "launch_configs/ds_zero2_offload.yaml --num_processes 1"
    assert launch_config(get_mode("lora"), 1) == "launch_configs/1gpu.yaml"
    assert by_mode["full"]["launch_config"] == "launch_configs/multi_gpu.yaml --num_processes 2"
    assert "model.quantization=nf4 training.method=lora" in by_mode["qlora-nf4"]["recipe"]


def test_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "small", "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory" in capsys.readouterr().err
    assert main(["plan", "--model", "small", "--gpu-memory", "16GB", "--label-tokens", "449"]) == 2
    assert "--label-tokens" in capsys.readouterr().err
    assert main(["plan", "--model", "small", "--gpu-memory", "16GB", "--lora-targets", "q_proj,wq"]) == 2
    assert "LoRA targets" in capsys.readouterr().err


def test_parse_memory() -> None:
    assert parse_memory("16GB") == 16 * 10**9
    assert parse_memory("15GiB") == 15 * GIB
    assert parse_memory("15360 MiB") == 15 * GIB  # nvidia-smi --query-gpu=memory.total
    assert parse_memory("80") == 80 * GIB
    assert parse_memory("0.5TB") == 5 * 10**11
    for bad in ("", "GB", "-1GB", "16 gigs"):
        with pytest.raises(PlanError):
            parse_memory(bad)
