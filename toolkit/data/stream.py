"""Hub streaming (``data.streaming: true``): one rank's endless, shuffled, exactly resumable share of a
``datasets.IterableDataset``, and the decoding of its rows.

How a rank's stream is made: :class:`RankStream` splits the dataset by node, reads this rank's share in
blocks of ``block_size`` rows, permutes each block with a generator seeded by (seed, rank, epoch, block)
and hands the rows out in that order; when the share ends, the next epoch begins. Its position is a
small JSON dict (:meth:`RankStream.state_dict`): the epoch, the block, the upstream state at the
block's start and how many rows of the block were handed out. Resuming restores the upstream to the
block start, re-reads and re-permutes the block and skips what was handed out, so the rows after a
resume are exactly those an unbroken run would have seen (same world size, rank, seed, block size).

Facts about ``datasets`` 5.2.0 this relies on (``datasets/iterable_dataset.py`` unless named):

* ``IterableDataset.state_dict()`` is "the state at the latest example it yielded" (2749): the leaf
  iterables count a row before yielding it (338, 428), so a state taken while the consumer holds row i
  is the position just after row i. We only pull rows with ``islice``, which never reads ahead, so the
  state taken after a block is the start of the next one.
* The state is ``{"examples_iterable": ..., "epoch": epoch}`` (3027). ``load_state_dict`` only stores
  it (2848); it is applied when an iteration starts, and only if ``set_epoch`` was given the same
  epoch (3029). It stays stored and would be applied again at every later ``iter()`` of that epoch,
  so each restore and each epoch gets a fresh ``split_dataset_by_node`` view.
* ``set_epoch(e)`` with ``e != 0`` reshuffles the data sources (files or row groups) with
  ``np.random.default_rng(e)`` before the split by node (2963-2965). Every rank draws the same
  order, so the ranks still partition the rows. Older releases (4.x) shuffle the sources only after
  ``.shuffle()``: there the file order stays fixed, and resume is exact all the same.
* ``split_dataset_by_node`` ("auto") gives each rank whole shards when their count divides by the
  world size, and otherwise every ``world_size``-th row (``StepExamplesIterable``, 2982-3006); both
  are exact to resume.
* ``IterableDataset.shuffle(buffer_size=...)`` keeps only the upstream position in its state, not the
  buffer (2753, 2039-2046): the buffered rows are lost on resume. That is why rows are shuffled here
  in blocks that are re-read on resume, and why the dataset given to :class:`RankStream` must not be
  ``.shuffle()``-d already.
* A restore within a Parquet file re-reads the file from its start: the reader counts rows up to the
  saved position (436-449; ``packaged_modules/parquet/parquet.py`` 197-220). A resume costs the rows
  before the block in its file plus the block itself.

Shard order, the choice: per-epoch shard shuffling comes from ``set_epoch`` alone, which is exact
(the order is a pure function of the epoch value). To make it depend on the seed too, the upstream
is given the epoch value ``1 + epoch * 2**32 + seed``: distinct for every (seed, epoch), never 0
(which would leave the files in order), and stored in the upstream state that resume checks. A
buffer shuffle (``.shuffle()``) would give finer mixing across shards but cannot be resumed exactly.
"""

from __future__ import annotations

import copy
import os
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.data.audio import AudioError
from toolkit.data.sources import (
    DataError,
    Extras,
    Source,
    _is_hub_id,
    _look_up_on_hub,
    _looks_like_path,
    _one_line,
    hub_offline,
    row_extras,
)

STREAM_ID = "_stream_id"
"""The key under which :meth:`RankStream.take` gives each row a stable id (for skip logs)."""
STATE_VERSION = 1
SEED_LIMIT = 2**32
"""Seeds are in [0, 2**32), as ``training.seed`` is; the upstream epoch value relies on it."""


