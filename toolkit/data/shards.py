"""Prepared shards (:mod:`toolkit.data.prepare`) as training or evaluation data.

:class:`ShardSet` is a :class:`~toolkit.data.dataset.ClipTable`: every sample's metadata (id, text,
duration, segments, ...) comes from the shard tables at start-up, in one Arrow table, and a sample's
audio is read at its recorded byte offset in its shard, with no tar scan. Row ``r`` is the ``r``-th
sample in shard order, the order the preprocessing cache would give for the same source, so the
(seed, step) sampler draws the same samples from either and a resume needs no skipping.

Why our own byte-offset tables and not webdataset's ``wids``: ``wids`` indexes a shard by scanning
its tar once it is local and knows only each shard's sample count beforehand, while the sampler and
the label layouts need every clip's duration and transcript before any audio is read (packing,
label lengths, the memory planner). The offsets are known when the shard is written, so they go into
the same table. The shards stay plain WebDataset tars for every other reader.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc  # noqa: F401 - pa.ipc

from toolkit.data.fetch import LocalFiles, RemoteFiles, is_remote, open_location
from toolkit.data.prepare import INDEX_NAME, SHARDS_FORMAT, SHARDS_VERSION, SKIPPED_NAME
from toolkit.data.preprocess import Skip
from toolkit.data.sources import DataError

META_TYPES = {"id": pa.string(), "text": pa.string(), "duration": pa.float32(), "scale": pa.float32(),
              "segments": pa.string(), "recording": pa.string(), "no_speech": pa.bool_(),
              "offset": pa.int64(), "size": pa.int64()}


def is_prepared(spec: str) -> bool:
    """Does ``spec`` name a prepared directory (or its index), rather than an audiofolder, manifest or Hub id?"""
    if is_remote(spec):
        return True
    path = Path(spec.removeprefix("file://")).expanduser()
    return (path / INDEX_NAME).is_file() or (path.name == INDEX_NAME and path.is_file())


class ShardSet:
    """The samples of a prepared directory, in shard order."""

    def __init__(self, files: LocalFiles | RemoteFiles, index: dict[str, Any], meta: pa.Table,
                 skips: list[Skip] | None = None, spill_dir: Path | None = None):
        self.files = files
        self.description = files.description
        self.index = index
        self.meta = meta
        self.skips = skips or []
        """What ``toolkit prepare`` left out (its ``skipped.jsonl``)."""
        self.spill_dir = spill_dir
        """Where the metadata goes as an Arrow file for loader workers (else they get a copy each)."""
        self._spilled: Path | None = None
        self.shards: list[dict[str, Any]] = index["shards"]
        self._locate_columns()

    def _locate_columns(self) -> None:
        """Each sample's shard, byte offset and size as arrays (what reading a sample's audio looks up)."""
        self._shard_of = self.meta.column("shard").to_numpy()
        self._offset = self.meta.column("offset").to_numpy()
        self._size = self.meta.column("size").to_numpy()

    def __getstate__(self) -> dict[str, Any]:
        # A loader worker memory-maps the metadata from one Arrow file, which every worker and rank on
        # the machine shares through the page cache, instead of unpickling its own copy (hundreds of
        # MB for millions of clips).
        state = dict(self.__dict__)
        if self.spill_dir is not None:
            if self._spilled is None:
                self._spilled = _spill(self.meta, self.shards, self.spill_dir)
            state.update(meta=None, _spilled=self._spilled, _shard_of=None, _offset=None, _size=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.meta is None and self._spilled is not None:
            self.meta = pa.ipc.open_file(pa.memory_map(str(self._spilled))).read_all()
            self._locate_columns()

    def __len__(self) -> int:
        return self.meta.num_rows

    def subset(self, rows: np.ndarray) -> ShardSet:
        """These samples at ``rows`` only, in that order."""
        return ShardSet(self.files, self.index, self.meta.take(pa.array(rows, type=pa.int64())), self.skips,
                        self.spill_dir)

    def shard_path(self, shard: int) -> Path:
        info = self.shards[shard]
        return self.files.path(info["name"], info["sha256"], info["sha256"], info["bytes"])

    def audio(self, row: int) -> bytes:
        shard = int(self._shard_of[row])
        for attempt in (1, 2):
            path = self.shard_path(shard)
            try:
                with open(path, "rb") as stream:
                    stream.seek(int(self._offset[row]))
                    data = stream.read(int(self._size[row]))
                break
            except FileNotFoundError:
                # A cached remote shard can be evicted by another process between the two lines
                # above: fetch it again, once. A local one is simply missing.
                if attempt == 2 or isinstance(self.files, LocalFiles):
                    raise DataError(f"{path}: shard missing (the prepared directory changed after it was "
                                    "opened?)") from None
        if len(data) != int(self._size[row]):
            raise DataError(f"{path}: sample {row} is cut short (the shard is shorter than its table says)")
        return data

    def will_need(self, rows: np.ndarray) -> None:
        """Start fetching the shards that ``rows`` live in (remote shards; local ones need nothing)."""
        wanted = np.unique(self._shard_of[np.asarray(rows, dtype=np.int64)])
        self.files.prefetch([(self.shards[j]["name"], self.shards[j]["sha256"], self.shards[j]["bytes"])
                             for j in wanted.tolist()])


def open_shards(spec: str, cache_dir: Path, max_bytes: int, max_items: int | None = None) -> ShardSet:
    """Read a prepared directory's index and shard tables; a malformed one is a one-line :class:`DataError`."""
    files = open_location(spec, cache_dir, max_bytes)
    where = files.description
    index = _load_json(files, INDEX_NAME, where)
    if index.get("format") != SHARDS_FORMAT or index.get("version") != SHARDS_VERSION:
        raise DataError(f"{where}: {INDEX_NAME} is not a whisper-toolkit shard index of version {SHARDS_VERSION} "
                        f"(format {index.get('format')!r}, version {index.get('version')!r}); rerun `toolkit prepare`")
    parts = []
    for number, shard in enumerate(index["shards"]):
        table = _load_json(files, shard["table"], where, key=shard["key"])
        if table.get("key") != shard["key"] or table.get("sha256") != shard["sha256"]:
            raise DataError(f"{where}: {shard['table']} does not match {INDEX_NAME} (rebuilt after the index "
                            "was written?); rerun `toolkit prepare` to finish it")
        columns = table["columns"]
        arrays = {name: pa.array(columns[name], type=kind) for name, kind in META_TYPES.items()}
        arrays["shard"] = pa.array(np.full(len(columns["id"]), number, dtype=np.int32))
        parts.append(pa.table(arrays))
        if max_items is not None and sum(p.num_rows for p in parts) >= max_items:
            break
    if not parts:
        raise DataError(f"{where}: the index lists no shards")
    meta = pa.concat_tables(parts)
    if max_items is not None:
        meta = meta.slice(0, max_items)
    return ShardSet(files, index, meta, _skips(files, where), spill_dir=cache_dir / "meta")


