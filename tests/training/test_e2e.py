"""End to end under ``accelerate launch`` with 2 CPU processes: train, export, and evaluate on 1 vs 2 processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import last_json_line, launch, train_args

pytestmark = pytest.mark.slow


E2E = ("training.warmup_steps=1", "training.save_every=2", "evaluation.every_steps=2", "evaluation.at_start=true",
       "evaluation.batch_size=3")


def run_args(model: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return train_args(model, corpus, out, *E2E, *extra)


@pytest.fixture(scope="module")
def two_process_run(tiny_model: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("e2e") / "run"
    # A bad row must be skipped and reported, not stop the run.
    train = tmp_path_factory.mktemp("bad-corpus")
    for item in (corpus / "train").iterdir():
        (train / item.name).symlink_to(item)
    (train / "metadata.csv").unlink()
    text = (corpus / "train" / "metadata.csv").read_text() + "missing.flac,gone\n"
    (train / "metadata.csv").write_text(text)
    args = run_args(tiny_model, corpus, out, f"data.train={train}")
    result = launch(args, processes=2, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "effective global batch: global batch 8 = micro-batch 2 x accumulation 2 x 2 process(es)" in result.stdout
    return out


def test_outputs_and_metrics(two_process_run: Path) -> None:
    results = json.loads((two_process_run / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 4
    assert (results["global_batch_size"], results["micro_batch_size"], results["gradient_accumulation_steps"]) == (8, 2, 2)
    assert results["train_samples_per_second"] > 0 and results["eval"]["num_samples"] == 10
    assert results["baseline_eval"]["num_samples"] == 10
    lines = [json.loads(line) for line in (two_process_run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if "loss" in line]
    assert [line["step"] for line in train_lines] == [1, 2, 3, 4]
    for key in ("loss", "lr", "samples_per_second", "windows_per_second", "audio_hours_per_hour", "tokens_per_second",
                "mfu", "loader_wait_fraction", "peak_memory_gib", "grad_norm"):
        assert all(key in line for line in train_lines), key
    assert train_lines[0]["lr"] == pytest.approx(1e-3) and train_lines[-1]["lr"] == 0.0  # warm-up 1, linear to 0
    assert any("eval/wer" in line for line in lines)
    skipped = [json.loads(line) for line in (two_process_run / "skipped.jsonl").read_text().splitlines()]
    assert skipped == [{"split": "train", "id": "missing.flac", "reason": "missing file", "kind": "error"}]
    assert list((two_process_run / "tensorboard").iterdir())
    card = (two_process_run / "final" / "README.md").read_text()
    assert "pipeline_tag: automatic-speech-recognition" in card and "max_steps: 4" in card


def test_final_model_loads_in_a_pipeline(two_process_run: Path, corpus: Path) -> None:
    import soundfile as sf
    from transformers import pipeline

    asr = pipeline("automatic-speech-recognition", model=str(two_process_run / "final"), device="cpu")
    audio, sr = sf.read(corpus / "dev" / "clip-000.flac", dtype="float32")
    out = asr({"raw": audio, "sampling_rate": sr}, generate_kwargs={"max_new_tokens": 5})
    assert isinstance(out["text"], str)
    final = load_file(two_process_run / "final" / "model.safetensors")
    last = load_file(two_process_run / "checkpoints" / "checkpoint-4" / "model.safetensors")
    assert all((final[k] == last[k]).all() for k in last)


def test_eval_is_identical_on_one_and_two_processes(two_process_run: Path, corpus: Path) -> None:
    args = ["evaluate", "--model", str(two_process_run / "final"), "--data", str(corpus / "dev"),
            "--batch-size", "3", "--max-new-tokens", "6", "--num-workers", "0"]
    one = launch(args, processes=1)
    two = launch(args, processes=2)
    assert one.returncode == 0 and two.returncode == 0
    m1, m2 = last_json_line(one.stdout), last_json_line(two.stdout)
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    for key in ("wer", "wer_ortho", "cer", "num_samples", "reference_words"):
        assert m1[key] == m2[key], key
    assert two.stdout.count('{"wer"') == 1  # printed by the main process only


def test_final_model_best_exports_the_best_checkpoint(tiny_model: Path, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # Also the bf16 autocast path (CPU autocast), in training and in generation.
    args = run_args(tiny_model, corpus, out, "output.final_model=best", "evaluation.at_start=false",
                      "output.keep_checkpoints=1", "training.save_every=0", "training.mixed_precision=bf16")
    assert launch(args, processes=1).returncode == 0
    results = json.loads((out / "results.json").read_text())
    best = results["best"]["step"]
    assert results["final_model"] == "best" and best in (2, 4)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted({f"checkpoint-{best}", "checkpoint-4"})
    final = load_file(out / "final" / "model.safetensors")
    kept = load_file(out / "checkpoints" / f"checkpoint-{best}" / "model.safetensors")
    assert all((final[k] == kept[k]).all() for k in kept)