def open_stream(
    spec: str, split: str, hub_config: str | None, audio_column: str | None, text_column: str
) -> Any:
    """``load_dataset(spec, hub_config, split=split, streaming=True)`` with checked columns and the audio
    column left undecoded; every failure is a one-line :class:`DataError`.

    ``spec`` is a Hub dataset id or a local directory of data files (Parquet shards, or an audiofolder).
    """
    import datasets

    audio_column = audio_column or "audio"
    where = f"{spec!r} (config {hub_config!r}, split {split!r})"
    path = Path(spec).expanduser()
    if path.is_file():
        raise DataError(f"{spec}: streaming reads a Hub dataset id or a directory of data files, not one file")
    if not path.is_dir():
        missing = f"no such directory: {spec}" + ("" if path.is_absolute() else f" (relative to {Path.cwd()})")
        if _looks_like_path(spec):
            raise DataError(f"{missing}; a streamed data spec is a directory of data files or a Hub dataset id")
        if not _is_hub_id(spec):
            raise DataError(f"{missing}, and {spec!r} is not a valid Hub dataset id either")
        if not hub_offline():
            _look_up_on_hub(spec, missing)  # fails in seconds where load_dataset would retry for ~30 s
    try:
        dataset = datasets.load_dataset(str(path) if path.is_dir() else spec, hub_config, split=split, streaming=True)
    except Exception as exc:  # the Hub and the builders raise many types
        raise DataError(f"could not stream {where}: {_one_line(exc)}") from None
    if dataset.features is None:
        raise DataError(f"streamed dataset {where}: its columns are unknown until read; use Parquet or an audiofolder")
    columns = list(dataset.features)
    for column, key in ((audio_column, "data.audio_column"), (text_column, "data.text_column")):
        if column not in columns:
            raise DataError(f"streamed dataset {where}: no column {column!r} (columns: {', '.join(columns)}); set {key}")
    text_feature = dataset.features[text_column]
    if getattr(text_feature, "dtype", None) not in ("string", "large_string"):
        raise DataError(f"streamed dataset {where}: column {text_column!r} holds {text_feature}, not text; "
                        "set data.text_column")
    # An audiofolder yields each row as Python values, and datasets encodes an Audio value through
    # torchcodec even with decode=False (features/audio.py:105-110), which does not work here; its
    # audio is a file path, so read it as text. Arrow-backed data (Parquet) is cast without torchcodec.
    undecoded = datasets.Value("string") if dataset.info.builder_name == "audiofolder" else datasets.Audio(decode=False)
    try:
        return dataset.cast_column(audio_column, undecoded)
    except Exception as exc:
        raise DataError(f"streamed dataset {where}: cannot read column {audio_column!r} as audio: {_one_line(exc)}") from None


