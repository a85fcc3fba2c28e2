"""Data sources: turn a ``data.train``/``data.eval`` spec into an indexable list of (audio, text) items.

Three forms are accepted:

* a local ``audiofolder`` directory: ``metadata.csv`` (or ``.jsonl``) with ``file_name`` and a text column;
  a directory without metadata may hold one sub-directory per split (``train/``, ``dev/``);
* a CSV/TSV/JSONL manifest with an audio path column and a text column, paths relative to the manifest;
* a Hub dataset id, with ``hub_config`` and a split expression such as ``train+validation``.

Listing never decodes audio: a missing file is found (and counted as a skip) during preprocessing,
so one bad row cannot stop a run. A manifest that is malformed as a whole or in its structure (a row
with more fields than the header, a transcript that is a JSON list or number) is a :class:`DataError`
naming the file and line: reading such a row some other way would train on a wrong transcript.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

AUDIO_COLUMN_CANDIDATES = ("file_name", "audio", "audio_filepath", "path", "audio_path", "file")
MANIFEST_SUFFIXES = {".csv": ",", ".tsv": "\t", ".jsonl": None, ".json": None}
EMPTY_PATH = "<empty path>"
"""The id of a row without an audio path (it is skipped as a missing file)."""
FILE_SUFFIXES = {*MANIFEST_SUFFIXES, ".txt", ".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".parquet",
                 ".arrow", ".yaml", ".yml", ".zip", ".tar", ".gz", ".tgz"}
"""Suffixes that make a spec a file name, never a Hub id (Hub ids may hold dots: ``org/set.v2``)."""
HUB_LOOKUP_TIMEOUT_S = 10.0
"""One metadata request, the Hub client's own default; an unresolvable host fails at once."""


class DataError(ValueError):
    """The data spec cannot be used at all (as opposed to one bad sample, which is skipped)."""


@dataclass(frozen=True)
class Extras:
    """What a row may say besides its audio and transcript (all optional manifest columns)."""

    segments: str | None = None
    """``segments``: JSON list of ``{start, end, text}`` (seconds in the file), checked when decoded."""
    recording: str | None = None
    """``recording``: which recording the clip comes from; its rows follow each other in manifest
    order, so the row before is the previous utterance (for previous-text prompts)."""
    no_speech: bool = False
    """``no_speech``: the clip is silence or noise; its transcript must be empty."""


NO_EXTRAS = Extras()


@dataclass(frozen=True)
class LocalItem:
    """One row of a local source: an audio file and its transcript."""

    id: str
    path: str
    text: str | None
    extras: Extras = NO_EXTRAS


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

    def extras(self, index: int) -> Extras:
        """The row's optional columns (segments, recording, no-speech); none for Hub datasets yet."""
        return NO_EXTRAS

    def duplicates(self) -> list[int]:
        """Indices of rows that repeat an earlier row; only local sources are checked (see LocalSource)."""
        return []

    def without(self, indices: list[int]) -> Source:
        """This source less the rows at ``indices`` (for the rows :meth:`duplicates` finds)."""
        raise NotImplementedError  # pragma: no cover - interface


class LocalSource(Source):
    """Rows of a local manifest or audiofolder, audio as resolved paths."""

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
            key = [item.id, item.path, file_key, item.text]
            if item.extras != NO_EXTRAS:
                key.append(dataclasses.astuple(item.extras))
            digest.update(json.dumps(key).encode())
        return digest.hexdigest()

    def get(self, index: int) -> tuple[str, str | bytes | None, str | None]:
        item = self.items[index]
        return item.id, item.path, item.text

    def extras(self, index: int) -> Extras:
        return self.items[index].extras

    def duplicates(self) -> list[int]:
        """Rows that name the same audio file (resolved path) with the same transcript (stripped, as
        it is trained) as an earlier row: they would be the same training example twice. The same
        file with another transcript is not a duplicate (it may be a correction); rows without a
        path or a transcript are left to the skips that they already get."""
        seen: set[tuple[str, str]] = set()
        repeats = []
        for index, item in enumerate(self.items):
            if item.text is None or not item.text.strip() or item.id == EMPTY_PATH:
                continue
            key = (item.path, item.text.strip())
            if key in seen:
                repeats.append(index)
            seen.add(key)
        return repeats

    def without(self, indices: list[int]) -> LocalSource:
        """This source less the rows at ``indices``."""
        drop = set(indices)
        return LocalSource([item for i, item in enumerate(self.items) if i not in drop], self.description)


