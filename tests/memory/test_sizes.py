"""Model lookup: size names and aliases, local config directories, unknown names and the offline Hub."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from toolkit.cli import main
from toolkit.memory import SIZES, PlanError, load_stats
from toolkit.memory.sizes import resolve_config, size_name


def test_known_names_aliases_and_english_only_vocabularies() -> None:
    assert size_name("openai/whisper-large-v3-turbo") == "turbo"
    assert size_name("whisper-small.en") == "small.en"
    assert size_name("LARGE-V2") == "large-v2"
    assert size_name("large-v3.en") is None
    name, config = resolve_config("openai/whisper-medium.en")
    assert name == "whisper-medium.en" and config.vocab_size == 51864 and config.num_mel_bins == 80
    turbo = SIZES["turbo"]
    assert (turbo.encoder_layers, turbo.decoder_layers, turbo.num_mel_bins, turbo.vocab_size) == (32, 4, 128, 51866)


def test_local_config_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "my-whisper"
    model.mkdir()
    config = SIZES["tiny"].config().to_dict()
    (model / "config.json").write_text(json.dumps(config))
    assert main(["plan", "--model", str(model), "--gpu-memory", "8GB", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["model"] == "my-whisper" and lines[0]["fits"]
    tiny = load_stats("tiny")
    assert load_stats(str(model)).total == tiny.total == 37_760_640
    assert lines[0]["bytes"]["weights"] == 4 * tiny.total

    (tmp_path / "empty").mkdir()
    with pytest.raises(PlanError, match="no config.json"):
        load_stats(str(tmp_path / "empty"))
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(PlanError, match="not 'whisper'"):
        load_stats(str(other))


def test_unknown_names_fail_clearly(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["plan", "--model", "larg-v3", "--gpu-memory", "16GB"]) == 2
    err = capsys.readouterr().err
    assert "unknown Whisper model 'larg-v3' (did you mean large-v3?)" in err and "turbo" in err

    import transformers

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.WhisperConfig, "from_pretrained", offline)
    assert main(["plan", "--model", "someone/whisper-finetuned", "--gpu-memory", "16GB"]) == 2
    err = capsys.readouterr().err
    assert "could not read the config of 'someone/whisper-finetuned'" in err and "give the size instead" in err
