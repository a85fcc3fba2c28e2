"""Low-memory modes: LoRA on an int8 base with 8-bit AdamW, QLoRA (NF4), adapter checkpoints, merged export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import last_json_line, launch, train_args

pytestmark = pytest.mark.slow


def lora_args(model: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return train_args(model, corpus, out, "training.learning_rate=1e-2", "training.save_every=2",
                      "training.method=lora", "output.keep_checkpoints=5", *extra)


def test_lora_int8_trains_resumes_and_exports_a_matching_merged_model(
    tiny_model: Path, corpus: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = lora_args(tiny_model, corpus, out, "model.quantization=int8", "training.optimizer=adamw8bit")
    first = launch(args, processes=2)
    assert first.returncode == 0
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 4 and results["eval"]["num_samples"] == 10

    # Checkpoints hold the adapter only; the base never changes.
    saved = load_file(out / "checkpoints" / "checkpoint-2" / "model.safetensors")
    assert saved and all("lora_" in key for key in saved)

    adapter = out / "final" / "adapter"
    unbroken = load_file(adapter / "adapter_model.safetensors")
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    again = launch(args, processes=2)
    assert again.returncode == 0 and "resumed from" in again.stderr
    resumed = load_file(adapter / "adapter_model.safetensors")
    assert unbroken.keys() == resumed.keys() and all((unbroken[k] == resumed[k]).all() for k in unbroken)

    def evaluate(model: str, *extra: str) -> tuple[dict, list[dict]]:
        predictions = tmp_path / f"pred-{len(list(tmp_path.glob('pred-*')))}.jsonl"
        result = launch(["evaluate", "--model", model, "--data", str(corpus / "dev"), "--batch-size", "4",
                         "--max-new-tokens", "6", "--num-workers", "0", "--predictions", str(predictions), *extra],
                        processes=1)
        assert result.returncode == 0
        return last_json_line(result.stdout), [json.loads(x) for x in predictions.read_text().splitlines()]

    merged, merged_pred = evaluate(str(out / "final"))
    on_fp32_base, adapter_pred = evaluate(str(adapter))
    on_int8_base, _ = evaluate(str(adapter), "--quantization", "int8")
    assert any(p["prediction"] for p in merged_pred), "predictions are empty: the comparison would be vacuous"
    assert merged_pred == adapter_pred
    for key in ("wer", "wer_ortho", "cer"):
        assert merged[key] == on_fp32_base[key]
    assert on_int8_base["num_samples"] == 10
    assert (out / "final" / "config.json").is_file() and (out / "final" / "README.md").is_file()

    import soundfile as sf
    from transformers import pipeline

    asr = pipeline("automatic-speech-recognition", model=str(out / "final"), device="cpu")
    audio, sr = sf.read(corpus / "dev" / "clip-000.flac", dtype="float32")
    text = asr({"raw": audio, "sampling_rate": sr}, generate_kwargs={"max_new_tokens": 6})["text"]
    assert text.strip() == merged_pred[[p["id"] for p in merged_pred].index("clip-000.flac")]["prediction"]


@pytest.mark.parametrize(
    "extra",
    [("model.quantization=nf4", "model.compute_dtype=float32"), ("training.optimizer=adamw8bit", "training.method=full")],
)
def test_qlora_and_8bit_adamw_train(tiny_model: Path, corpus: Path, tmp_path: Path, extra: tuple[str, ...]) -> None:
    out = tmp_path / "run"
    args = lora_args(tiny_model, corpus, out, "training.max_steps=2", *extra)
    assert launch(args, processes=1).returncode == 0
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 2 and results["eval"]["num_samples"] == 10
