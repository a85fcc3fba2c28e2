"""``python -m toolkit bench features``: cached features against features computed per batch.

It compares the two ways to feed log-mel features to the model:

* **store**: compute the 80x3000 float32 features once and read them back per batch
  (960 KB per clip whatever its length);
* **compute**: cache only the 16 kHz audio (16-bit FLAC) and compute the features per batch: with
  the feature extractor (``data.features_on: workers``) or with :class:`~toolkit.data.logmel.LogMel`
  from the int16 samples (``device``; here on the CPU).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit.data import pcm
from toolkit.data.audio import SAMPLING_RATE
from toolkit.data.logmel import LogMel
from toolkit.data.preprocess import prepare_split
from toolkit.data.sources import open_source


def _drop_page_cache(path: Path) -> bool:
    """Ask the kernel to forget the file's pages, so the next read comes from disk."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_features(data: str, model: str, samples: int, batch_size: int, workdir: str | None) -> dict[str, Any]:
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor.from_pretrained(model)
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="toolkit-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        source = open_source(data, split="train", text_column="sentence")
        prepared = prepare_split(source, "bench", root / "cache", max_items=samples)
        table = prepared.dataset  # python objects: numpy's bytes scalars drop trailing NUL bytes
        rows = [table[i] for i in range(len(table))]
        tick = time.perf_counter()
        decoded = [pcm.decode(row["flac"]) for row in rows]
        decode_s = (time.perf_counter() - tick) / len(rows)
        audio = [pcm.to_float(x, float(row["scale"])) for x, row in zip(decoded, rows, strict=True)]
        n = len(audio)
        batches = [audio[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
        mean_seconds = float(np.mean([len(a) for a in audio])) / SAMPLING_RATE

        tick = time.perf_counter()
        for batch in batches:
            extractor(batch, sampling_rate=SAMPLING_RATE, return_tensors="pt")
        compute_s = (time.perf_counter() - tick) / (len(batches) * batch_size)

        logmel = LogMel(extractor)
        tick = time.perf_counter()
        for start in range(0, n - batch_size + 1, batch_size):
            chunk = decoded[start : start + batch_size]
            padded = np.zeros((len(chunk), max(len(x) for x in chunk)), dtype=np.int16)
            for row, x in enumerate(chunk):
                padded[row, : len(x)] = x
            logmel(torch.from_numpy(padded), torch.ones(len(chunk)))
        logmel_s = (time.perf_counter() - tick) / (len(batches) * batch_size)

        store = root / "features.f32"
        tick = time.perf_counter()
        out = np.lib.format.open_memmap(store, mode="w+", dtype=np.float32, shape=(n, 80, 3000))
        for start in range(0, n, batch_size):
            out[start : start + batch_size] = extractor(
                audio[start : start + batch_size], sampling_rate=SAMPLING_RATE, return_tensors="np"
            ).input_features
        out.flush()
        del out
        store_write_s = time.perf_counter() - tick

        order = np.random.default_rng(0).permutation(n)
        reads = {}
        for label in ("cold", "warm"):
            if label == "cold" and not _drop_page_cache(store):
                continue
            features = np.load(store, mmap_mode="r")
            tick = time.perf_counter()
            for start in range(0, n - batch_size + 1, batch_size):
                np.ascontiguousarray(features[np.sort(order[start : start + batch_size])])
            reads[label] = (time.perf_counter() - tick) / (len(batches) * batch_size)

        audio_bytes = _dir_bytes(root / "cache")
        return {
            "clips": n,
            "mean_clip_seconds": round(mean_seconds, 2),
            "batch_size": batch_size,
            "compute_ms_per_clip": round(1000 * compute_s, 3),
            "logmel_from_int16_ms_per_clip": round(1000 * logmel_s, 3),
            "flac_decode_ms_per_clip": round(1000 * decode_s, 3),
            "store_read_ms_per_clip_warm": round(1000 * reads["warm"], 3),
            "store_read_ms_per_clip_cold": round(1000 * reads["cold"], 3) if "cold" in reads else None,
            "store_write_s_total": round(store_write_s, 2),
            "feature_store_kb_per_clip": round(store.stat().st_size / n / 1024, 1),
            "audio_cache_kb_per_clip": round(audio_bytes / n / 1024, 1),
            "audio_cache_mb_per_audio_hour": round(audio_bytes / (n * mean_seconds) * 3600 / 1e6, 1),
            "feature_store_mb_per_audio_hour": round(store.stat().st_size / (n * mean_seconds) * 3600 / 1e6, 1),
            "torch_threads": __import__("torch").get_num_threads(),
        }
    finally:
        if not workdir:
            shutil.rmtree(root, ignore_errors=True)