class RankStream:
    """This rank's share of ``dataset``: shuffled in blocks, repeated over epochs, resumable exactly.

    Every rank must pass the same ``seed`` (the shard order of an epoch is drawn from it, and the
    ranks' shares only partition the rows if they draw the same order). Memory holds one block.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        seed: int,
        rank: int,
        world_size: int,
        block_size: int = 1000,
        audio_column: str = "audio",
    ):
        if not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.dataset = dataset
        self.seed, self.rank, self.world_size, self.block_size = seed, rank, world_size, block_size
        self.audio_column = audio_column
        # Position: the current block is block `_block` of epoch `_epoch`, read from the upstream
        # restored to `_block_start` (None: the epoch's start); `_returned` of its rows are handed out.
        self._epoch = 0
        self._block = 0
        self._block_start: dict[str, Any] | None = None
        self._returned = 0
        self._rows: list[dict[str, Any]] | None = None  # the current block, permuted; None: not read yet
        self._upstream: Any = None
        self._iterator: Any = None  # live over the upstream, just after the current block

    def take(self, n: int) -> list[dict[str, Any]]:
        """This rank's next ``n`` rows, each with a stable id under :data:`STREAM_ID`."""
        out: list[dict[str, Any]] = []
        while len(out) < n:
            rows = self._current_block()
            if self._returned >= len(rows):
                self._next_block()
                continue
            count = min(n - len(out), len(rows) - self._returned)
            out.extend(rows[self._returned : self._returned + count])
            self._returned += count
        return out

    def state_dict(self) -> dict[str, Any]:
        """The position just after the last row :meth:`take` returned, as JSON-serialisable data."""
        epoch, block, block_start, returned = self._epoch, self._block, self._block_start, self._returned
        if self._rows is not None and returned >= len(self._rows):
            # The block is used up and the live upstream stands at the next one's start: save that, so
            # a resume need not re-read a block only to skip all of it.
            block, block_start, returned = block + 1, self._upstream.state_dict(), 0
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "block_size": self.block_size,
            "epoch": epoch,
            "block": block,
            "block_start": copy.deepcopy(block_start),
            "returned": returned,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict`); refuses one of another run's layout."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"stream state version {state.get('version')!r} is not {STATE_VERSION}; cannot resume it")
        for key in ("world_size", "rank", "block_size", "seed"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"the stream state was saved with {key} {state.get(key)!r}, this run has {getattr(self, key)!r}; "
                    "an exact resume needs the same world size, rank, block size and seed"
                )
        self._epoch, self._block = int(state["epoch"]), int(state["block"])
        self._block_start = copy.deepcopy(state["block_start"])
        self._returned = int(state["returned"])
        self._rows = self._upstream = self._iterator = None

    def _current_block(self) -> list[dict[str, Any]]:
        """The current block, read (and permuted) on first use; an ended epoch starts the next."""
        if self._rows is not None:
            return self._rows
        raw = self._read_block()
        if not raw and self._block > 0:  # the share ended: the next epoch starts from its first block
            self._epoch, self._block, self._block_start, self._returned = self._epoch + 1, 0, None, 0
            self._iterator = None
            raw = self._read_block()
        if not raw:
            raise DataError(
                f"rank {self.rank} of {self.world_size} gets no rows from the streamed dataset "
                f"({self.dataset.num_shards} shards); use fewer ranks or a dataset with more rows or shards"
            )
        order = np.random.default_rng([self.seed, self.rank, self._epoch, self._block]).permutation(len(raw))
        for index, row in enumerate(raw):
            row[STREAM_ID] = _row_id(row, self.audio_column) or f"{self._epoch}:{self._block}:{index}"
        self._rows = [raw[i] for i in order]
        return self._rows

    def _next_block(self) -> None:
        """Move past a used-up block; the live upstream already stands at the next block's start."""
        self._block += 1
        self._block_start = self._upstream.state_dict()
        self._returned = 0
        self._rows = None

    def _read_block(self) -> list[dict[str, Any]]:
        """Up to ``block_size`` rows from the live upstream, opening it at the block start if needed."""
        if self._iterator is None:
            self._upstream = self._open_upstream()
            self._iterator = iter(self._upstream)
        try:
            return list(islice(self._iterator, self.block_size))
        except Exception as exc:  # a bad file or a dropped connection: say where, keep the cause
            raise DataError(
                f"reading the stream (rank {self.rank}, epoch {self._epoch}, block {self._block}) failed: "
                f"{_one_line(exc)}"
            ) from exc

    def _open_upstream(self) -> Any:
        """A fresh split of the dataset for this rank at the current epoch, restored to the block start."""
        from datasets.distributed import split_dataset_by_node

        upstream = split_dataset_by_node(self.dataset, rank=self.rank, world_size=self.world_size)
        upstream.set_epoch(upstream_epoch(self.seed, self._epoch))
        if self._block_start is not None:
            upstream.load_state_dict(copy.deepcopy(self._block_start))
        return upstream


def upstream_epoch(seed: int, epoch: int) -> int:
    """The epoch value given to ``IterableDataset.set_epoch``: it seeds the shard order, so it is distinct
    for every (seed, epoch) with seed in [0, 2**32), and never 0 (which would keep the files in order)."""
    return 1 + epoch * SEED_LIMIT + seed


def _row_id(row: dict[str, Any], audio_column: str) -> str | None:
    """The row's audio path, stable over epochs; None where the audio has no path."""
    audio = row.get(audio_column)
    path = audio.get("path") if isinstance(audio, dict) else audio
    return path if isinstance(path, str) and path else None


class StreamSource(Source):
    """Rows taken from a stream as a :class:`Source`, so that preprocessing's own rules decode and skip
    them (``preprocess.process_chunk``); ids are the rows' :data:`STREAM_ID`."""

    def __init__(self, rows: list[dict[str, Any]], audio_column: str, text_column: str, description: str):
        self.rows, self.audio_column, self.text_column, self.description = rows, audio_column, text_column, description

    def __len__(self) -> int:
        return len(self.rows)

    def fingerprint(self, start: int, stop: int) -> str:
        raise NotImplementedError("streamed rows are decoded as they come, never cached")

    def get(self, index: int) -> tuple[str, str | bytes | None, str | None]:
        row = self.rows[index]
        audio = row.get(self.audio_column)
        try:
            data = _encoded_audio(audio)
        except AudioError:  # a remote file that cannot be fetched: decoding its path reports it
            data = audio.get("path") if isinstance(audio, dict) else audio
        return str(row[STREAM_ID]), data, row.get(self.text_column)

    def extras(self, index: int) -> Extras:
        return row_extras(f"{self.description} row {self.rows[index][STREAM_ID]}", self.rows[index])


def _encoded_audio(audio: Any) -> str | bytes | None:
    """The bytes or local path of an undecoded audio value (``{"bytes", "path"}`` or a path); a remote
    path (an audiofolder on the Hub streams ``hf://`` or ``zip://...::hf://`` URLs) is fetched."""
    if isinstance(audio, dict):
        data = audio.get("bytes")
        if data:
            return bytes(data)
        audio = audio.get("path")
    if isinstance(audio, str) and "://" in audio and not os.path.isfile(audio):
        from datasets.utils.file_utils import xopen  # the opener datasets' own Audio feature uses

        try:
            with xopen(audio, "rb") as handle:
                return handle.read()
        except Exception as exc:
            raise AudioError(f"unreadable remote audio: {_one_line(exc)}") from None
    return audio if isinstance(audio, (str, bytes)) else None
