"""Label layouts token by token: plain, timestamped, prompted, no-speech; the per-sample draw; the
collator's prompt masking; segments and the 30 s cutting rule; preprocessing of segments."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

from toolkit.config import ConfigError
from toolkit.data.collator import IGNORE_INDEX, WhisperCollator, pad_labels
from toolkit.data.dataset import ArrowClips, Example
from toolkit.data.segments import Segment, SegmentError, cut_windows, parse_segments
from toolkit.data.targets import Special, Targets, draw
from toolkit.testing import tiny_tokenizer

TEXTS = ["hello there", "a cat", "one two three four"]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return tiny_tokenizer()


def make_targets(tokenizer: Any, texts: list[str] = TEXTS, *, no_speech: list[bool] | None = None,
                 previous: list[int] | None = None, max_tokens: int = 448, **draws: Any) -> Targets:
    special = Special.from_tokenizer(tokenizer, len(tokenizer))
    first = tokenizer(texts, add_special_tokens=False).input_ids
    spaced = tokenizer([" " + t for t in texts], add_special_tokens=False).input_ids
    pieces = [[tokenizer(" " + t, add_special_tokens=False).input_ids] for t in texts]
    n = len(texts)
    return Targets(special, first, spaced, pieces, np.asarray(no_speech or [False] * n),
                   np.asarray(previous or [-1] * n), max_tokens, **draws)


def ids(tokenizer: Any, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def text_ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def test_plain_label_is_the_tokenizer_s_own(tokenizer: Any) -> None:
    targets = make_targets(tokenizer)
    assert targets.plain((0,)) == tokenizer(TEXTS[0]).input_ids
    assert targets.plain((0, 1)) == [*ids(tokenizer, "<|startoftranscript|>", "<|notimestamps|>"),
                                     *text_ids(tokenizer, "hello there a cat"), tokenizer.eos_token_id]
    assert targets.plain_length((0, 1)) == len(targets.plain((0, 1)))


def test_timestamped_label_token_by_token(tokenizer: Any) -> None:
    targets = make_targets(tokenizer)
    label = targets.timestamped((0, 1), [Segment(0.5, 1.24, "hello there"), Segment(1.54, 2.0, "a cat")])
    expected = [
        *ids(tokenizer, "<|startoftranscript|>", "<|0.50|>"), *text_ids(tokenizer, " hello there"),
        *ids(tokenizer, "<|1.24|>", "<|1.54|>"), *text_ids(tokenizer, " a cat"), *ids(tokenizer, "<|2.00|>"),
        tokenizer.eos_token_id,
    ]
    assert label == expected
    assert tokenizer.decode(label, decode_with_timestamps=True) == "<|startoftranscript|><|0.50|> hello there<|1.24|><|1.54|> a cat<|2.00|><|endoftext|>"
    assert targets.timestamped_length((0, 1)) == len(label)
    # Quantised to the 0.02 s grid, and checked against the range of timestamp tokens.
    assert targets.special.timestamp(0.519) == targets.special.timestamp(0.52)
    assert targets.special.timestamp(30.0) == tokenizer.convert_tokens_to_ids("<|30.00|>")
    with pytest.raises(ValueError, match="outside Whisper's 0-30 s timestamp range"):
        targets.special.timestamp(30.02)
    with pytest.raises(ValueError, match="1 segment times for 2 segments"):
        targets.timestamped((0, 1), [Segment(0, 1, "x")])


def test_prompt_is_the_previous_text_capped_at_half_the_context(tokenizer: Any) -> None:
    targets = make_targets(tokenizer, previous=[-1, 0, 1], timestamp_probability=0.0, previous_probability=1.0)
    label, prompt = targets.label((1,), position=7, previous=None, segments=None)
    startofprev = ids(tokenizer, "<|startofprev|>")
    assert label == [*startofprev, *text_ids(tokenizer, " hello there"), *targets.plain((1,))]
    assert prompt == 1 + len(text_ids(tokenizer, " hello there"))
    assert targets.sizes((1,), 7, None) == (len(targets.plain((1,))) - 1, len(label) - 1)
    # No known predecessor: no prompt. A packed window names its own.
    assert targets.label((0,), 7, None, None) == (targets.plain((0,)), 0)
    packed, n = targets.label((2,), 7, (0, 1), None)
    assert packed[:n] == [*startofprev, *text_ids(tokenizer, " hello there a cat")]
    long = make_targets(tokenizer, ["x " * 400, "y"], previous=[-1, 0], previous_probability=1.0)
    label, n = long.label((1,), 0, None, None)
    assert n == 224 and label[n - 3 : n] == text_ids(tokenizer, " x ")[-3:]  # the end of the previous text
    assert len(long.prompt((0,), label_length=440)) == 8  # what the label leaves of the 448 positions
    assert long.prompt((0,), label_length=447) == []


def test_no_speech_clip_gets_whisper_s_no_speech_target(tokenizer: Any) -> None:
    targets = make_targets(tokenizer, ["", "a cat"], no_speech=[True, False], timestamp_probability=1.0)
    expected = ids(tokenizer, "<|startoftranscript|>", "<|nospeech|>", "<|endoftext|>")
    assert targets.plain((0,)) == targets.timestamped((0,), []) == expected
    assert targets.label((0,), 3, None, []) == (expected, 0)
    assert targets.sizes((0,), 3, None) == (2, 2)


def test_draws_are_a_function_of_seed_and_position() -> None:
    first = [draw(1, p, 0.5, 0.2) for p in range(4000)]
    assert first == [draw(1, p, 0.5, 0.2) for p in range(4000)]
    assert first != [draw(2, p, 0.5, 0.2) for p in range(4000)]
    assert abs(np.mean([d.timestamps for d in first]) - 0.5) < 0.03
    assert abs(np.mean([d.previous for d in first]) - 0.2) < 0.03
    assert not any(draw(1, p, 0.0, 0.0).timestamps or draw(1, p, 0.0, 0.0).previous for p in range(100))


def test_a_tokenizer_without_timestamp_tokens_is_refused(tokenizer: Any) -> None:
    with pytest.raises(ConfigError, match="the model has no timestamp tokens .* set data.timestamp_probability=0"):
        Special.from_tokenizer(tokenizer, vocab_size=len(tokenizer) - 10)
    Special.from_tokenizer(tokenizer, vocab_size=len(tokenizer) - 10, timestamps=False)


def test_collator_masks_the_prompt_and_keeps_plain_rows_as_before(tokenizer: Any) -> None:
    targets = make_targets(tokenizer, previous=[-1, 0, 1], previous_probability=1.0)
    prompted, n = targets.label((1,), 0, None, None)
    plain = targets.plain((2,))
    examples = [Example("a", np.zeros(160, np.int16), 1.0, "", prompted, prompt_length=n),
                Example("b", np.zeros(160, np.int16), 1.0, "", plain)]
    sot = tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    collator = WhisperCollator(_FakeExtractor(), sot, "workers", pad_token_id=tokenizer.eos_token_id)
    batch = collator(examples)
    assert batch.decoder_input_ids is not None and batch.labels is not None
    assert batch.decoder_input_ids[0, : len(prompted) - 1].tolist() == prompted[:-1]
    row = batch.labels[0].tolist()
    assert row[:n] == [IGNORE_INDEX] * n  # the prompt and the start token that follows it: context
    assert row[n : len(prompted) - 1] == prompted[n + 1 :]
    # The plain row: what the shift-right path would feed and score.
    plain_labels = pad_labels([plain])[:, 1:]
    width = plain_labels.shape[1]
    assert batch.labels[1, :width].tolist() == plain_labels[0].tolist()
    assert (batch.labels[1, width:] == IGNORE_INDEX).all()
    assert batch.decoder_input_ids[1, : width].tolist() == plain[:-1]
    no_prompt = collator([examples[1]])
    assert no_prompt.decoder_input_ids is None and torch.equal(no_prompt.labels, plain_labels)


class _FakeExtractor:
    dither = 0.0

    def __call__(self, audio: list[np.ndarray], **_: Any) -> Any:
        return type("F", (), {"input_features": torch.zeros(len(audio), 80, 3000)})()


# --- segments and cutting ----------------------------------------------------------------------------


def test_parse_segments_checks_what_it_reads() -> None:
    good = json.dumps([{"start": 0.1, "end": 1.0, "text": " a "}, {"start": 1.2, "end": 2.03, "text": "b"}])
    assert parse_segments(good, 2.0) == [Segment(0.1, 1.0, "a"), Segment(1.2, 2.0, "b")]
    bad = {
        "[1": "not valid JSON", "[]": "not a non-empty list", '[{"start": 0}]': "entry 1 is not an object",
        '[{"start": 0, "end": 1, "text": ""}]': "entry 1 has no text",
        '[{"start": 0, "end": "1", "text": "a"}]': "not a finite number",
        '[{"start": 0, "end": 9, "text": "a"}]': "not inside the audio",
        '[{"start": 1, "end": 2, "text": "a"}, {"start": 0.5, "end": 3, "text": "b"}]': "starts before entry 1 ends",
    }
    for raw, message in bad.items():
        with pytest.raises(SegmentError, match=message):
            parse_segments(raw, 5.0)


def test_cut_windows_ends_each_window_at_the_last_segment_that_fits() -> None:
    segments = [Segment(0.5, 10, "a"), Segment(11, 25, "b"), Segment(26, 40, "c"), Segment(41, 55, "d"),
                Segment(56, 90, "too long"), Segment(130, 135, "after a long pause")]
    windows, dropped = cut_windows(segments)
    assert [(w.start, w.end, w.text) for w in windows] == [(0.0, 25, "a b"), (25, 55, "c d"), (130, 135, "after a long pause")]
    assert windows[1].segments == [Segment(1, 15, "c"), Segment(16, 30, "d")]  # from the window's start
    assert dropped == [Segment(56, 90, "too long")]
    assert all(w.end - w.start <= 30 for w in windows)


def test_preprocessing_cuts_long_recordings_and_keeps_no_speech_clips(tmp_path: Path) -> None:
    from toolkit.data.preprocess import prepare_split
    from toolkit.data.sources import open_source

    root = tmp_path / "af"
    root.mkdir()
    rng = np.random.default_rng(0)
    sf.write(root / "long.flac", (0.1 * rng.standard_normal(16_000 * 70)).astype(np.float32), 16_000)
    sf.write(root / "quiet.flac", np.zeros(16_000 * 3, dtype=np.float32), 16_000)
    sf.write(root / "talk.flac", (0.1 * rng.standard_normal(16_000 * 2)).astype(np.float32), 16_000)
    segments = [{"start": 1 + 10 * i, "end": 9 + 10 * i, "text": f"part {i}"} for i in range(7)]
    rows = [
        {"file_name": "long.flac", "sentence": "whole", "segments": json.dumps(segments), "no_speech": ""},
        {"file_name": "quiet.flac", "sentence": "", "segments": "", "no_speech": "true"},
        {"file_name": "talk.flac", "sentence": "", "segments": "", "no_speech": "true"},
        {"file_name": "talk.flac", "sentence": "words", "segments": "[{\"start\": 3, \"end\": 4, \"text\": \"x\"}]",
         "no_speech": ""},
    ]
    with (root / "metadata.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    prepared = prepare_split(open_source(str(root), split="", text_column="sentence"), "train", tmp_path / "cache")
    table = prepared.dataset
    assert table["id"] == ["long.flac@0.00", "long.flac@29.00", "long.flac@59.00", "quiet.flac", "talk.flac"]
    assert table["text"][:3] == ["part 0 part 1 part 2", "part 3 part 4 part 5", "part 6"]
    assert table["recording"][:3] == ["long.flac"] * 3 and table["recording"][3] == ""
    assert [json.loads(s) for s in table["segments"][:2]] == [
        [[1, 9, "part 0"], [11, 19, "part 1"], [21, 29, "part 2"]], [[2, 10, "part 3"], [12, 20, "part 4"], [22, 30, "part 5"]]
    ]
    assert table["duration"][0] == pytest.approx(29.0)
    assert table["no_speech"] == [False, False, False, True, True] and table["segments"][3] == "[]"
    reasons = {s.id: s.reason for s in prepared.skips}
    assert reasons == {"talk.flac": "segments: entry 1 (3-4 s) is not inside the audio (0-2.00 s)"}


def test_dataset_items_get_drawn_layouts_and_the_recording_s_previous_window(tmp_path: Path, tokenizer: Any) -> None:
    from toolkit.data.dataset import Item, attach_targets, build_dataset
    from toolkit.data.preprocess import prepare_split
    from toolkit.data.sources import open_source

    root = tmp_path / "af"
    root.mkdir()
    rng = np.random.default_rng(1)
    audio = np.zeros(16_000 * 70, dtype=np.float32)
    audio[16_000 : 16_000 * 60] = 0.1 * rng.standard_normal(16_000 * 59)
    sf.write(root / "long.flac", audio, 16_000)
    segments = [{"start": 1 + 10 * i, "end": 9 + 10 * i, "text": f"part {i}"} for i in range(6)]
    (root / "metadata.csv").write_text(f"file_name,sentence,segments\nlong.flac,whole,\"{json.dumps(segments).replace(chr(34), chr(34) * 2)}\"\n")
    prepared = prepare_split(open_source(str(root), split="", text_column="sentence"), "train", tmp_path / "cache")
    dataset, _ = build_dataset(ArrowClips(prepared.dataset), tokenizer)
    targets = attach_targets(dataset, tokenizer, len(tokenizer), seed=0, timestamp_probability=1.0,
                             previous_probability=1.0)
    assert targets.previous.tolist() == [-1, 0]
    label, n = targets.label((1,), 5, None, dataset.clip(1).segments)
    example = dataset[Item(1, 5)]
    assert (example.labels, example.prompt_length) == (label, n)
    assert tokenizer.decode(label, decode_with_timestamps=True) == (
        "<|startofprev|> part 0 part 1 part 2<|startoftranscript|><|2.00|> part 3<|10.00|><|12.00|> part 4<|20.00|>"
        "<|22.00|> part 5<|30.00|><|endoftext|>"
    )
    assert dataset.item_sizes([Item(1, 5)]) == [(len(label) - 1 - n, len(label) - 1)]
    assert dataset[1].labels == dataset.labels[1] and dataset[1].prompt_length == 0  # a plain index: eval's form


def test_worst_positions_cover_timestamps_and_prompts(tokenizer: Any) -> None:
    plain = make_targets(tokenizer)
    longest = max(len(plain.plain((r,))) for r in range(3)) - 1
    assert plain.worst_positions() == longest
    stamped = make_targets(tokenizer, timestamp_probability=0.5)
    assert stamped.worst_positions() == max(stamped.timestamped_length((r,)) for r in range(3)) - 1 > longest
    # Prompts count only where a sample can have a predecessor.
    assert make_targets(tokenizer, previous_probability=0.2).worst_positions() == longest
    assert make_targets(tokenizer, previous=[-1, 0, 1], previous_probability=0.2).worst_positions() == longest + 224
    assert make_targets(tokenizer, previous_probability=0.2).worst_positions(packed_label_tokens=300) == 447


@pytest.mark.skipif(not Path(__file__).resolve().parents[2].joinpath("..", "shared", "models", "whisper-tiny.en").is_dir(),
                    reason="needs ../shared/models/whisper-tiny.en (present on the team's machines only)")
def test_the_real_english_tokenizer_s_layout() -> None:
    """openai's tiny.en files list no ``<|0.00|>`` token and call no-speech ``<|nocaptions|>``."""
    from transformers import WhisperTokenizer

    from tests.conftest import SHARED_MODEL

    real = WhisperTokenizer.from_pretrained(SHARED_MODEL)
    special = Special.from_tokenizer(real, 51864)
    assert (special.notimestamps, special.timestamp_begin, special.nospeech) == (50362, 50363, 50361)
    assert special.timestamp(30.0) == 51863 and special.prefix == (50257, 50362)


def test_a_label_too_long_for_timestamps_stays_plain(tokenizer: Any) -> None:
    targets = make_targets(tokenizer, ["x " * 40], timestamp_probability=1.0, max_tokens=84)
    assert targets.timestamped_length((0,)) > 84 >= targets.plain_length((0,))
    label, _ = targets.label((0,), 0, None, [Segment(0, 1, "x")])
    assert label == targets.plain((0,)) and targets.sizes((0,), 0, None)[0] == len(label) - 1