def _spill(meta: pa.Table, shards: list[dict[str, Any]], directory: Path) -> Path:
    """``meta`` as an Arrow IPC file named by its content (ranks write the same bytes; the first wins).
    The shards' SHA-256s and each row's (shard, offset) identify the rows and their order."""
    digest = hashlib.sha256(json.dumps([shard["sha256"] for shard in shards]).encode())
    for name in ("shard", "offset"):
        digest.update(meta.column(name).to_numpy().tobytes())
    path = directory / f"{digest.hexdigest()[:24]}.arrow"
    if not path.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, meta.schema) as writer:
            writer.write_table(meta)
        os.replace(tmp, path)
    return path


def _load_json(files: LocalFiles | RemoteFiles, name: str, where: str, key: str | None = None) -> dict[str, Any]:
    try:
        text = files.path(name, key).read_text() if key and isinstance(files, RemoteFiles) else files.read_text(name)
        return json.loads(text)
    except FileNotFoundError:
        raise DataError(f"{where}: no {name} (not a prepared directory, or `toolkit prepare` has not finished)") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{where}: cannot read {name}: {exc}") from None


def _skips(files: LocalFiles | RemoteFiles, where: str) -> list[Skip]:
    try:
        text = files.read_text(SKIPPED_NAME)
    except (FileNotFoundError, DataError):
        return []
    return [Skip(**json.loads(line)) for line in text.splitlines() if line.strip()]
