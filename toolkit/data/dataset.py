"""Model-facing datasets: cached audio plus tokenised labels, with the label-length filter applied.

An item is addressed by a *unit*: a row number (one clip), or a tuple of row numbers (a packed
window of several clips, :mod:`toolkit.data.packing`). The sampler yields units; the dataset turns
each into an :class:`Example`, and answers what a list of units holds (clips, label tokens, audio
seconds) without decoding any audio.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import datasets
import numpy as np
import pyarrow as pa
import torch

from toolkit.config import WHISPER_MAX_TARGET_POSITIONS
from toolkit.data import pcm as pcm_codec
from toolkit.data import tokens
from toolkit.data.preprocess import Skip
from toolkit.data.segments import Segment, from_json
from toolkit.data.targets import Special, Targets
from toolkit.data.tokens import Ragged, Stacked, Wrapped

Unit = int | tuple[int, ...]
"""One training item: a clip's row number, or the row numbers of the clips packed into one window."""


@dataclass(frozen=True)
class Item:
    """A unit at its place in the training stream: what its label layout is drawn from."""

    unit: Unit
    position: int
    """Stream position (step x global batch + index in the step): the layout draw's key."""
    previous: tuple[int, ...] | None = None
    """Packed windows: the clips of the window before it in the stream (its previous text)."""


@dataclass
class Example:
    id: str
    pcm: np.ndarray
    """16-bit samples at 16 kHz; the audio is ``pcm * scale / 32767``."""
    scale: float
    text: str
    labels: list[int] | None
    segments: list[Segment] | None = None
    """Every segment's span (seconds from the start of the clip or window) and text, in order."""
    prompt_length: int = 0
    """Leading label tokens that are a previous-text prompt, not a target."""

    @property
    def audio(self) -> np.ndarray:
        """float32 samples."""
        return pcm_codec.to_float(self.pcm, self.scale)


class ClipTable(Protocol):
    """Prepared clips: their metadata as an Arrow table, their audio one row at a time.

    ``meta`` has the columns ``id``, ``text``, ``duration``, ``scale``, ``segments``, ``recording`` and
    ``no_speech`` (the preprocessing cache's, :func:`toolkit.data.preprocess.features`, less the audio).
    """

    meta: pa.Table

    def __len__(self) -> int: ...

    def audio(self, row: int) -> bytes:
        """The row's 16-bit FLAC bytes."""
        ...


class ArrowClips:
    """The preprocessing cache (a ``datasets.Dataset`` of chunks) as a :class:`ClipTable`."""

    def __init__(self, dataset: datasets.Dataset):
        self.meta = dataset.data.table.drop_columns(["flac"])
        # Python objects, not numpy: numpy's bytes scalars drop trailing NUL bytes, which truncates
        # any FLAC stream that happens to end in one.
        self._audio = dataset.with_format(None, columns=["flac"])

    def __getstate__(self) -> dict[str, Any]:
        # The dataset pickles as a reference to its memory-mapped cache files; the Arrow table taken
        # from it would pickle by value (a copy of every transcript for each loader worker).
        return {"_audio": self._audio}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._audio = state["_audio"]
        self.meta = self._audio.data.table.drop_columns(["flac"])

    def __len__(self) -> int:
        return self.meta.num_rows

    def audio(self, row: int) -> bytes:
        return self._audio[row]["flac"]