class HubSource(Source):
    """A ``datasets.Dataset`` whose audio column is read undecoded (bytes + path)."""

    def __init__(self, dataset: Any, audio_column: str, text_column: str, description: str):
        self.dataset = dataset
        self.audio_column = audio_column
        self.text_column = text_column
        self.description = description
        present = [c for c in ("segments", "recording", "no_speech") if c in dataset.column_names]
        self._extra_columns = dataset.select_columns(present) if present else None

    def __len__(self) -> int:
        return len(self.dataset)

    def fingerprint(self, start: int, stop: int) -> str:
        key = [self.dataset._fingerprint, self.audio_column, self.text_column, start, stop]
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()

    def extras(self, index: int) -> Extras:
        """The row's ``segments``, ``recording`` and ``no_speech`` columns, where the dataset has them
        (``segments`` as a list of ``{start, end, text}``, the dict of lists a ``Sequence`` feature
        gives, or JSON text); checked as a manifest's are."""
        if self._extra_columns is None:
            return NO_EXTRAS
        return row_extras(f"{self.description} row {index}", dict(self._extra_columns[index]))

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
    # Decide here, without the network, what cannot be a Hub id: asking the Hub about a mistyped
    # local path costs its retries (about 30 s without a network) and ends in a misleading message.
    missing = f"no such directory or file: {spec}"
    if not path.is_absolute():
        missing += f" (relative to {Path.cwd()})"
    if _looks_like_path(spec):
        raise DataError(f"{missing}; a data spec is an audiofolder directory, a manifest or a Hub dataset id")
    if not _is_hub_id(spec):
        raise DataError(f"{missing}, and {spec!r} is not a valid Hub dataset id either")
    return _open_hub(spec, split, hub_config, text_column, audio_column, missing)


def _looks_like_path(spec: str) -> bool:
    """A local path, never a Hub id (``namespace/name``, at most one slash, no file suffix)."""
    return (
        spec.startswith((".", "/", "~"))
        or "\\" in spec
        or spec.endswith("/")
        or spec.count("/") > 1
        or Path(spec).suffix.lower() in FILE_SUFFIXES
    )


def _is_hub_id(spec: str) -> bool:
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(spec)
    except ValueError:  # HFValidationError
        return False
    return True


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


Row = tuple[str, Any]
"""A manifest row and where it is (``file:line``), for messages."""


