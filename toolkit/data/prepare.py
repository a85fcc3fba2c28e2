"""``toolkit prepare``: decode and filter a source once, into WebDataset tar shards plus an index.

Shard ``j`` holds what source rows ``j*shard_size`` up to ``(j+1)*shard_size`` give after the same
decoding, skip rules and 30 s cutting as the training cache (:func:`toolkit.data.preprocess.process_chunk`):
per sample a ``KEY.flac`` (16 kHz 16-bit FLAC) and a ``KEY.json`` (id, text, duration, scale,
segments, recording, no_speech, language), so any WebDataset reader can use the shards. Beside each
``shard-NNNNNN.tar`` a ``shard-NNNNNN.json`` table holds the same metadata column by column plus each
FLAC member's byte offset and size: a reader needs no tar scan, and the sampler has every duration
and transcript without touching audio (:mod:`toolkit.data.shards`).

A shard's key hashes its rows' content fingerprint and the settings. A rerun keeps every shard whose
table carries the expected key and rebuilds the rest. The tar, then its table, are each written to a
temp name and renamed: the table is the commit mark, so a killed task leaves no shard half-listed.

Tasks: task ``i`` of ``n`` builds the shards ``j`` with ``j % n == i`` (a Slurm array task each:
``slurm/prepare.sbatch``), with ``num_proc`` worker processes. Whichever task finds every shard
current when it ends writes ``index.json`` and ``skipped.jsonl`` (atomically; two that finish
together write the same bytes) and removes shards left from a larger earlier layout.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from toolkit.data.audio import SAMPLING_RATE
from toolkit.data.preprocess import FORMAT_VERSION, process_chunk
from toolkit.data.sources import DataError, Source

logger = logging.getLogger(__name__)

SHARDS_FORMAT = "whisper-toolkit-shards"
SHARDS_VERSION = 1
INDEX_NAME = "index.json"
SKIPPED_NAME = "skipped.jsonl"
SHARD_NAME = re.compile(r"^shard-(\d{6})\.(tar|json)$")
COLUMNS = ("id", "text", "duration", "scale", "segments", "recording", "no_speech", "offset", "size")
"""A shard table's per-sample columns (``offset``/``size``: the FLAC member's bytes in the tar)."""


@dataclass(frozen=True)
class PrepareSettings:
    """What a prepared sample depends on besides its source rows (all in every shard key)."""

    shard_size: int = 1000
    """Source rows per shard (a long recording's windows all go to its row's shard)."""
    max_duration_s: float = 30.0
    language: str | None = None
    """Stamped on every sample (its ``.json`` and the table); multi-corpus runs read it."""


def shard_name(index: int, suffix: str) -> str:
    return f"shard-{index:06d}.{suffix}"


def shard_bounds(total: int, shard_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + shard_size, total)) for start in range(0, total, shard_size)]


def shard_key(source: Source, start: int, stop: int, settings: PrepareSettings) -> str:
    parts = [SHARDS_VERSION, FORMAT_VERSION, SAMPLING_RATE, settings.max_duration_s, settings.language,
             source.fingerprint(start, stop)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def read_table(path: Path) -> dict[str, Any] | None:
    """A shard table, or None when it is missing or unreadable (then the shard is rebuilt)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_current(out: Path, index: int, key: str) -> bool:
    table = read_table(out / shard_name(index, "json"))
    if table is None or table.get("key") != key:
        return False
    tar = out / shard_name(index, "tar")
    return tar.is_file() and tar.stat().st_size == table.get("bytes")