class SpeechDataset(torch.utils.data.Dataset):
    """Indexable view of a prepared split; ``rows`` selects which of the table's rows are used."""

    def __init__(self, table: ClipTable, rows: np.ndarray, labels: Ragged | Wrapped | Stacked | list[list[int]] | None,
                 durations: np.ndarray):
        self.table = table
        self.rows = rows
        self.labels = labels if labels is None or isinstance(labels, Ragged | Wrapped | Stacked) else Ragged.from_lists(labels)
        """Each kept row's whole label (prompt, text, end-of-text)."""
        self.text_tokens: Ragged | None = None
        """Each kept row's transcript tokens alone (what :func:`attach_targets` lays out)."""
        self.prefixes: list[tuple[int, ...]] | None = None
        self.prefix_of: np.ndarray | None = None
        """Several corpora joined (:mod:`toolkit.data.corpora`): their label starts, and each item's."""
        self.durations = durations
        self.longest_reference: int | None = None
        """Tokens of the longest tokenised transcript (prompt and end-of-text included), when known."""
        self._cached_lengths: np.ndarray | None = None
        self.packer: Any = None
        """A :class:`~toolkit.data.packing.Packer` when training packs clips into windows."""
        self.targets: Targets | None = None
        """Training: the label layouts (timestamps, prompts) drawn per :class:`Item`."""

    def __len__(self) -> int:
        return len(self.rows)

    def clip(self, index: int) -> Example:
        row = int(self.rows[index])
        meta = self.table.meta.slice(row, 1).select(["id", "scale", "text", "segments"]).to_pylist()[0]
        labels = self.labels[index] if self.labels is not None else None
        return Example(str(meta["id"]), pcm_codec.decode(self.table.audio(row)), float(meta["scale"]),
                       str(meta["text"]), labels, from_json(meta["segments"]))

    def __getitem__(self, key: Unit | Item) -> Example:
        unit = key.unit if isinstance(key, Item) else key
        example = self.packer.window(self, unit) if isinstance(unit, tuple) else self.clip(unit)
        if isinstance(key, Item) and self.targets is not None:
            example.labels, example.prompt_length = self.targets.label(
                _rows(unit), key.position, key.previous, example.segments
            )
        return example

    def item_sizes(self, items: Sequence[Item]) -> list[tuple[int, int]]:
        """(label tokens in the loss, decoder positions) of each item, without decoding audio."""
        if self.targets is None:
            return [(n, n) for n in (self.unit_tokens([item.unit]) for item in items)]
        return [self.targets.sizes(_rows(item.unit), item.position, item.previous) for item in items]

    def label_lengths(self) -> np.ndarray:
        """Tokens each clip contributes to the loss alone (the leading start token is not predicted)."""
        if self.labels is None:
            raise ValueError("this dataset has no labels")
        return self.labels.lengths() - 1

    def unit_tokens(self, units: Sequence[Unit]) -> int:
        """Label tokens predicted over ``units`` (what the loss is averaged over)."""
        if _packed(units):
            return sum(self.packer.window_tokens(unit) for unit in units)
        return int(self._lengths()[np.asarray(units, dtype=np.int64)].sum())

    def unit_clips(self, units: Sequence[Unit]) -> np.ndarray:
        """The row numbers of every clip in ``units``, in order."""
        if _packed(units):
            return np.asarray([i for unit in units for i in unit], dtype=np.int64)
        return np.asarray(units, dtype=np.int64)

    def unit_seconds(self, units: Sequence[Unit]) -> float:
        """Speech seconds in ``units`` (gaps between packed clips not counted)."""
        return float(self.durations[self.unit_clips(units)].sum())

    def will_need(self, units: Sequence[Unit]) -> None:
        """Hint that ``units`` come soon: a table of remote shards starts fetching theirs."""
        hint = getattr(self.table, "will_need", None)
        if hint is not None and len(units):
            hint(self.rows[self.unit_clips(units)])

    def clip_ids(self, units: Sequence[Unit]) -> list[str]:
        ids = self.table.meta.column("id")
        return [ids[int(self.rows[i])].as_py() for i in self.unit_clips(units)]

    def _lengths(self) -> np.ndarray:
        if self._cached_lengths is None:
            self._cached_lengths = self.label_lengths()
        return self._cached_lengths


