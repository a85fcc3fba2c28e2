"""Run outputs: model card, results file, and a Hub push that fails softly."""

from __future__ import annotations

import json
import logging
import os
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


def _tiny_export_inputs(tiny_model: Path):  # noqa: ANN202
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    return WhisperForConditionalGeneration.from_pretrained(tiny_model), WhisperProcessor.from_pretrained(tiny_model)


def test_final_is_replaced_whole_or_not_at_all(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from toolkit.output import export_model

    model, processor = _tiny_export_inputs(tiny_model)
    config = RunConfig()
    config.model.name_or_path = str(tiny_model)
    final = tmp_path / "final"
    export_model(model, processor, final, config, {"eval": None, "steps": 1})
    (final / "marker").write_text("the first export")
    before = sorted(p.name for p in final.iterdir())

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(processor), "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_model(model, processor, final, config, {"eval": None, "steps": 2})
    assert sorted(p.name for p in final.iterdir()) == before  # the old final/ untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no partial copy left
    monkeypatch.undo()
    export_model(model, processor, final, config, {"eval": None, "steps": 3})
    assert not (final / "marker").exists() and "Steps: 3" in (final / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_final_follows_the_umask(tiny_model: Path, tmp_path: Path, umask: int) -> None:
    from toolkit.output import export_model

    model, processor = _tiny_export_inputs(tiny_model)
    config = RunConfig()
    config.model.name_or_path = str(tiny_model)
    old = os.umask(umask)
    try:
        export_model(model, processor, tmp_path / "final", config, {"eval": None})
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "final").iterdir()}
    assert modes["model.safetensors"] == 0o666 & ~umask  # safetensors writes 0600 by itself
    assert set(modes.values()) == {0o666 & ~umask}
    assert (tmp_path / "final").stat().st_mode & 0o777 == 0o777 & ~umask


def test_final_names_local_paths_by_their_last_component(tiny_model: Path, tmp_path: Path) -> None:
    from toolkit.output import export_model

    model, processor = _tiny_export_inputs(tiny_model)
    config = RunConfig()
    config.model.name_or_path = str(tiny_model)
    config.data.train, config.data.eval = str(tmp_path / "corpus" / "train"), "someone/hub-dataset"
    config.output.dir = str(tmp_path / "runs" / "x")
    export_model(model, processor, tmp_path / "final", config, {"eval": None})
    for path in (tmp_path / "final").iterdir():
        text = path.read_text(errors="replace")
        assert str(tmp_path) not in text and str(tiny_model.parent) not in text, path.name
    card = (tmp_path / "final" / "README.md").read_text()
    assert "base_model:" not in card  # the Hub's metadata names Hub repositories only
    assert f"from `{tiny_model.name}` on `train`" in card and "Evaluation on `someone/hub-dataset`" in card
    assert "dir: x" in card
    config.model.name_or_path = "openai/whisper-tiny.en"
    assert "base_model: openai/whisper-tiny.en\n" in model_card(config, {})
