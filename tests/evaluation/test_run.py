"""The ``evaluate`` command: the prompt (language, task) a fine-tune records is the one it evaluates with."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import last_json_line


def _german_fine_tune(source: Path, target: Path) -> Path:
    """A multilingual checkpoint whose generation config records german, as a fine-tune's final/ does."""
    from transformers import GenerationConfig

    shutil.copytree(source, target)
    gen = GenerationConfig.from_pretrained(target)
    gen.language, gen.task = "german", "transcribe"
    gen.save_pretrained(target)
    return target


def test_evaluate_takes_language_and_task_from_the_checkpoint(
    tiny_multilingual_model: Path, corpus: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:
    from toolkit.cli import main

    final = _german_fine_tune(tiny_multilingual_model, tmp_path / "final")
    args = ["evaluate", "--model", str(final), "--data", str(corpus / "dev"), "--max-samples", "2",
            "--batch-size", "2", "--max-new-tokens", "2", "--num-workers", "0",
            "--predictions", str(tmp_path / "p.jsonl")]
    with caplog.at_level(logging.INFO, logger="toolkit.evaluation.run"):
        assert main(args) == 0
    assert last_json_line(capsys.readouterr().out)["num_samples"] == 2
    assert f"evaluating with the language german and task transcribe recorded in the generation config of {final}" in caplog.text
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 2


def test_the_command_line_prompt_wins(tiny_multilingual_model: Path, tmp_path: Path) -> None:
    from toolkit.evaluation.run import evaluation_prompt

    final = _german_fine_tune(tiny_multilingual_model, tmp_path / "final")
    assert evaluation_prompt(str(final), None, None) == ("german", "transcribe")
    assert evaluation_prompt(str(final), "french", "translate") == ("french", "translate")
    assert evaluation_prompt(str(final), "french", None) == ("french", "transcribe")
    assert evaluation_prompt(str(tiny_multilingual_model), None, None) == (None, "transcribe")  # records none


def test_a_lora_export_records_the_prompt(tiny_multilingual_model: Path, tmp_path: Path) -> None:
    """The merged model is the base reloaded, whose generation config lacks the run's language: it is written
    from the trained model, in final/ and final/adapter/."""
    from toolkit.config import ModelConfig, RunConfig, TrainingConfig
    from toolkit.evaluation.run import evaluation_prompt
    from toolkit.modeling import load_model
    from toolkit.output import export_model

    config = RunConfig()
    config.model = ModelConfig(name_or_path=str(tiny_multilingual_model), language="german")
    config.training = TrainingConfig(max_steps=1, method="lora")
    loaded = load_model(config.model, config.training)
    export_model(loaded.model, loaded.processor, tmp_path / "final", config, {"eval": None})
    for directory in (tmp_path / "final", tmp_path / "final" / "adapter"):
        assert json.loads((directory / "generation_config.json").read_text())["language"] == "german"
        assert evaluation_prompt(str(directory), None, None) == ("german", "transcribe")


def test_evaluate_reports_a_list_of_sets_per_set_and_per_language(
    tiny_multilingual_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from tests.conftest import write_audiofolder
    from toolkit.cli import main

    english = write_audiofolder(tmp_path / "en", 3, start_seed=20)
    french = write_audiofolder(tmp_path / "fr", 2, start_seed=40)
    sets = f"[{{path: {english}, language: en}}, {{path: {french}, language: fr, name: fr-test}}]"
    args = ["evaluate", "--model", str(tiny_multilingual_model), "--language", "en", "--data", sets,
            "--batch-size", "2", "--max-new-tokens", "2", "--num-workers", "0", "--predictions", str(tmp_path / "p.jsonl")]
    assert main(args) == 0
    metrics = last_json_line(capsys.readouterr().out)
    assert (metrics["num_samples"], metrics["en/num_samples"], metrics["fr-test/num_samples"]) == (5, 3, 2)
    assert metrics["lang/fr/num_samples"] == 2 and "lang/en/wer" in metrics and metrics["skipped"] == 0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert sorted(row["set"] for row in rows) == ["en", "en", "en", "fr-test", "fr-test"]


@pytest.mark.parametrize("data, message", [
    ("[{path: a, langauge: fr}]", r"unknown key --data\[0\].langauge \(did you mean --data\[0\].language"),
    ("[{path: a", "--data: not a YAML list"),
])
def test_a_bad_list_of_sets_is_one_line(tiny_multilingual_model: Path, data: str, message: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from toolkit.cli import main

    assert main(["evaluate", "--model", str(tiny_multilingual_model), "--data", data]) == 2
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if line.strip()]) == 1 and re.search(message, err), err