def build_shard(source: Source, index: int, start: int, stop: int, out: Path, settings: PrepareSettings) -> int:
    """Decode rows ``start:stop`` into shard ``index`` (tar, then table, each renamed into place)."""
    rows, skips = process_chunk(source, start, stop, "prepare", target_sr=SAMPLING_RATE,
                                max_duration_s=settings.max_duration_s)
    columns: dict[str, list[Any]] = {name: [] for name in COLUMNS}
    tar_path = out / shard_name(index, "tar")
    tmp = tar_path.with_name(f".{tar_path.name}.tmp-{os.getpid()}")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for n in range(len(rows["id"])):
            meta = {name: rows[name][n] for name in ("id", "text", "duration", "scale", "segments",
                                                     "recording", "no_speech")}
            meta["language"] = settings.language
            key = f"{n:06d}"
            for suffix, payload in (("flac", rows["flac"][n]), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime, info.mode = len(payload), 0, 0o644  # mtime 0: same input, same bytes
                tar.addfile(info, io.BytesIO(payload))
            for name in meta:
                if name in columns:
                    columns[name].append(meta[name])
    with tarfile.open(tmp) as tar:  # where each FLAC member's bytes landed
        for member in tar.getmembers():
            if member.name.endswith(".flac"):
                columns["offset"].append(member.offset_data)
                columns["size"].append(member.size)
    digest = hashlib.sha256()
    with open(tmp, "rb") as stream:  # a block at a time: a shard may be larger than memory allows
        while block := stream.read(1 << 20):
            digest.update(block)
    size = tmp.stat().st_size
    os.replace(tmp, tar_path)
    table = {"key": shard_key(source, start, stop, settings), "name": tar_path.name, "rows": [start, stop],
             "bytes": size, "sha256": digest.hexdigest(), "samples": len(rows["id"]),
             "seconds": round(float(sum(columns["duration"])), 3), "columns": columns,
             "skipped": [asdict(skip) for skip in skips]}
    _write_atomic(out / shard_name(index, "json"), json.dumps(table))
    return len(rows["id"])


def _build_job(args: tuple[Any, ...]) -> int:
    return build_shard(*args)


@dataclass
class PrepareResult:
    built: int
    reused: int
    samples_built: int
    seconds: float
    index: dict[str, Any] | None
    """The merged index, when this task found every shard current (else another task writes it)."""


def prepare(source: Source, out: Path, settings: PrepareSettings, *, task: int = 0, tasks: int = 1,
            num_proc: int = 1, max_items: int | None = None) -> PrepareResult:
    """Build this task's missing or stale shards, then merge the index if every shard is current."""
    if not 0 <= task < tasks:
        raise DataError(f"--task must be in [0, {tasks}), got {task}")
    total = len(source) if max_items is None else min(len(source), max_items)
    if total == 0:
        raise DataError(f"{source.description}: no items")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create {out} ({exc.strerror or exc})") from None
    tick = time.perf_counter()
    bounds = shard_bounds(total, settings.shard_size)
    keys = [shard_key(source, a, b, settings) for a, b in bounds]
    mine = [j for j in range(len(bounds)) if j % tasks == task]
    stale = [j for j in mine if not is_current(out, j, keys[j])]
    jobs = [(source, j, *bounds[j], out, settings) for j in stale]
    logger.info("prepare: task %d/%d builds %d of its %d shards (%d reused)", task, tasks, len(stale), len(mine),
                len(mine) - len(stale))
    if num_proc > 1 and len(jobs) > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(num_proc, len(jobs)), mp_context=context) as pool:
            samples = sum(pool.map(_build_job, jobs))
    else:
        samples = sum(_build_job(job) for job in jobs)
    index = merge(source, out, settings, bounds, keys)
    return PrepareResult(len(stale), len(mine) - len(stale), samples, time.perf_counter() - tick, index)


def merge(source: Source, out: Path, settings: PrepareSettings, bounds: list[tuple[int, int]],
          keys: list[str]) -> dict[str, Any] | None:
    """Write ``index.json`` and ``skipped.jsonl`` when every shard is current; else None."""
    tables = []
    for j, key in enumerate(keys):
        table = read_table(out / shard_name(j, "json"))
        if table is None or table.get("key") != key:
            logger.info("prepare: shard %d is not built yet (another task's): the index is left to the last task", j)
            return None
        tables.append(table)
    skips = [skip for table in tables for skip in table["skipped"]]
    shards = [{"name": t["name"], "table": shard_name(j, "json"), "key": t["key"], "sha256": t["sha256"],
               "samples": t["samples"], "seconds": t["seconds"], "bytes": t["bytes"]}
              for j, t in enumerate(tables)]
    seconds = sum(s["seconds"] for s in shards)
    index = {
        "format": SHARDS_FORMAT, "version": SHARDS_VERSION, "source": source.description,
        "settings": {**asdict(settings), "sampling_rate": SAMPLING_RATE, "audio": "flac-16bit",
                     "cache_format": FORMAT_VERSION},
        "samples": sum(s["samples"] for s in shards), "seconds": round(seconds, 3),
        "hours": round(seconds / 3600, 4), "bytes": sum(s["bytes"] for s in shards),
        "source_rows": bounds[-1][1], "skipped": len(skips), "shards": shards,
    }
    _write_atomic(out / SKIPPED_NAME, "".join(json.dumps(skip) + "\n" for skip in skips))
    _write_atomic(out / INDEX_NAME, json.dumps(index, indent=1))
    for path in out.iterdir():  # shards of an earlier, longer layout
        match = SHARD_NAME.match(path.name)
        if match and int(match.group(1)) >= len(bounds):
            path.unlink(missing_ok=True)
    return index


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_cli(args: Any) -> int:
    """Run ``toolkit prepare``; prints one JSON line."""
    from toolkit.config import ConfigError, check_writable_dir
    from toolkit.data.sources import open_source

    for name in ("shard_size", "num_proc", "tasks"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.max_duration_s <= 30:
        raise ConfigError(f"--max-duration-s must be in (0, 30], got {args.max_duration_s}")
    check_writable_dir("--out", args.out)
    source = open_source(args.data, split=args.split, text_column=args.text_column, audio_column=args.audio_column,
                         hub_config=args.hub_config)
    settings = PrepareSettings(args.shard_size, args.max_duration_s, args.language)
    result = prepare(source, Path(args.out), settings, task=args.task, tasks=args.tasks, num_proc=args.num_proc,
                     max_items=args.max_samples)
    summary: dict[str, Any] = {"out": args.out, "task": args.task, "tasks": args.tasks, "shards_built": result.built,
                               "shards_reused": result.reused, "seconds": round(result.seconds, 2),
                               "index_written": result.index is not None}
    if result.index is not None:
        summary.update({key: result.index[key] for key in ("samples", "hours", "bytes", "skipped")})
        summary["shards"] = len(result.index["shards"])
    print(json.dumps(summary), flush=True)
    return 0
