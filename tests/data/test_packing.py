"""Utterance packing: the greedy rule, labels checked token by token, and the windows' audio and spans."""

from __future__ import annotations

import csv
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import SHARED_MODEL, write_clip
from toolkit.data import pcm as pcm_codec
from toolkit.data.audio import SAMPLING_RATE
from toolkit.data.dataset import ArrowClips, SpeechDataset, build_dataset
from toolkit.data.packing import GAP_SECONDS, WINDOW_SECONDS, Packer, pack
from toolkit.data.preprocess import prepare_split
from toolkit.data.sources import open_source
from toolkit.testing import tiny_tokenizer

needs_shared_model = pytest.mark.skipif(
    not SHARED_MODEL.is_dir(), reason="needs ../shared/models/whisper-tiny.en (present on the team's machines only)"
)

GAP_SAMPLES = round(GAP_SECONDS * SAMPLING_RATE)

CLIPS = [  # (seconds, transcript); clip 4 is a float file peaking at 3 (stored with scale 3)
    (3.1, "The quick brown fox jumps over the lazy dog."),
    (7.4, "A stitch in time saves nine."),
    (2.0, "Whisper models turn speech into text."),
    (9.9, "Every rank counts its own errors."),
    (5.5, "Colour and color are spelled two ways."),
    (4.2, "It costs twenty dollars, Mr. Smith."),
    (8.8, "Seven silver swans swam silently."),
    (6.1, "Nothing ventured, nothing gained."),
    (2.7, "Don't count your chickens before they hatch."),
    (3.3, "She said: \"it's 3:45, not 4.\""),
    (9.0, "Rome wasn't built in a day."),
    (4.0, "Actions speak louder than words!"),
    (5.0, "Where there's smoke, there's fire?"),
    (7.7, "Better late than never."),
]
LOUD = 4
LOUD_PEAK = 3.0


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("packing-corpus")
    rows = []
    for i, (seconds, text) in enumerate(CLIPS):
        name = f"clip-{i:02d}.wav" if i == LOUD else f"clip-{i:02d}.flac"
        write_clip(root / name, seconds, seed=i)
        if i == LOUD:
            samples, sr = sf.read(root / name, dtype="float32")
            sf.write(root / name, samples * (LOUD_PEAK / np.abs(samples).max()), sr, subtype="FLOAT")
        rows.append({"file_name": name, "sentence": text})
    with (root / "metadata.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file_name", "sentence"])
        writer.writeheader()
        writer.writerows(rows)
    source = open_source(str(root), split="", text_column="sentence")
    return prepare_split(source, "train", tmp_path_factory.mktemp("packing-cache"))


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def real_tokenizer() -> Any:
    if not SHARED_MODEL.is_dir():
        pytest.skip("needs ../shared/models/whisper-tiny.en (present on the team's machines only)")
    from transformers import WhisperTokenizer

    return WhisperTokenizer.from_pretrained(SHARED_MODEL)


def packed_dataset(prepared: Any, tokenizer: Any, max_label_tokens: int = 448) -> SpeechDataset:
    dataset, skips = build_dataset(ArrowClips(prepared.dataset), tokenizer, max_label_tokens=max_label_tokens)
    assert skips == [] and len(dataset) == len(CLIPS)
    dataset.packer = Packer.build(dataset, tokenizer, max_label_tokens)
    return dataset


# --- pack(): the greedy rule -------------------------------------------------------------------------


def check_windows(windows: list[tuple[int, ...]], order: np.ndarray, durations: np.ndarray, tokens: np.ndarray,
                  max_seconds: float, max_tokens: int, gap: float) -> None:
    assert [row for window in windows for row in window] == order.tolist()  # in order, each clip once
    assert all(len(window) > 0 for window in windows)
    for i, window in enumerate(windows):
        seconds = float(durations[list(window)].sum()) + gap * (len(window) - 1)
        used = int(tokens[list(window)].sum())
        if len(window) > 1:
            assert seconds <= max_seconds + 1e-9 and used <= max_tokens, (window, seconds, used)
        if i + 1 < len(windows):  # greedy: the next window's first clip did not fit
            nxt = windows[i + 1][0]
            assert seconds + gap + float(durations[nxt]) > max_seconds or used + int(tokens[nxt]) > max_tokens


