"""Integration on the real Whisper tiny.en and the espeak-en corpus in ../shared (skipped when absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, SHARED_DATA, SHARED_MODEL, last_json_line, launch, needs_shared

pytestmark = [needs_shared, pytest.mark.slow]


def test_pretrained_tiny_en_wer_on_espeak_dev() -> None:
    result = launch(["evaluate", "--model", str(SHARED_MODEL), "--data", str(SHARED_DATA / "dev"),
                     "--max-samples", "40", "--batch-size", "8"], processes=1)
    assert result.returncode == 0
    metrics = last_json_line(result.stdout)
    assert metrics["num_samples"] == 40
    # Measured: 37.3 normalised, 43.1 orthographic on these 40 utterances.
    assert 30 < metrics["wer"] < 45 and metrics["wer_ortho"] > metrics["wer"]


def test_short_fine_tune_on_two_processes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [
        "train", "--config", str(ROOT / "recipes" / "demo.yaml"), f"model.name_or_path={SHARED_MODEL}",
        f"data.train={SHARED_DATA / 'train'}", f"data.eval={SHARED_DATA / 'dev'}", "data.max_train_samples=64",
        "data.max_eval_samples=16", "training.max_steps=3", "training.global_batch_size=8",
        "training.micro_batch_size=4", "training.learning_rate=1e-4", "training.warmup_steps=1",
        "evaluation.at_start=false", "evaluation.every_steps=0", f"output.dir={out}",
    ]
    result = launch(args, processes=2, timeout=900)
    assert result.returncode == 0
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["eval"]["num_samples"] == 16
    assert results["eval"]["wer"] < 60
