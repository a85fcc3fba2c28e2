"""The loss is normalised over the whole step's tokens, so splitting a step differently changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import launch, train_args

pytestmark = pytest.mark.slow


def run(model: Path, corpus: Path, out: Path, micro: int) -> Path:
    args = train_args(model, corpus, out, "data.eval=null", "training.max_steps=3", f"training.micro_batch_size={micro}")
    assert launch(args, processes=1).returncode == 0
    return out


def test_micro_batch_split_gives_the_same_training(tiny_model: Path, corpus: Path, tmp_path: Path) -> None:
    import transformers

    config = transformers.WhisperConfig.from_pretrained(tiny_model)
    assert config.dropout > 0  # dropout is per sample, so it must be off for an exact comparison
    no_dropout = tmp_path / "model"
    model = transformers.WhisperForConditionalGeneration.from_pretrained(tiny_model, dropout=0.0)
    model.save_pretrained(no_dropout)
    transformers.WhisperProcessor.from_pretrained(tiny_model).save_pretrained(no_dropout)

    whole = run(no_dropout, corpus, tmp_path / "micro8", 8)
    split = run(no_dropout, corpus, tmp_path / "micro2", 2)
    a, b = load_file(whole / "final" / "model.safetensors"), load_file(split / "final" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    la = [json.loads(x)["loss"] for x in (whole / "metrics.jsonl").read_text().splitlines() if "loss" in x]
    lb = [json.loads(x)["loss"] for x in (split / "metrics.jsonl").read_text().splitlines() if "loss" in x]
    assert len(la) == 3
    assert la == pytest.approx(lb, rel=1e-5)