def _read_text(path: Path) -> str:
    """The file as text; a byte-order mark (Excel writes one) is dropped, not taken into the header."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}); save it as UTF-8") from None
    if "\x00" in text:  # UTF-16 without a BOM decodes as "UTF-8" with a NUL after every ASCII letter
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise DataError(f"{path} holds a NUL byte on line {line}: a binary file, or UTF-16 text? save it as UTF-8")
    return text


def _read_rows(path: Path) -> list[Row]:
    suffix = path.suffix.lower()
    text = _read_text(path)
    delimiter = MANIFEST_SUFFIXES[suffix]
    if delimiter is not None:
        return _read_delimited(path, text, delimiter)
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        rows = [(f"{path}: row {n}", row) for n, row in enumerate(data, 1)]
    else:
        rows = []
        # Split on newlines only: str.splitlines() also breaks at U+2028, which JSON strings may hold.
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where}: a row must be an object with an audio path and a text field, not {_kind(row)}")
    return rows


def _read_delimited(path: Path, text: str, delimiter: str) -> list[Row]:
    """CSV/TSV rows as dicts. Strict: a row with more fields than the header (an unquoted comma in a
    transcript) or an unclosed quote (which would swallow the rows after it) is an error, not a
    silently truncated or merged transcript."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    start = 1  # the line the record being read begins on
    try:
        header = next(reader, None)
        if header is None:
            return []
        columns = [name.strip() for name in header]
        rows = []
        start = reader.line_num + 1
        for fields in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1
            if not fields:
                continue
            if len(fields) > len(columns):
                name = "tab" if delimiter == "\t" else "comma"
                raise DataError(
                    f"{where}: {len(fields)} fields but the header has {len(columns)}; "
                    f"quote a transcript that holds a {name} (\"...\")"
                )
            # A short row gets None for what it lacks, as csv.DictReader does: an empty transcript skip.
            padded = [*fields, *[None] * (len(columns) - len(fields))]
            rows.append((where, dict(zip(columns, padded, strict=True))))
    except csv.Error as exc:
        raise DataError(f"{path}:{start}: malformed row ({exc}); is a quote left open?") from None
    return rows


