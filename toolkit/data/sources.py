"""Data sources: turn a ``data.train``/``data.eval`` spec into an indexable list of (audio, text) items.

Three forms are accepted:

* a local ``audiofolder`` directory: ``metadata.csv`` (or ``.jsonl``) with ``file_name`` and a text column;
  a directory without metadata may hold one sub-directory per split (``train/``, ``dev/``);
* a CSV/TSV/JSONL manifest with an audio path column and a text column, paths relative to the manifest;
* a Hub dataset id, with ``hub_config`` and a split expression such as ``train+validation``.

Listing never decodes audio: a missing file is found (and counted as a skip) during preprocessing,
so one bad row cannot stop a run.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

AUDIO_COLUMN_CANDIDATES = ("file_name", "audio", "audio_filepath", "path", "audio_path", "file")
MANIFEST_SUFFIXES = {".csv": ",", ".tsv": "\t", ".jsonl": None, ".json": None}


class DataError(ValueError):
    """The data spec cannot be used at all (as opposed to one bad sample, which is skipped)."""


@dataclass(frozen=True)
class LocalItem:
    """One row of a local source: an audio file and its transcript."""

    id: str
    path: str
    text: str | None


class Source:
    """An indexable collection of audio/text items with a cheap, content-derived fingerprint."""

    description: str

    def __len__(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def fingerprint(self, start: int, stop: int) -> str:
        """A digest that changes whenever items ``start:stop`` (audio or text) change."""
        raise NotImplementedError  # pragma: no cover - interface

    def get(self, index: int) -> tuple[str, str | bytes | None, str | None]:
        """Return ``(id, audio, text)`` where audio is a path or the encoded bytes."""
        raise NotImplementedError  # pragma: no cover - interface


class LocalSource(Source):
    def __init__(self, items: list[LocalItem], description: str):
        self.items = items
        self.description = description

    def __len__(self) -> int:
        return len(self.items)

    def fingerprint(self, start: int, stop: int) -> str:
        digest = hashlib.sha256()
        for item in self.items[start:stop]:
            # Size and mtime stand in for the bytes: re-hashing a large corpus on every launch would
            # cost as much as decoding it. Any edit to a file changes at least its mtime.
            try:
                stat = Path(item.path).stat()
                file_key = f"{stat.st_size}:{stat.st_mtime_ns}"
            except OSError:
                file_key = "missing"
            digest.update(json.dumps([item.id, item.path, file_key, item.text]).encode())
        return digest.hexdigest()

    def get(self, index: int) -> tuple[str, str | bytes | None, str | None]:
        item = self.items[index]
        return item.id, item.path, item.text


class HubSource(Source):
    """A ``datasets.Dataset`` whose audio column is read undecoded (bytes + path)."""

    def __init__(self, dataset: Any, audio_column: str, text_column: str, description: str):
        self.dataset = dataset
        self.audio_column = audio_column
        self.text_column = text_column
        self.description = description

    def __len__(self) -> int:
        return len(self.dataset)

    def fingerprint(self, start: int, stop: int) -> str:
        key = [self.dataset._fingerprint, self.audio_column, self.text_column, start, stop]
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()

    def get(self, index: int) -> tuple[str, str | bytes | None, str | None]:
        row = self.dataset[index]
        audio = row[self.audio_column]
        path = audio.get("path") if isinstance(audio, dict) else None
        data = audio.get("bytes") if isinstance(audio, dict) else audio
        item_id = str(row.get("path") or path or index)
        return item_id, data if data is not None else path, row.get(self.text_column)


def open_source(
    spec: str,
    *,
    split: str,
    text_column: str,
    audio_column: str | None = None,
    hub_config: str | None = None,
) -> Source:
    """Resolve a data spec (directory, manifest or Hub id) into a :class:`Source`."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return _open_audiofolder(path, split, text_column, audio_column)
    if path.is_file():
        if path.suffix.lower() not in MANIFEST_SUFFIXES:
            raise DataError(
                f"{spec}: a manifest must end in {', '.join(MANIFEST_SUFFIXES)}; got {path.suffix or 'no suffix'}"
            )
        return _open_manifest(path, text_column, audio_column)
    if _looks_like_path(spec):
        raise DataError(f"{spec} does not exist (expected a directory, a manifest file or a Hub dataset id)")
    return _open_hub(spec, split, hub_config, text_column, audio_column)


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or Path(spec).suffix.lower() in MANIFEST_SUFFIXES or spec.count("/") > 1