def build_dataset(
    table: ClipTable,
    tokenizer: Any | None,
    *,
    max_label_tokens: int = WHISPER_MAX_TARGET_POSITIONS,
    split: str = "train",
    keep_labels: bool = True,
    token_cache: Path | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[SpeechDataset, list[Skip]]:
    """Tokenise transcripts (when a tokenizer is given) and drop label sequences that are too long.

    ``keep_labels=False`` (evaluation data) filters the same way but keeps text only: an eval split is
    scored on generated text, and a reference too long for the decoder would only dominate its WER.
    ``token_cache``: where tokenised blocks are kept between runs (:func:`toolkit.data.tokens.encode`).
    """
    durations = table.meta.column("duration").to_numpy().astype(np.float32)
    if tokenizer is None:
        return SpeechDataset(table, np.arange(len(table)), None, durations), []
    text = tokens.encode(tokenizer, table.meta.column("text"), token_cache, rank=rank, world_size=world_size)
    lengths = text.lengths() + len(tokenizer.prefix_tokens) + 1
    rows = np.flatnonzero(lengths <= max_label_tokens)
    item_ids = table.meta.column("id")
    skips = [Skip(split, item_ids[int(row)].as_py(), f"label longer than {max_label_tokens} tokens ({lengths[row]})",
                  "filtered") for row in np.flatnonzero(lengths > max_label_tokens)]
    kept = text.take(rows)
    labels = tokens.Wrapped(kept, tokenizer.prefix_tokens, [tokenizer.eos_token_id]) if keep_labels else None
    dataset = SpeechDataset(table, rows, labels, durations[rows])
    dataset.text_tokens = kept if keep_labels else None
    dataset.longest_reference = int(lengths[rows].max()) if len(rows) else None
    return dataset, skips


def _rows(unit: Unit) -> tuple[int, ...]:
    return unit if isinstance(unit, tuple) else (int(unit),)


def _packed(units: Sequence[Unit]) -> bool:
    return len(units) > 0 and isinstance(units[0], tuple)


def attach_targets(dataset: SpeechDataset, tokenizer: Any, vocab_size: int, *, seed: int,
                   timestamp_probability: float, previous_probability: float,
                   max_tokens: int = WHISPER_MAX_TARGET_POSITIONS, token_cache: Path | None = None,
                   rank: int = 0, world_size: int = 1) -> Targets:
    """Build the training label layouts for ``dataset`` (which must have labels) and attach them."""
    if dataset.labels is None or dataset.text_tokens is None:
        raise ValueError("label layouts need a dataset with labels")
    special = Special.from_tokenizer(tokenizer, vocab_size, timestamps=timestamp_probability > 0)
    table = dataset.table.meta.select(["text", "segments", "no_speech"])
    if len(dataset.rows) != table.num_rows or not np.array_equal(dataset.rows, np.arange(table.num_rows)):
        table = table.take(pa.array(dataset.rows, type=pa.int64()))  # the kept rows, in order
    spaced = tokens.encode(tokenizer, table.column("text"), token_cache, rank=rank, world_size=world_size,
                           spaced=True)
    whole, own, counts = _segment_texts(table, timestamp_probability > 0)
    starts = np.concatenate([[0], np.cumsum(counts)])
    own_tokens = tokens.encode(tokenizer, own, token_cache, rank=rank, world_size=world_size)
    targets = Targets(
        special, dataset.text_tokens, spaced, tokens.Pieces(spaced, whole, own_tokens, starts),
        table.column("no_speech").to_numpy(zero_copy_only=False).astype(bool),
        _previous_clips(dataset.table.meta.column("recording"), dataset.rows), max_tokens,
        seed, timestamp_probability, previous_probability, dataset.prefixes, dataset.prefix_of,
    )
    dataset.targets = targets
    return targets


def _segment_texts(table: pa.Table, timestamps: bool) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(clips whose one segment is the whole transcript, every other clip's segment texts to tokenise,
    how many of those each clip has); read a block of clips at a time."""
    whole = np.zeros(table.num_rows, dtype=bool)
    counts = np.zeros(table.num_rows, dtype=np.int64)
    own: list[str] = []
    if not timestamps:
        return whole, own, counts
    for start in range(0, table.num_rows, tokens.BLOCK):
        block = table.slice(start, tokens.BLOCK)
        for offset, (text, stored) in enumerate(zip(block.column("text").to_pylist(),
                                                    block.column("segments").to_pylist(), strict=True)):
            pieces = [s.text.lstrip() for s in from_json(stored)]
            if len(pieces) == 1 and pieces[0] == str(text).lstrip():
                whole[start + offset] = True  # the one segment is the transcript: its tokens are `spaced`
            else:
                own += [" " + piece for piece in pieces]
                counts[start + offset] = len(pieces)
    return whole, own, counts


def _previous_clips(recordings: pa.ChunkedArray, rows: np.ndarray) -> np.ndarray:
    """For each kept row, the index (among ``rows``) of the row before it when both come from the same
    recording, else -1: consecutive rows of one recording are each other's previous utterance."""
    recording = recordings.to_numpy(zero_copy_only=False)
    same = np.zeros(len(recording), dtype=bool)
    same[1:] = (recording[1:] == recording[:-1]) & (recording[1:] != "")
    position = np.full(len(recording), -1, dtype=np.int64)
    position[rows] = np.arange(len(rows))
    before = np.where(rows > 0, position[np.maximum(rows - 1, 0)], -1)
    return np.where(same[rows], before, -1)