def _kind(value: Any) -> str:
    """``a list``, ``a number``...: what a JSON value is, for messages."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {list: "a list", dict: "an object", str: "a string"}.get(type(value), type(value).__name__)


def _open_manifest(
    path: Path, text_column: str, audio_column: str | None, description: str | None = None
) -> LocalSource:
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"{path}: the manifest has no rows")
    columns = list(rows[0][1].keys())
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
    for where, row in rows:
        rel, text = row.get(audio_column), row.get(text_column)
        # Anything but a string (or null) would be trained on as its Python repr: "[1, 2]", "True".
        for column, value in ((audio_column, rel), (text_column, text)):
            if value is not None and not isinstance(value, str):
                raise DataError(f"{where}: {column!r} is {_kind(value)} ({json.dumps(value)[:60]}), not a string")
        rel = rel or ""
        if "\x00" in rel:  # from a JSON "\u0000": no path can hold one (and pathlib raises on it)
            raise DataError(f"{where}: {audio_column!r} holds a NUL character, which no file name can")
        audio_path = (base / rel).resolve() if rel else base / EMPTY_PATH
        items.append(LocalItem(id=rel or EMPTY_PATH, path=str(audio_path), text=text, extras=_extras(where, row)))
    return LocalSource(items, description or str(path))


TRUE_WORDS, FALSE_WORDS = {"true", "1", "yes"}, {"false", "0", "no", ""}


def row_extras(where: str, row: dict[str, Any]) -> Extras:
    """A dataset row's ``segments``, ``recording`` and ``no_speech`` (any it has), ``segments`` also as
    the dict of lists that a ``Sequence`` feature gives."""
    segments = row.get("segments")
    if isinstance(segments, dict) and set(segments) >= {"start", "end", "text"}:
        row = {**row, "segments": [dict(zip(("start", "end", "text"), values, strict=True))
                                   for values in zip(segments["start"], segments["end"], segments["text"], strict=True)]}
    return _extras(where, {k: row[k] for k in ("segments", "recording", "no_speech") if k in row})


def _extras(where: str, row: dict[str, Any]) -> Extras:
    """The optional columns of a manifest row; their structure is checked here (a malformed column
    is a :class:`DataError`), their content (segment times) when the audio is decoded."""
    segments, recording, no_speech = row.get("segments"), row.get("recording"), row.get("no_speech")
    if segments is not None and not isinstance(segments, (str, list)):
        raise DataError(f"{where}: 'segments' is {_kind(segments)}, not a JSON list of {{start, end, text}}")
    if isinstance(segments, list):  # a JSONL manifest (or a Hub row) holds the list itself; [] is none
        segments = json.dumps(segments) if segments else None
    if recording is not None and not isinstance(recording, (str, int)):
        raise DataError(f"{where}: 'recording' is {_kind(recording)}, not a name")
    if isinstance(no_speech, str):
        if no_speech.strip().lower() not in TRUE_WORDS | FALSE_WORDS:
            raise DataError(f"{where}: 'no_speech' is {no_speech!r}; use true or false")
        no_speech = no_speech.strip().lower() in TRUE_WORDS
    elif no_speech is not None and not isinstance(no_speech, bool):
        raise DataError(f"{where}: 'no_speech' is {_kind(no_speech)}; use true or false")
    extras = Extras(segments or None, str(recording) if recording not in (None, "") else None, bool(no_speech))
    return extras if extras != NO_EXTRAS else NO_EXTRAS


def _open_hub(
    spec: str, split: str, hub_config: str | None, text_column: str, audio_column: str | None, missing: str
) -> Source:
    import datasets

    # Offline, load_dataset only looks in the local cache (fast), where a Hub dataset may well be.
    offline = hub_offline()
    if not offline:
        _look_up_on_hub(spec, missing)
    try:
        dataset = datasets.load_dataset(spec, hub_config, split=split)
    except Exception as exc:  # the Hub raises many types: connection, auth, missing config
        hint = (
            "HF_HUB_OFFLINE is set: only the local Hub cache was searched" if offline
            else "Offline? Use a local directory or manifest instead"
        )
        raise DataError(
            f"{missing}, and could not load Hub dataset {spec!r} (config {hub_config!r}, split {split!r}): "
            f"{_one_line(exc)}. {hint}."
        ) from None
    columns = dataset.column_names
    audio_column = audio_column or "audio"
    for column, key in ((audio_column, "data.audio_column"), (text_column, "data.text_column")):
        if column not in columns:
            raise DataError(f"Hub dataset {spec}: no column {column!r} (columns: {', '.join(columns)}); set {key}")
    text_feature = dataset.features[text_column]
    if getattr(text_feature, "dtype", None) not in ("string", "large_string"):
        raise DataError(f"Hub dataset {spec}: column {text_column!r} holds {text_feature}, not text; set data.text_column")
    # Decode ourselves (soundfile + soxr): datasets >= 4 would go through torchcodec.
    dataset = dataset.cast_column(audio_column, datasets.Audio(decode=False))
    return HubSource(dataset, audio_column, text_column, f"{spec}:{hub_config or ''}[{split}]")


def _look_up_on_hub(spec: str, missing: str) -> None:
    """One quick metadata request, so that an unknown name or an unreachable Hub is a one-line error
    at once rather than after ``load_dataset``'s retries (about 30 s without a network)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi().dataset_info(spec, timeout=HUB_LOOKUP_TIMEOUT_S)
    except GatedRepoError:
        return  # it exists; load_dataset reports access (with the token it is given) itself
    except RepositoryNotFoundError:
        raise DataError(f"{missing}, and no Hub dataset {spec!r} (a private one needs `hf auth login`)") from None
    except HfHubHTTPError as exc:
        raise DataError(f"{missing}, and the Hub lookup of {spec!r} failed: {_one_line(exc)}") from None
    except Exception as exc:  # connection errors: the HTTP client's own types, OSError, timeouts
        raise DataError(
            f"{missing}, and the Hub is unreachable to look up {spec!r} ({_one_line(exc)}); "
            "with a cached copy of a Hub dataset, set HF_HUB_OFFLINE=1"
        ) from None


def hub_offline() -> bool:
    """HF_HUB_OFFLINE, as huggingface_hub, datasets or the environment set it."""
    import datasets
    import huggingface_hub.constants

    return bool(huggingface_hub.constants.HF_HUB_OFFLINE or getattr(datasets.config, "HF_HUB_OFFLINE", False)
                or _env_true("HF_HUB_OFFLINE"))


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _one_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception: library messages run over several lines."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