def _open_audiofolder(root: Path, split: str, text_column: str, audio_column: str | None) -> Source:
    metadata = _find_metadata(root)
    if metadata is not None:
        return _open_manifest(metadata, text_column, audio_column or "file_name", description=str(root))
    parts = [part.strip() for part in split.split("+") if part.strip()]
    subdirs = [root / part for part in parts]
    if parts and all(_find_metadata(sub) for sub in subdirs):
        sources = [_open_audiofolder(sub, "", text_column, audio_column) for sub in subdirs]
        items = [item for source in sources for item in source.items]  # type: ignore[attr-defined]
        return LocalSource(items, f"{root}[{split}]")
    raise DataError(
        f"{root}: no metadata.csv or metadata.jsonl (and no sub-directories {', '.join(parts) or '-'} with one); "
        "an audiofolder needs a metadata file with file_name and a text column"
    )


def _find_metadata(root: Path) -> Path | None:
    for name in ("metadata.csv", "metadata.tsv", "metadata.jsonl"):
        if (root / name).is_file():
            return root / name
    return None


def _read_rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    try:
        if MANIFEST_SUFFIXES[suffix] is not None:
            with path.open(newline="", encoding="utf-8") as handle:
                return list(csv.DictReader(handle, delimiter=MANIFEST_SUFFIXES[suffix]))
        text = path.read_text(encoding="utf-8")
        if suffix == ".json" and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = []
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    if not all(isinstance(row, dict) for row in rows):
        raise DataError(f"{path}: every row must be an object with an audio path and a text field")
    return rows


def _open_manifest(
    path: Path, text_column: str, audio_column: str | None, description: str | None = None
) -> LocalSource:
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"{path}: the manifest has no rows")
    columns = list(rows[0].keys())
    if text_column not in columns:
        raise DataError(f"{path}: no text column {text_column!r} (columns: {', '.join(columns)}); set data.text_column")
    if audio_column is None:
        audio_column = next((c for c in AUDIO_COLUMN_CANDIDATES if c in columns), None)
        if audio_column is None:
            raise DataError(
                f"{path}: no audio path column (looked for {', '.join(AUDIO_COLUMN_CANDIDATES)}); set data.audio_column"
            )
    elif audio_column not in columns:
        raise DataError(f"{path}: no audio column {audio_column!r} (columns: {', '.join(columns)})")
    base = path.parent.resolve()
    items = []
    for row in rows:
        rel = str(row.get(audio_column) or "")
        audio_path = (base / rel).resolve() if rel else base / "<empty path>"
        text = row.get(text_column)
        items.append(LocalItem(id=rel or "<empty path>", path=str(audio_path), text=None if text is None else str(text)))
    return LocalSource(items, description or str(path))


def _open_hub(spec: str, split: str, hub_config: str | None, text_column: str, audio_column: str | None) -> Source:
    import datasets

    try:
        dataset = datasets.load_dataset(spec, hub_config, split=split)
    except Exception as exc:  # the Hub raises many types: connection, auth, missing config
        raise DataError(
            f"could not load Hub dataset {spec!r} (config {hub_config!r}, split {split!r}): "
            f"{type(exc).__name__}: {exc}. Offline? Use a local directory or manifest instead."
        ) from exc
    columns = dataset.column_names
    audio_column = audio_column or "audio"
    for column, key in ((audio_column, "data.audio_column"), (text_column, "data.text_column")):
        if column not in columns:
            raise DataError(f"Hub dataset {spec}: no column {column!r} (columns: {', '.join(columns)}); set {key}")
    # Decode ourselves (soundfile + soxr): datasets >= 4 would go through torchcodec.
    dataset = dataset.cast_column(audio_column, datasets.Audio(decode=False))
    return HubSource(dataset, audio_column, text_column, f"{spec}:{hub_config or ''}[{split}]")
