"""The benchmark scripts run: the course-recipe port of ``scripts/bench_seed.py`` (its toolkit side
faked from a saved record), ``scripts/random_whisper.py``, ``scripts/bench_compile.py``,
``scripts/bench_grouping.py`` and ``scripts/bench_shard_index.py``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_bench_seed_runs_the_recipe_port_and_prints_the_ratios(tiny_model: Path, corpus: Path, tmp_path: Path) -> None:
    record = {"train_samples_per_second": 2.0, "audio_hours_per_hour": 2.0, "eval_utterances_per_second": 4.0,
              "eval_wer_normalized": 50.0, "eval_wer": 60.0, "preprocess_seconds": 0.5, "preprocessed_bytes": 1000,
              "train_clips": 4, "world_size": 1, "device": "cpu", "mfu": None}
    fake = tmp_path / "toolkit.json"
    fake.write_text(json.dumps(record) + "\n")
    out = tmp_path / "out.json"
    result = subprocess.run(
        [sys.executable, "scripts/bench_seed.py", "--model", str(tiny_model), "--train", str(corpus / "train"),
         "--dev", str(corpus / "dev"), "--steps", "2", "--global-batch", "2", "--max-dev", "4",
         "--fake-toolkit-json", str(fake), "--out", str(out), "--workdir", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(out.read_text())
    recipe = summary["sides"]["recipe"]
    assert recipe["train_clips"] == 4 and recipe["eval_utterances"] == 4
    assert recipe["preprocessed_bytes"] > 0 and recipe["train_samples_per_second"] > 0
    ratios = summary["ratios"]["toolkit"]
    assert ratios["train_clips_per_s_x"] == pytest.approx(2.0 / recipe["train_samples_per_second"])
    assert "ratios vs recipe" in result.stdout and "recipe ran:" in result.stdout


def test_random_whisper_writes_a_loadable_model_of_the_size(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import WhisperForConditionalGeneration

    out = tmp_path / "tiny"
    result = subprocess.run([sys.executable, "scripts/random_whisper.py", "--size", "tiny", "--processor",
                             str(tiny_model), "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    model = WhisperForConditionalGeneration.from_pretrained(out)
    assert (model.config.d_model, model.config.encoder_layers, model.config.decoder_ffn_dim) == (384, 4, 1536)
    assert (out / "tokenizer_config.json").exists() or (out / "tokenizer.json").exists()


def test_bench_compile_times_eager_and_compiled_steps(tiny_model: Path) -> None:
    result = subprocess.run([sys.executable, "scripts/bench_compile.py", "--model", str(tiny_model), "--batch", "1",
                             "--tokens", "4", "--repeats", "1", "--static"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["eager_step_s"] > 0 and record["compiled_step_s"] > 0 and record["dynamic"] is False


def test_bench_grouping_bounds_what_length_grouping_saves(tiny_model: Path, corpus: Path) -> None:
    result = subprocess.run([sys.executable, "scripts/bench_grouping.py", "--model", str(tiny_model),
                             "--data", str(corpus / "train"), "--micro", "4", "32"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [r["micro_batch"] for r in records] == [4, 32]
    for record in records:  # sorted lengths never pad more than a random order
        assert record["grouped_flops"] <= record["random_flops"] and 0 <= record["saving_percent"] < 100


def test_bench_shard_index_times_a_start_up_over_a_synthetic_index(tiny_model: Path, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "scripts/bench_shard_index.py", "--clips", "2500", "--shard-size", "1000",
                             "--workdir", str(tmp_path / "sim"), "--tokenizer", str(tiny_model), "--packing",
                             "--step", "50"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["clips"] == 2500 and record["shards"] == 3 and record["units"] == 16 and record["packing"]
    assert set(record["stages"]) == {"imports", "open", "tokenize", "targets", "packer", "locate"}
    assert record["peak_rss_mb"] > 0 and record["startup_seconds"] >= 0
