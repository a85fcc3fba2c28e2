"""Sharded, cached preprocessing: decode and resample every clip once, store it on disk keyed by content.

The source is cut into fixed chunks of ``CHUNK_SIZE`` items. Each chunk's cache key hashes the items'
fingerprint (path, size, mtime, transcript; or the Hub dataset's fingerprint) and the processing
settings, so the key does not depend on the number of processes: a rerun, a second job, or a job
with another world size reuses every unchanged chunk. Missing chunks are split across ranks
(chunk ``i`` belongs to rank ``i % world``) and, within a rank, across ``num_proc`` worker processes.
A chunk is written to a temp dir and renamed, so a killed job never leaves a half chunk behind.

What is stored is 16 kHz mono audio as 16-bit FLAC (:mod:`toolkit.data.pcm`) plus its text, not
log-mel features: see the README ("Why audio and not log-mel features are cached") for the
measurements behind that choice.
Transcripts are tokenised later (:mod:`toolkit.data.dataset`), so the cache is tokenizer-independent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets

from toolkit.data import pcm
from toolkit.data.audio import SAMPLING_RATE, AudioError, decode_audio
from toolkit.data.segments import (
    WINDOW_SECONDS,
    Segment,
    SegmentError,
    clip_segments,
    cut_windows,
    parse_segments,
)
from toolkit.data.segments import to_json as segments_json
from toolkit.data.sources import DataError, Source

logger = logging.getLogger(__name__)

CHUNK_SIZE = 256
FORMAT_VERSION = 5  # 5: segments, recording, no_speech; 4: 16-bit FLAC + scale; 3: audio past MAX_PEAK is skipped
SKIP_FILE = "skips.json"


@dataclass
class Skip:
    """A sample left out, with why. ``kind`` is ``error`` (bad input) or ``filtered`` (by design)."""

    split: str
    id: str
    reason: str
    kind: str = "error"


@dataclass
class PreparedSplit:
    """The decoded audio of one split, plus what was left out of it."""

    dataset: datasets.Dataset
    skips: list[Skip] = field(default_factory=list)
    chunks_built: int = 0
    chunks_reused: int = 0
    bytes_on_disk: int = 0
    """Size of the split's cache chunks."""



def features() -> datasets.Features:
    return datasets.Features(
        {
            "id": datasets.Value("string"),
            "flac": datasets.Value("binary"),
            "scale": datasets.Value("float32"),
            "text": datasets.Value("string"),
            "duration": datasets.Value("float32"),
            "segments": datasets.Value("string"),
            "recording": datasets.Value("string"),
            "no_speech": datasets.Value("bool"),
        }
    )


def chunk_key(source: Source, start: int, stop: int, *, target_sr: int, max_duration_s: float) -> str:
    settings = [FORMAT_VERSION, target_sr, max_duration_s, source.fingerprint(start, stop)]
    return hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:32]


def process_chunk(
    source: Source, start: int, stop: int, split: str, *, target_sr: int, max_duration_s: float
) -> tuple[dict[str, list[Any]], list[Skip]]:
    """Decode items ``start:stop``; bad ones become :class:`Skip` entries instead of exceptions.

    A recording longer than ``max_duration_s`` with segments becomes several rows, one per window
    (:func:`toolkit.data.segments.cut_windows`), all with the recording's id in ``recording``.
    """
    rows: dict[str, list[Any]] = {name: [] for name in features()}
    skips: list[Skip] = []
    for index in range(start, stop):
        item_id, audio, text = source.get(index)
        extras = source.extras(index)
        text = str(text).strip() if text is not None else ""
        if extras.no_speech and text:
            skips.append(Skip(split, item_id, "a no-speech clip with a transcript"))
            continue
        if not text and not extras.no_speech:
            skips.append(Skip(split, item_id, "empty transcript"))
            continue
        try:
            samples = decode_audio(audio, target_sr)
            duration = len(samples) / target_sr
            given = parse_segments(extras.segments, duration) if extras.segments else None
        except (AudioError, SegmentError) as exc:
            skips.append(Skip(split, item_id, str(exc)))
            continue
        if duration <= max_duration_s:
            segments = [] if extras.no_speech else given or clip_segments(samples, text)
            _add_row(rows, item_id, samples, text, duration, segments, extras.recording, extras.no_speech)
            continue
        if given is None:
            skips.append(Skip(split, item_id, f"longer than {max_duration_s:g} s ({duration:.1f} s) and no "
                                              "segments to cut it by", "filtered"))
            continue
        windows, dropped = cut_windows(given, min(max_duration_s, WINDOW_SECONDS))
        for segment in dropped:
            skips.append(Skip(split, f"{item_id}@{segment.start:.2f}", f"segment longer than a "
                              f"{WINDOW_SECONDS:g} s window ({segment.end - segment.start:.1f} s)", "filtered"))
        for window in windows:
            piece = samples[round(window.start * target_sr) : round(window.end * target_sr)]
            _add_row(rows, f"{item_id}@{window.start:.2f}", piece, window.text, len(piece) / target_sr,
                     window.segments, extras.recording or item_id, False)
    return rows, skips


