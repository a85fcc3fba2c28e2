"""``toolkit.synth``: an espeak-ng corpus in audiofolder layout, deterministic and with disjoint splits."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from toolkit import synth
from toolkit.data.sources import open_source

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng is not on PATH (apt-get install espeak-ng)"
)


def read_metadata(split_dir: Path) -> list[dict[str, str]]:
    with (split_dir / "metadata.csv").open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["file_name", "sentence"]
        return list(reader)


@pytest.fixture(scope="module")
def espeak_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "corpus"
    summary = synth.synthesize_corpus(out, train=6, dev=3, seed=7, jobs=2)
    return out, summary


@needs_espeak
def test_corpus_layout_and_audio(espeak_corpus: tuple[Path, dict]) -> None:
    out, summary = espeak_corpus
    assert summary["train"] == 6 and summary["dev"] == 3 and summary["hours"] > 0
    for split, count in (("train", 6), ("dev", 3)):
        rows = read_metadata(out / split)
        assert len(rows) == count
        for row in rows:
            info = sf.info(out / split / row["file_name"])
            assert (info.samplerate, info.channels, info.format) == (16_000, 1, "FLAC")
            assert 0.5 < info.duration < 15
            audio, _ = sf.read(out / split / row["file_name"])
            assert np.sqrt(np.mean(audio**2)) > 0.01, "silent clip"
            words = row["sentence"].split()
            assert 5 <= len(words) <= 15 and row["sentence"][0].isupper() and row["sentence"][-1] in ".?!"
    # The toolkit reads it as a local audiofolder with its split sub-directories.
    assert len(open_source(str(out), split="train+dev", text_column="sentence")) == 9


@needs_espeak
def test_splits_do_not_share_sentences_and_match_the_generator(espeak_corpus: tuple[Path, dict]) -> None:
    out, _ = espeak_corpus
    train = [row["sentence"] for row in read_metadata(out / "train")]
    dev = [row["sentence"] for row in read_metadata(out / "dev")]
    assert not {synth.normalise(s) for s in train} & {synth.normalise(s) for s in dev}
    assert train == synth.generate_sentences(6, seed=7, split="train")
    assert dev == synth.generate_sentences(3, seed=7, split="dev")


@needs_espeak
def test_existing_corpus_needs_overwrite(espeak_corpus: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = espeak_corpus
    with pytest.raises(synth.SynthError, match="--overwrite"):
        synth.synthesize_corpus(out, train=1, dev=1)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    synth.synthesize_corpus(copy, train=2, dev=1, seed=7, jobs=1, overwrite=True)
    assert len(read_metadata(copy / "train")) == 2 and len(list((copy / "train").glob("*.flac"))) == 2


def test_sentences_are_deterministic_and_disjoint() -> None:
    train = synth.generate_sentences(500, seed=3)
    assert train == synth.generate_sentences(500, seed=3)
    assert train[:50] == synth.generate_sentences(50, seed=3)  # a larger corpus extends a smaller one
    assert train != synth.generate_sentences(500, seed=4)
    dev = synth.generate_sentences(200, seed=3, split="dev")
    assert len({synth.normalise(s) for s in train}) == 500
    assert not {synth.normalise(s) for s in train} & {synth.normalise(s) for s in dev}
    # Splits are fixed by the sentence itself, so other seeds' dev sets never meet this seed's train set.
    assert not {synth.normalise(s) for s in train} & {
        synth.normalise(s) for s in synth.generate_sentences(200, seed=4, split="dev")
    }


def test_voice_plan_is_seeded_and_varied() -> None:
    plan = synth.plan_split("train", 40, seed=1)
    assert plan == synth.plan_split("train", 40, seed=1)
    assert len({u.voice for u in plan}) > 5
    assert all(130 <= u.speed <= 190 and 30 <= u.pitch <= 70 for u in plan)


def test_missing_espeak_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(synth.SynthError, match="apt-get install espeak-ng"):
        synth.synthesize_corpus(tmp_path / "out", train=1, dev=1)
