"""Cached, sharded preprocessing: skips are counted with reasons, chunks are reused, ranks split the work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import write_audiofolder, write_clip
from toolkit.config import DataConfig
from toolkit.data import pcm, preprocess
from toolkit.data.audio import SAMPLING_RATE, decode_audio
from toolkit.data.dataset import ArrowClips, build_dataset
from toolkit.data.pipeline import load_split
from toolkit.data.preprocess import prepare_split
from toolkit.data.sources import DataError, open_source


def corpus_with_bad_samples(root: Path) -> Path:
    write_audiofolder(root, 6)
    (root / "corrupt.flac").write_bytes(b"not audio at all" * 20)
    (root / "empty.wav").write_bytes(b"")
    write_clip(root / "long.flac", 31.0, sr=8_000)
    write_clip(root / "notext.flac", 1.0)
    with (root / "metadata.csv").open("a") as handle:
        handle.write("corrupt.flac,corrupt file\nempty.wav,empty file\nmissing.flac,no such file\n")
        handle.write('long.flac,a clip over thirty seconds\nnotext.flac,"   "\n')
    return root


def test_bad_samples_are_skipped_with_reasons(tmp_path: Path) -> None:
    root = corpus_with_bad_samples(tmp_path / "af")
    source = open_source(str(root), split="", text_column="sentence")
    prepared = prepare_split(source, "train", tmp_path / "cache")
    assert len(prepared.dataset) == 6
    reasons = {s.id: (s.kind, s.reason) for s in prepared.skips}
    assert reasons["corrupt.flac"][0] == "error" and "corrupt" in reasons["corrupt.flac"][1]
    assert reasons["empty.wav"][0] == "error"
    assert reasons["missing.flac"] == ("error", "missing file")
    assert reasons["long.flac"] == ("filtered", "longer than 30 s (31.0 s) and no segments to cut it by")
    assert reasons["notext.flac"] == ("error", "empty transcript")
    row = prepared.dataset.with_format("numpy")[0]
    assert abs(row["duration"] - 1.0) < 1e-3
    # The cache holds 16-bit FLAC and a scale: decoded, it is the source audio within half a step.
    assert isinstance(row["flac"], bytes) and row["flac"][:4] == b"fLaC" and float(row["scale"]) == 1.0
    samples = pcm.decode(row["flac"])
    assert samples.dtype == np.int16 and len(samples) == round(row["duration"] * SAMPLING_RATE)
    source_audio = decode_audio(str(root / "clip-000.flac"))
    assert np.abs(pcm.to_float(samples, float(row["scale"])) - source_audio).max() <= 0.5 / 32767 + 1e-6


def test_cache_is_reused_and_keyed_by_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preprocess, "CHUNK_SIZE", 4)
    root = write_audiofolder(tmp_path / "af", 10)
    cache = tmp_path / "cache"
    first = prepare_split(open_source(str(root), split="", text_column="sentence"), "train", cache)
    assert (first.chunks_built, first.chunks_reused) == (3, 0)
    again = prepare_split(open_source(str(root), split="", text_column="sentence"), "train", cache)
    assert (again.chunks_built, again.chunks_reused) == (0, 3)
    assert again.dataset["text"] == first.dataset["text"]
    # Editing one transcript rebuilds only the chunk that holds it.
    meta = (root / "metadata.csv").read_text().replace("Nothing ventured", "Something ventured")
    (root / "metadata.csv").write_text(meta)
    edited = prepare_split(open_source(str(root), split="", text_column="sentence"), "train", cache)
    assert (edited.chunks_built, edited.chunks_reused) == (1, 2)
    assert "Something ventured, nothing gained." in edited.dataset["text"]


def test_ranks_split_chunks_and_see_the_same_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preprocess, "CHUNK_SIZE", 3)
    root = write_audiofolder(tmp_path / "af", 10)
    source = open_source(str(root), split="", text_column="sentence")
    built: list[int] = []
    real_build = preprocess._build_chunk_job

    def counting(job):  # noqa: ANN001, ANN202
        built.append(job[1])
        return real_build(job)

    monkeypatch.setattr(preprocess, "_build_chunk_job", counting)
    cache = tmp_path / "cache"
    # Rank 1 runs first here; rank 0 then builds only its own share and both load everything.
    with pytest.raises(DataError, match="missing after preprocessing"):
        prepare_split(source, "train", cache, rank=1, world_size=2)
    assert built == [3, 9]
    rank0 = prepare_split(source, "train", cache, rank=0, world_size=2)
    assert built == [3, 9, 0, 6]
    rank1 = prepare_split(source, "train", cache, rank=1, world_size=2)
    assert rank0.dataset["id"] == rank1.dataset["id"] and len(rank0.dataset) == 10


def test_parallel_workers_give_the_same_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preprocess, "CHUNK_SIZE", 3)
    root = write_audiofolder(tmp_path / "af", 7)
    serial = prepare_split(open_source(str(root), split="", text_column="sentence"), "t", tmp_path / "c1")
    parallel = prepare_split(open_source(str(root), split="", text_column="sentence"), "t", tmp_path / "c2", num_proc=2)
    assert serial.dataset["id"] == parallel.dataset["id"]
    assert serial.dataset["flac"] == parallel.dataset["flac"] and serial.dataset["scale"] == parallel.dataset["scale"]


def test_cache_keeps_loud_audio_unclipped_and_is_compact(tmp_path: Path) -> None:
    """A float file peaking at 4 is stored divided by 4 (scale 4), not clipped; FLAC beats float32 4x+."""
    root = folder_with_loud_clip(tmp_path / "af", 2, "hot.wav", 4.0, "a clip that overshoots full scale")
    prepared = prepare_split(open_source(str(root), split="", text_column="sentence"), "train", tmp_path / "cache")
    assert prepared.dataset.features["flac"].dtype == "binary" and "audio" not in prepared.dataset.column_names
    rows = {row["id"]: row for row in prepared.dataset}
    hot = rows["hot.wav"]
    assert hot["scale"] == pytest.approx(4.0)
    source_audio = decode_audio(str(root / "hot.wav"))
    back = pcm.to_float(pcm.decode(hot["flac"]), hot["scale"])
    assert float(back[50]) == pytest.approx(4.0, abs=1e-6)  # the loud sample, kept
    assert np.abs(back - source_audio).max() <= 0.5 * hot["scale"] / 32767 + 1e-6
    for name in ("clip-000.flac", "clip-001.flac"):
        row = rows[name]
        assert row["scale"] == 1.0
        assert len(row["flac"]) < 2 * len(pcm.decode(row["flac"]))  # under raw 16-bit, let alone float32
    assert preprocess.FORMAT_VERSION >= 4


def test_label_length_filter(tmp_path: Path, tiny_model: Path) -> None:
    from transformers import WhisperTokenizer

    tokenizer = WhisperTokenizer.from_pretrained(tiny_model)
    root = write_audiofolder(tmp_path / "af", 4)
    prepared = prepare_split(open_source(str(root), split="", text_column="sentence"), "train", tmp_path / "c")
    dataset, skips = build_dataset(ArrowClips(prepared.dataset), tokenizer, max_label_tokens=38)
    # Byte-level: 1 token per character + 3 special tokens: 47 and 40 tokens are over 38; 31 and 36 fit.
    assert [s.id for s in skips] == ["clip-000.flac", "clip-002.flac"]
    assert all(s.kind == "filtered" and "label longer than 38 tokens" in s.reason for s in skips)
    assert len(dataset) == 2
    assert dataset[0].labels[0] == tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    assert list(dataset.label_lengths()) == [len(dataset[0].labels) - 1, len(dataset[1].labels) - 1]


def test_fail_on_skip_and_all_bad(tmp_path: Path) -> None:
    root = corpus_with_bad_samples(tmp_path / "af")
    cfg = DataConfig(train=str(root), fail_on_skip=True, cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"4 bad sample\(s\) in data.train and data.fail_on_skip is set"):
        load_split("train", cfg, None)
    ok = load_split("train", DataConfig(train=str(root), cache_dir=str(tmp_path / "c")), None)
    assert len(ok.dataset) == 6 and len(ok.skips) == 5
    assert "6 of 11 samples kept" in ok.summary()

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metadata.csv").write_text("file_name,sentence\nnope.flac,hello\n")
    with pytest.raises(DataError, match="no usable samples"):
        load_split("eval", DataConfig(eval=str(bad), cache_dir=str(tmp_path / "c")), None)


def test_absurd_amplitude_is_a_counted_skip(tmp_path: Path) -> None:
    root = folder_with_loud_clip(tmp_path / "af", 3, "loud.wav", 1e30, "a clip with one absurd sample")
    prepared = prepare_split(open_source(str(root), split="", text_column="sentence"), "train", tmp_path / "cache")
    assert len(prepared.dataset) == 3
    assert [(s.id, s.kind, s.reason) for s in prepared.skips] == [("loud.wav", "error", "absurd amplitude (peak 1e+30)")]


def test_unusable_cache_dir_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    source = open_source(str(write_audiofolder(tmp_path / "af", 1)), split="", text_column="sentence")
    with pytest.raises(DataError, match=r"cannot create the preprocessing cache .*a-file/chunks \(Not a directory\); set"):
        prepare_split(source, "train", tmp_path / "a-file")


def test_skip_records_are_json(tmp_path: Path) -> None:
    from toolkit.output import write_skipped

    root = corpus_with_bad_samples(tmp_path / "af")
    split = load_split("train", DataConfig(train=str(root), cache_dir=str(tmp_path / "c")), None)
    assert write_skipped(tmp_path / "skipped.jsonl", split.skips) == 5
    rows = [json.loads(line) for line in (tmp_path / "skipped.jsonl").read_text().splitlines()]
    assert {tuple(sorted(r)) for r in rows} == {("id", "kind", "reason", "split")}


def test_every_cached_clip_loads_even_one_that_resamples_to_nothing(tmp_path: Path) -> None:
    """One sample at 44.1 kHz passes the empty check and resamples to 0 samples at 16 kHz. Either it is
    a counted skip, or the dataset yields it (as empty audio): a cached row that cannot be read is neither."""
    root = write_audiofolder(tmp_path / "af", 2)
    sf.write(root / "tick.wav", np.array([0.1], dtype=np.float32), 44_100)
    with (root / "metadata.csv").open("a") as handle:
        handle.write("tick.wav,a one-sample clip\n")
    prepared = prepare_split(open_source(str(root), split="", text_column="sentence"), "train", tmp_path / "cache")
    dataset, _ = build_dataset(ArrowClips(prepared.dataset), None)
    assert [(s.id, s.reason) for s in prepared.skips] == [("tick.wav", "empty audio (0 samples once resampled from 44100 Hz)")]
    for index in range(len(dataset)):
        assert dataset[index].pcm.dtype == np.int16


def folder_with_loud_clip(root: Path, clips: int, name: str, peak: float, text: str) -> Path:
    """An audiofolder of ``clips`` ordinary clips plus one float WAV ``name`` that peaks at ``peak``."""
    from tests.data.test_audio import write_loud_clip

    write_audiofolder(root, clips)
    write_loud_clip(root / name, peak)
    with (root / "metadata.csv").open("a") as handle:
        handle.write(f"{name},{text}\n")
    return root