@pytest.mark.parametrize("seed", range(5))
def test_pack_respects_both_budgets_and_keeps_order(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 200
    durations = rng.uniform(0.3, 14.0, n).astype(np.float32)
    tokens = rng.integers(1, 80, n)
    order = rng.permutation(n)
    windows = pack(order, durations, tokens, WINDOW_SECONDS, 120, GAP_SECONDS)
    check_windows(windows, order, durations, tokens, WINDOW_SECONDS, 120, GAP_SECONDS)
    assert len(windows) < n / 2  # it does pack
    # Both budgets bind somewhere: some windows are closed by seconds, others by tokens.
    closed_by_seconds = [
        float(durations[list(w)].sum()) + GAP_SECONDS * len(w) + float(durations[nxt[0]]) > WINDOW_SECONDS
        for w, nxt in zip(windows, windows[1:], strict=False)
    ]
    assert any(closed_by_seconds) and not all(closed_by_seconds)


def test_pack_gap_counts_and_exact_fit() -> None:
    # Binary-exact numbers: 10 + 0.25 + 9.75 + 0.25 + 9.75 is exactly 30 and fits; 1/8 s more does not.
    order = np.arange(3)
    tokens = np.ones(3, dtype=np.int64)
    assert pack(order, np.array([10.0, 9.75, 9.75]), tokens, 30.0, 100, 0.25) == [(0, 1, 2)]
    assert pack(order, np.array([10.0, 9.75, 9.875]), tokens, 30.0, 100, 0.25) == [(0, 1), (2,)]
    # Without the gaps these would fit: 29.9 s of audio, 30.5 s with two 0.3 s gaps.
    assert pack(order, np.array([10.0, 10.0, 9.9]), tokens, 30.0, 100, 0.3) == [(0, 1), (2,)]
    assert pack(order, np.array([10.0, 10.0, 9.9]), tokens, 30.0, 100, 0.0) == [(0, 1, 2)]
    # Tokens: exactly the budget fits, one more does not.
    assert pack(order, np.ones(3), np.array([4, 3, 3]), 30.0, 10, 0.3) == [(0, 1, 2)]
    assert pack(order, np.ones(3), np.array([4, 3, 4]), 30.0, 10, 0.3) == [(0, 1), (2,)]
    # The order given is the order packed.
    assert pack(np.array([2, 0, 1]), np.ones(3), np.ones(3, dtype=np.int64), 30.0, 10, 0.3) == [(2, 0, 1)]


def test_a_single_over_budget_clip_gets_its_own_window() -> None:
    order = np.arange(4)
    assert pack(order, np.array([5.0, 40.0, 5.0, 5.0]), np.ones(4), 30.0, 100, 0.3) == [(0,), (1,), (2, 3)]
    assert pack(order, np.ones(4), np.array([5, 500, 5, 5]), 30.0, 100, 0.3) == [(0,), (1,), (2, 3)]
    assert pack(np.array([1]), np.array([0.0, 31.0]), np.array([0, 1]), 30.0, 100, 0.3) == [(1,)]
    assert pack(np.array([], dtype=np.int64), np.zeros(0), np.zeros(0), 30.0, 100, 0.3) == []


# --- labels, token by token ---------------------------------------------------------------------------


def expected_label(tokenizer: Any, texts: list[str]) -> list[int]:
    text = tokenizer(" ".join(texts), add_special_tokens=False).input_ids
    return [*tokenizer.prefix_tokens, *text, tokenizer.eos_token_id]


def check_labels(dataset: SpeechDataset, tokenizer: Any, unit: tuple[int, ...]) -> None:
    packer = dataset.packer
    texts = [CLIPS[row][1] for row in unit]
    labels = packer.window_labels(unit)
    assert labels == expected_label(tokenizer, texts), unit
    prompt = tokenizer.decode(tokenizer.prefix_tokens, skip_special_tokens=False)
    assert tokenizer.decode(labels, skip_special_tokens=False) == prompt + " ".join(texts) + "<|endoftext|>"
    assert packer.window_tokens(unit) == len(labels) - 1
    if len(unit) == 1:  # one clip packs to its own single-clip label
        assert labels == dataset.labels[unit[0]]


UNITS = [(0, 1, 2), (3,), (9, 8), (12, 5, 10, 4), (11, 13, 6, 7)]


def test_packer_parts(prepared: Any, tokenizer: Any) -> None:
    dataset = packed_dataset(prepared, tokenizer)
    targets = dataset.packer.targets
    assert list(targets.special.prefix) == list(tokenizer.prefix_tokens) == tokenizer("x").input_ids[:2]
    assert targets.special.eot == tokenizer.eos_token_id
    assert targets.text_budget(448) == 448 - len(targets.special.prefix) - 1
    for row, (_, text) in enumerate(CLIPS):
        assert targets.first[row] == tokenizer(text, add_special_tokens=False).input_ids
        assert targets.spaced[row] == tokenizer(" " + text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("unit", UNITS)
def test_window_labels_tiny_tokenizer(prepared: Any, tokenizer: Any, unit: tuple[int, ...]) -> None:
    check_labels(packed_dataset(prepared, tokenizer), tokenizer, unit)


@needs_shared_model
def test_window_labels_real_tokenizer(prepared: Any, real_tokenizer: Any) -> None:
    """BPE merges across the separating space: the pieces must still equal the whole text tokenised."""
    dataset = packed_dataset(prepared, real_tokenizer)
    for unit in UNITS:
        check_labels(dataset, real_tokenizer, unit)
    order = np.random.default_rng(0).permutation(len(dataset))
    for unit in dataset.packer.layout(order, dataset.durations):
        check_labels(dataset, real_tokenizer, unit)


def test_packing_needs_labels(prepared: Any, tokenizer: Any) -> None:
    dataset, _ = build_dataset(ArrowClips(prepared.dataset), tokenizer, keep_labels=False)
    with pytest.raises(ValueError, match="packing needs a dataset with labels"):
        Packer.build(dataset, tokenizer, 448)


# --- layouts ---------------------------------------------------------------------------------------------


def test_layout_respects_window_and_label_budgets(prepared: Any, tokenizer: Any) -> None:
    counts = []
    for max_label_tokens in (448, 120, 60):  # about 40 tokens a clip here: the smaller budgets bind
        dataset = packed_dataset(prepared, tokenizer, max_label_tokens)
        packer = dataset.packer
        windows_seen = 0
        for epoch in range(3):
            order = np.random.default_rng([5, epoch]).permutation(len(dataset))
            windows = packer.layout(order, dataset.durations)
            windows_seen += len(windows)
            assert [row for w in windows for row in w] == order.tolist()
            for unit in windows:
                labels = packer.window_labels(unit)
                window = dataset[unit]
                assert len(labels) <= max_label_tokens, (unit, len(labels))
                assert len(window.pcm) <= WINDOW_SECONDS * SAMPLING_RATE, unit
                seconds = float(dataset.durations[list(unit)].sum()) + GAP_SECONDS * (len(unit) - 1)
                assert seconds <= WINDOW_SECONDS + 1e-6
            if max_label_tokens == 448:
                assert len(windows) < len(dataset)  # 14 clips of 2-10 s do pack
        counts.append(windows_seen)
    assert counts[0] <= counts[1] < counts[2], counts


def test_layout_is_a_function_of_seed_and_epoch(prepared: Any, tokenizer: Any) -> None:
    dataset = packed_dataset(prepared, tokenizer)
    again = packed_dataset(prepared, tokenizer)

    def layout(ds: SpeechDataset, seed: int, epoch: int) -> list[tuple[int, ...]]:
        return ds.packer.layout(np.random.default_rng([seed, epoch]).permutation(len(ds)), ds.durations)

    assert layout(dataset, 3, 1) == layout(again, 3, 1) == layout(dataset, 3, 1)
    assert layout(dataset, 3, 1) != layout(dataset, 3, 2)
    assert layout(dataset, 3, 1) != layout(dataset, 4, 1)


# --- windows: audio, spans, helpers -----------------------------------------------------------------------


def test_window_audio_and_segments_are_exact(prepared: Any, tokenizer: Any) -> None:
    dataset = packed_dataset(prepared, tokenizer)
    unit = (2, 0, 7, 5)  # no loud clip: every scale is 1 and the integers are concatenated as they are
    clips = [dataset[row] for row in unit]
    assert all(c.scale == 1.0 for c in clips)
    window = dataset[unit]
    assert window.pcm.dtype == np.int16 and window.scale == 1.0
    assert len(window.pcm) == sum(len(c.pcm) for c in clips) + GAP_SAMPLES * (len(unit) - 1)
    assert window.id == "+".join(c.id for c in clips)
    assert window.text == " ".join(CLIPS[row][1] for row in unit)
    assert window.labels == dataset.packer.window_labels(unit)
    assert window.segments is not None and len(window.segments) == len(unit)
    position = 0
    for i, (segment, clip) in enumerate(zip(window.segments, clips, strict=True)):
        start, end = segment.start * SAMPLING_RATE, segment.end * SAMPLING_RATE
        assert start == pytest.approx(round(start), abs=1e-6) and end == pytest.approx(round(end), abs=1e-6)
        assert round(start) == position and round(end) - round(start) == len(clip.pcm)
        assert segment.text == clip.text == CLIPS[unit[i]][1]
        assert np.array_equal(window.pcm[round(start) : round(end)], clip.pcm)
        position = round(end)
        if i + 1 < len(unit):
            nxt = window.segments[i + 1]
            assert nxt.start - segment.end == pytest.approx(GAP_SECONDS, abs=1e-9)
            assert not window.pcm[position : position + GAP_SAMPLES].any()  # silent gap
            position += GAP_SAMPLES
    assert position == len(window.pcm)
    # The clip's duration column agrees with its samples (what the packer budgets with).
    for row, clip in zip(unit, clips, strict=True):
        assert dataset.durations[row] == pytest.approx(len(clip.pcm) / SAMPLING_RATE, abs=1e-6)


def test_window_with_a_loud_clip_rescales_the_others(prepared: Any, tokenizer: Any) -> None:
    dataset = packed_dataset(prepared, tokenizer)
    unit = (1, LOUD, 3)
    clips = [dataset[row] for row in unit]
    assert clips[1].scale == pytest.approx(LOUD_PEAK, rel=1e-3) and clips[0].scale == clips[2].scale == 1.0
    window = dataset[unit]
    assert window.scale == clips[1].scale
    audio = window.audio
    step = window.scale / pcm_codec.FULL_SCALE
    for segment, clip in zip(window.segments, clips, strict=True):
        part = audio[round(segment.start * SAMPLING_RATE) : round(segment.end * SAMPLING_RATE)]
        assert len(part) == len(clip.pcm)
        # Requantised at the window's scale: within half of its step of the clip's own audio.
        assert float(np.abs(part - clip.audio).max()) <= 0.5 * step + 1e-6
    loud = window.segments[1]
    assert np.array_equal(window.pcm[round(loud.start * SAMPLING_RATE) : round(loud.end * SAMPLING_RATE)], clips[1].pcm)


def test_unit_helpers_count_clips_tokens_and_seconds(prepared: Any, tokenizer: Any) -> None:
    dataset = packed_dataset(prepared, tokenizer)
    units = [(0, 1, 2), (3,), (9, 8)]
    assert dataset.unit_clips(units).tolist() == [0, 1, 2, 3, 9, 8]
    assert dataset.unit_clips([4, 2]).tolist() == [4, 2]
    assert dataset.unit_tokens(units) == sum(len(dataset.packer.window_labels(u)) - 1 for u in units)
    # Three clips in one window: one prompt instead of three, plus two separating spaces (one
    # token each with the byte-level tokenizer); each clip alone predicts its end-of-text too.
    alone = dataset.unit_tokens([0, 1, 2])
    assert alone == int(dataset.label_lengths()[[0, 1, 2]].sum())
    assert dataset.unit_tokens([(0, 1, 2)]) == alone - 2 * len(dataset.packer.targets.special.prefix) + 2
    assert dataset.unit_seconds(units) == pytest.approx(sum(CLIPS[i][0] for i in (0, 1, 2, 3, 9, 8)), abs=1e-3)
    assert dataset.unit_seconds([(0, 1, 2)]) == pytest.approx(dataset.unit_seconds([0, 1, 2]))
    assert dataset.clip_ids(units) == [dataset[i].id for i in (0, 1, 2, 3, 9, 8)]
    assert dataset.clip_ids([5]) == ["clip-05.flac"]


@pytest.mark.parametrize("unit", [(0, 1, 2), (9, 8)])
def test_packed_timestamped_label_token_by_token(prepared: Any, tokenizer: Any, unit: tuple[int, ...]) -> None:
    """Each clip's segment lands at its place in the window: its offset (clips and 0.3 s gaps before
    it) plus its own speech bounds, on the 0.02 s grid."""
    from toolkit.data.dataset import Item, attach_targets

    dataset, _ = build_dataset(ArrowClips(prepared.dataset), tokenizer)
    attach_targets(dataset, tokenizer, len(tokenizer), seed=0, timestamp_probability=1.0, previous_probability=0.0)
    dataset.packer = Packer.build(dataset, tokenizer, 448)
    example = dataset[Item(unit, position=3)]
    expected = [tokenizer.convert_tokens_to_ids("<|startoftranscript|>")]
    offset = 0
    for row in unit:
        clip = dataset.clip(row)
        (segment,) = clip.segments  # one segment per clip: its speech bounds
        start, end = offset / SAMPLING_RATE + segment.start, offset / SAMPLING_RATE + segment.end
        expected += [tokenizer.convert_tokens_to_ids(f"<|{round(start / 0.02) * 0.02:.2f}|>"),
                     *tokenizer(" " + CLIPS[row][1], add_special_tokens=False).input_ids,
                     tokenizer.convert_tokens_to_ids(f"<|{round(end / 0.02) * 0.02:.2f}|>")]
        offset += len(clip.pcm) + GAP_SAMPLES
    assert example.labels == [*expected, tokenizer.eos_token_id]
    assert example.prompt_length == 0
    # The packer budgets for the timestamped layout: two more tokens per segment.
    assert dataset.targets.clip_costs()[unit[0]] == len(tokenizer(" " + CLIPS[unit[0]][1], add_special_tokens=False).input_ids) + 2
