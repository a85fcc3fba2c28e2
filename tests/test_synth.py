"""``toolkit.synth``: an espeak-ng corpus in audiofolder layout, deterministic and with disjoint splits."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from toolkit import synth, synth_long
from toolkit.cli import build_parser
from toolkit.data.sources import open_source

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng is not on PATH (apt-get install espeak-ng)"
)


def read_metadata(split_dir: Path, columns: tuple[str, ...] = ("file_name", "sentence")) -> list[dict[str, str]]:
    with (split_dir / "metadata.csv").open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == list(columns)
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
    with pytest.raises(synth.SynthError, match="apt-get install espeak-ng"):
        synth_long.synthesize_sets(tmp_path / "out", train=0, dev=0, long_form=1, no_speech=1)
    assert not (tmp_path / "out").exists()


LONG_COLUMNS = ("file_name", "sentence", "segments")
NO_SPEECH_COLUMNS = ("file_name", "sentence", "no_speech")


def rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(audio.astype(np.float64) ** 2))) if audio.size else 0.0


def all_files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def long_form_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 12-18 s instead of minutes: the same code path, a few espeak calls.
    out = tmp_path_factory.mktemp("synth-long") / "sets"
    summary = synth_long.synthesize_sets(out, train=0, dev=0, long_form=1, long_minutes=(0.2, 0.3), seed=5, jobs=2)
    assert summary["long_form"] == 1 and summary["long_form_hours"] > 0 and "train" not in summary
    return out


@needs_espeak
def test_long_form_segments_match_the_audio(long_form_set: Path) -> None:
    assert sorted(p.name for p in long_form_set.iterdir()) == ["longform"]  # no train/dev, no leftovers
    (row,) = read_metadata(long_form_set / "longform", LONG_COLUMNS)
    audio, rate = sf.read(long_form_set / "longform" / row["file_name"])
    duration = len(audio) / rate
    assert rate == 16_000 and audio.ndim == 1
    # It stops after the sentence that reaches the drawn length: one sentence and a pause at most past it.
    assert 12 <= duration <= 18 + 2 + 15
    segments = json.loads(row["segments"])
    assert len(segments) >= 2
    assert " ".join(seg["text"] for seg in segments) == row["sentence"]
    assert all(synth.split_of(seg["text"]) == "dev" for seg in segments)
    previous_end = 0.0
    for seg in segments:
        assert set(seg) == {"start", "end", "text"}
        assert round(seg["start"], 2) == seg["start"] and round(seg["end"], 2) == seg["end"]
        assert previous_end <= seg["start"] < seg["end"] <= duration
        if previous_end:
            # The pause between sentences is digital silence; a sentence is speech.
            pause = audio[round(previous_end * rate) : round(seg["start"] * rate)]
            assert seg["start"] - previous_end >= 0.4 - 0.02
            assert rms(pause) < 1e-3
        speech = audio[round(seg["start"] * rate) : round(seg["end"] * rate)]
        assert rms(speech) > 0.01
        previous_end = seg["end"]


@needs_espeak
def test_long_form_is_deterministic_for_any_jobs(long_form_set: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    synth_long.synthesize_sets(again, train=0, dev=0, long_form=1, long_minutes=(0.2, 0.3), seed=5, jobs=1)
    assert all_files(again) == all_files(long_form_set)
    assert synth_long.plan_recording(0, seed=5) == synth_long.plan_recording(0, seed=5)
    assert synth_long.plan_recording(0, seed=5) != synth_long.plan_recording(0, seed=6)


def test_no_speech_clips(tmp_path: Path) -> None:
    out = tmp_path / "sets"
    summary = synth_long.synthesize_sets(out, train=0, dev=0, no_speech=4, seed=2, jobs=2)
    assert summary["no_speech"] == 4 and "long_form" not in summary
    rows = read_metadata(out / "nospeech", NO_SPEECH_COLUMNS)
    assert [row["file_name"] for row in rows] == [f"nospeech-{i:06d}.flac" for i in range(4)]
    for row in rows:
        assert row["sentence"] == "" and row["no_speech"] == "true"
        info = sf.info(out / "nospeech" / row["file_name"])
        assert (info.samplerate, info.channels, info.format) == (16_000, 1, "FLAC")
        assert 2 <= info.duration <= 30
        audio, _ = sf.read(out / "nospeech" / row["file_name"])
        assert rms(audio) < 0.03, "no-speech clips are low-level"
    again = tmp_path / "again"
    synth_long.synthesize_sets(again, train=0, dev=0, no_speech=4, seed=2, jobs=1)
    assert all_files(again) == all_files(out)


def test_no_speech_plan_covers_every_kind_and_hum_is_at_mains_frequency() -> None:
    plans = [synth_long.plan_no_speech(index, seed=0) for index in range(60)]
    assert {plan.kind for plan in plans} == set(synth_long.NO_SPEECH_KINDS)
    assert all(2 * 16_000 <= plan.samples <= 30 * 16_000 for plan in plans)
    hum = synth_long.NoSpeechClip(0, "hum", 16_000, "none", -60.0, 60, -40.0)
    audio = synth_long.render_no_speech(hum, seed=0)
    assert abs(20 * np.log10(rms(audio)) + 40) < 0.1
    assert int(np.argmax(np.abs(np.fft.rfft(audio)))) == 60  # 1 Hz bins over one second
    silence = synth_long.NoSpeechClip(1, "silence", 16_000, "none", -60.0, 0, -40.0)
    assert not synth_long.render_no_speech(silence, seed=0).any()


def test_sets_need_overwrite_and_leave_nothing_behind(tmp_path: Path) -> None:
    out = tmp_path / "sets"
    synth_long.synthesize_sets(out, train=0, dev=0, no_speech=2, seed=1, jobs=1)
    with pytest.raises(synth.SynthError, match="--overwrite"):
        synth_long.synthesize_sets(out, train=0, dev=0, no_speech=1, seed=1, jobs=1)
    synth_long.synthesize_sets(out, train=0, dev=0, no_speech=1, seed=1, jobs=1, overwrite=True)
    assert len(read_metadata(out / "nospeech", NO_SPEECH_COLUMNS)) == 1
    assert sorted(p.name for p in (out / "nospeech").iterdir()) == ["metadata.csv", "nospeech-000000.flac"]
    assert [p.name for p in out.iterdir()] == ["nospeech"]  # the staging directory was renamed away


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"long_form": 1, "long_minutes": (3.0, 1.0)}, "--long-minutes"),
        ({"long_form": 1, "long_minutes": (0.0, 1.0)}, "--long-minutes"),
        ({"no_speech": -1}, "must not be negative"),
        ({"train": 0, "dev": 3, "no_speech": 1}, "both 0"),
        ({"train": 0, "dev": 0}, "at least 1"),
        ({"no_speech": 1, "jobs": 0}, "--jobs"),
    ],
)
def test_bad_set_arguments_are_one_line_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"train": 0, "dev": 0, **kwargs}
    with pytest.raises(synth.SynthError, match=message):
        synth_long.synthesize_sets(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


def test_cli_set_flags() -> None:
    # Parser only: main() imports the training stack, seconds that this file does not need to spend.
    args = build_parser().parse_args(["synth", "--out", "o", "--train", "0", "--dev", "0", "--long-form", "3"])
    assert (args.long_form, args.long_minutes, args.no_speech) == (3, [2.0, 5.0], 0)
    args = build_parser().parse_args(["synth", "--out", "o", "--no-speech", "2", "--long-minutes", "0.2", "0.3"])
    assert (args.long_form, args.long_minutes, args.no_speech, args.train) == (0, [0.2, 0.3], 2, 400)


@needs_espeak
def test_french_corpus_has_french_transcripts_and_is_deterministic(tmp_path: Path) -> None:
    out, again = tmp_path / "fr", tmp_path / "fr-again"
    summary = synth.synthesize_corpus(out, train=3, dev=2, seed=4, jobs=2, language="fr")
    assert summary["language"] == "fr" and summary["hours"] > 0
    for split, count in (("train", 3), ("dev", 2)):
        rows = read_metadata(out / split)
        assert [row["sentence"] for row in rows] == synth.generate_sentences(count, seed=4, split=split, language="fr")
        for row in rows:
            audio, rate = sf.read(out / split / row["file_name"])
            assert rate == 16_000 and audio.ndim == 1 and 0.5 < len(audio) / rate < 15
            assert rms(audio) > 0.01, "silent clip"
    synth.synthesize_corpus(again, train=3, dev=2, seed=4, jobs=1, language="fr")
    assert all_files(again) == all_files(out)  # metadata and audio, whatever the number of jobs


def test_french_sentences_are_french_and_split_like_english() -> None:
    train = synth.generate_sentences(300, seed=1, language="fr")
    dev = synth.generate_sentences(100, seed=1, split="dev", language="fr")
    assert train == synth.generate_sentences(300, seed=1, language="fr")
    assert train[:20] == synth.generate_sentences(20, seed=1, language="fr")
    assert not {synth.normalise(s) for s in train} & {synth.normalise(s) for s in dev}
    text = " ".join(train)
    assert not text.isascii() and {"é", "è", "à"} <= set(text)  # accents reach the tokenizer
    for sentence in train:
        assert sentence[0].isupper() and sentence[-1] in ".?!"
        assert 5 <= len(synth.normalise(sentence).split()) <= 15
    # Elision and contraction: no "le élève", "que Inès", "à le".
    assert not re.search(r"\b(le|la|de|que|ma|sa|ce) [aeiouéèêàâîôûh]|\bà le |\bde le ", text, re.IGNORECASE)
    assert synth.normalise("L'élève a bu un café à côté de l'école !") == "l'élève a bu un café à côté de l'école"
    plan = synth.plan_split("train", 40, seed=1, language="fr")
    assert {u.voice.split("+")[0] for u in plan} <= {"fr", "fr-be", "fr-ch"} and len({u.voice for u in plan}) > 5
    # Long-form recordings follow the language: French voices reading French dev-side sentences.
    recording = synth_long.plan_recording(0, seed=1, language="fr")
    assert recording.language == "fr" and recording.voice.split("+")[0] in {"fr", "fr-be", "fr-ch"}
    stream = synth_long.dev_sentences(1, 0, "fr")
    first = [next(stream) for _ in range(3)]
    assert all(synth.split_of(s) == "dev" for s in first) and not "".join(first).isascii()


def test_unknown_language_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(synth.SynthError, match="--language must be one of en, fr; got 'xx'"):
        synth.synthesize_corpus(tmp_path / "out", train=1, dev=1, language="xx")
    assert not (tmp_path / "out").exists()
    args = build_parser().parse_args(["synth", "--out", "o", "--language", "fr"])
    assert args.language == "fr" and build_parser().parse_args(["synth", "--out", "o"]).language == "en"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["synth", "--out", "o", "--language", "de"])