def _add_row(rows: dict[str, list[Any]], item_id: str, samples: Any, text: str, duration: float,
             segments: list[Segment], recording: str | None, no_speech: bool) -> None:
    flac, scale = pcm.encode(samples)
    values = {"id": item_id, "flac": flac, "scale": scale, "text": text, "duration": duration,
              "segments": segments_json(segments), "recording": recording or "", "no_speech": no_speech}
    for name, value in values.items():
        rows[name].append(value)


def build_chunk(
    source: Source, start: int, stop: int, split: str, target: Path, *, target_sr: int, max_duration_s: float
) -> Path:
    """Process one chunk and publish it atomically at ``target``."""
    rows, skips = process_chunk(source, start, stop, split, target_sr=target_sr, max_duration_s=max_duration_s)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if rows["id"]:
        datasets.Dataset.from_dict(rows, features=features()).save_to_disk(str(tmp))
    else:
        tmp.mkdir(parents=True)  # datasets cannot reload a saved empty table; only skips.json then
    (tmp / SKIP_FILE).write_text(json.dumps([asdict(s) for s in skips]))
    try:
        os.rename(tmp, target)
    except OSError:
        # Another job published the same chunk first; its content is identical by construction.
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build_chunk_job(args: tuple[Any, ...]) -> str:
    source, start, stop, split, target, target_sr, max_duration_s = args
    return str(build_chunk(source, start, stop, split, target, target_sr=target_sr, max_duration_s=max_duration_s))


def prepare_split(
    source: Source,
    split: str,
    cache_dir: Path,
    *,
    rank: int = 0,
    world_size: int = 1,
    num_proc: int = 1,
    barrier: Callable[[], None] = lambda: None,
    max_items: int | None = None,
    target_sr: int = SAMPLING_RATE,
    max_duration_s: float = 30.0,
) -> PreparedSplit:
    """Decode ``source`` into the cache (sharded over ranks and workers) and load the whole split."""
    total = len(source) if max_items is None else min(len(source), max_items)
    if total == 0:
        raise DataError(f"{source.description}: no items")
    chunk_dir = cache_dir / "chunks"
    try:
        chunk_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, no permission, a read-only filesystem
        raise DataError(
            f"cannot create the preprocessing cache {chunk_dir} ({exc.strerror or exc}); "
            "set data.cache_dir or WHISPER_TOOLKIT_CACHE"
        ) from None
    bounds = [(start, min(start + CHUNK_SIZE, total)) for start in range(0, total, CHUNK_SIZE)]
    targets = [
        chunk_dir / chunk_key(source, a, b, target_sr=target_sr, max_duration_s=max_duration_s) for a, b in bounds
    ]
    missing = [i for i, target in enumerate(targets) if not target.is_dir()]
    # Deal by chunk index, not over `missing`: ranks look at the cache at different moments, and a
    # list that shrinks while others build would leave some chunk to nobody.
    mine = [i for i in missing if i % world_size == rank]
    jobs = [(source, *bounds[i], split, targets[i], target_sr, max_duration_s) for i in mine]
    if jobs:
        logger.info("%s: decoding %d of %d chunks on this rank", split, len(jobs), len(targets))
        if num_proc > 1 and len(jobs) > 1:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=min(num_proc, len(jobs)), mp_context=context) as pool:
                list(pool.map(_build_chunk_job, jobs))
        else:
            for job in jobs:
                _build_chunk_job(job)
    barrier()
    parts, skips = [], []
    for target in targets:
        if not target.is_dir():
            raise DataError(f"cache chunk {target} is missing after preprocessing (a rank failed?)")
        if (target / "state.json").is_file():
            parts.append(datasets.load_from_disk(str(target)))
        # The chunk may have been built for another role (train vs eval): report it under this one.
        skips.extend(Skip(**{**s, "split": split}) for s in json.loads((target / SKIP_FILE).read_text()))
    if not parts:
        dataset = datasets.Dataset.from_dict({name: [] for name in features()}, features=features())
    else:
        dataset = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    size = sum(f.stat().st_size for target in targets for f in target.rglob("*") if f.is_file())
    return PreparedSplit(dataset, skips, chunks_built=len(missing), chunks_reused=len(targets) - len(missing),
                         bytes_on_disk=size)
