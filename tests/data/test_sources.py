"""Data sources: audiofolder, CSV/JSONL manifests, split sub-directories, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import write_audiofolder, write_clip
from toolkit.data.sources import DataError, LocalSource, open_source


def test_audiofolder(tmp_path: Path) -> None:
    root = write_audiofolder(tmp_path / "af", 3)
    source = open_source(str(root), split="train", text_column="sentence")
    assert len(source) == 3
    item_id, audio, text = source.get(0)
    assert item_id == "clip-000.flac" and Path(audio).is_file() and text.startswith("The quick")


def test_split_subdirectories_and_expression(tmp_path: Path) -> None:
    write_audiofolder(tmp_path / "train", 3)
    write_audiofolder(tmp_path / "validation", 2, start_seed=10)
    assert len(open_source(str(tmp_path), split="train", text_column="sentence")) == 3
    assert len(open_source(str(tmp_path), split="train+validation", text_column="sentence")) == 5
    with pytest.raises(DataError, match="no metadata.csv"):
        open_source(str(tmp_path), split="test", text_column="sentence")


def test_csv_manifest_paths_relative_to_manifest(tmp_path: Path) -> None:
    (tmp_path / "audio").mkdir()
    write_clip(tmp_path / "audio" / "a.wav", 1.0)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,transcript\naudio/a.wav,hello there\n")
    source = open_source(str(manifest), split="", text_column="transcript")
    _, audio, text = source.get(0)
    assert Path(audio) == (tmp_path / "audio" / "a.wav").resolve() and text == "hello there"


def test_jsonl_manifest_with_explicit_audio_column(tmp_path: Path) -> None:
    write_clip(tmp_path / "b.flac", 1.0)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"wav": "b.flac", "sentence": "hi"}) + "\n\n")
    with pytest.raises(DataError, match="no audio path column"):
        open_source(str(manifest), split="", text_column="sentence")
    source = open_source(str(manifest), split="", text_column="sentence", audio_column="wav")
    assert len(source) == 1


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("m.csv", "file_name,text\na.wav,x\n", "no text column 'sentence' (columns: file_name, text); set data.text_column"),
        ("m.csv", "file_name,sentence\n", "the manifest has no rows"),
        ("m.jsonl", '{"file_name": "a.wav", "sentence": "x"}\n{broken\n', "m.jsonl:2: not valid JSON"),
        ("m.txt", "whatever", "a manifest must end in"),
    ],
)
def test_manifest_errors(tmp_path: Path, name: str, content: str, message: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        open_source(str(tmp_path / name), split="", text_column="sentence")


def test_missing_local_path_is_not_taken_for_a_hub_id(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        open_source(str(tmp_path / "nope"), split="train", text_column="sentence")
    with pytest.raises(DataError, match="does not exist"):
        open_source("./relative/missing.csv", split="train", text_column="sentence")


def test_hub_source_offline_error_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.config
    import huggingface_hub.constants

    # Both libraries read the offline switch at import time: patch the constants, not only the env.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(DataError, match="could not load Hub dataset 'someone/nonexistent-ds'.*local directory or manifest"):
        open_source("someone/nonexistent-ds", split="train", text_column="sentence")


def test_fingerprint_changes_with_text_and_file(tmp_path: Path) -> None:
    root = write_audiofolder(tmp_path / "af", 2)
    source = open_source(str(root), split="", text_column="sentence")
    assert isinstance(source, LocalSource)
    before = source.fingerprint(0, 2)
    assert before == open_source(str(root), split="", text_column="sentence").fingerprint(0, 2)
    write_clip(root / "clip-001.flac", 2.0, seed=9)
    assert open_source(str(root), split="", text_column="sentence").fingerprint(0, 2) != before
