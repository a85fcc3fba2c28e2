"""Run outputs: model card, results file, and a Hub push that fails softly."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from toolkit.config import RunConfig
from toolkit.output import model_card, push_to_hub, write_json


def test_model_card_names_the_stand_in_language_and_results() -> None:
    config = RunConfig()
    config.model.name_or_path, config.model.language, config.model.stand_in_for = "openai/whisper-small", "sinhalese", "dhivehi"
    config.data.train, config.data.eval = "cv13", "cv13"
    card = model_card(config, {"eval": {"wer": 14.1, "wer_ortho": 60.2, "cer": 5.0, "num_samples": 2212}, "steps": 500})
    assert "dhivehi (decoded with Whisper's sinhalese token as a stand-in)" in card
    assert "| wer | 14.1 |" in card and "stand_in_for: dhivehi" in card


def test_push_to_unreachable_hub_keeps_the_local_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    folder = tmp_path / "final"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with caplog.at_level(logging.ERROR):
        assert push_to_hub(folder, "someone/model", private=True) is None
    assert "push to the Hub (someone/model) failed" in caplog.text and str(folder) in caplog.text
    assert (folder / "config.json").exists()


def test_write_json_is_atomic(tmp_path: Path) -> None:
    write_json(tmp_path / "r.json", {"a": 1})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    assert not list(tmp_path.glob("*.tmp"))


def test_export_keeps_the_english_spelling_map(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from toolkit.output import export_model

    processor = WhisperProcessor.from_pretrained(tiny_model)
    processor.tokenizer.english_spelling_normalizer = {"colour": "color"}
    model = WhisperForConditionalGeneration.from_pretrained(tiny_model)
    config = RunConfig()
    config.model.name_or_path = str(tiny_model)
    export_model(model, processor, tmp_path / "final", config, {"eval": None})
    reloaded = WhisperProcessor.from_pretrained(tmp_path / "final")
    assert reloaded.tokenizer.english_spelling_normalizer == {"colour": "color"}
    assert reloaded.tokenizer.normalize("Colour") == "color"
