"""Scale without the data: start-up cost of a run over a synthetic shard index of N clips.

``--write`` builds a prepared directory's ``index.json`` and shard tables for N clips (entries
only: no tar, no audio; durations 1-30 s, about 2.6 words per second, English words), as
``toolkit prepare`` would. The measurement then runs in a fresh process, through the functions a
training run's start-up calls, and reports each stage's wall time and the peak RSS after it:

1. ``open``: ``open_split`` reads the index and every shard table into one Arrow table;
2. ``tokenize``: ``load_split`` tokenises every transcript and applies the label-length filter;
3. ``targets``: ``attach_targets`` (the timestamp and previous-text layouts);
4. ``packer`` (``--packing``): ``Packer.build`` (per-clip label token counts);
5. ``locate``: the sampler finds step ``--step``'s units (with packing, every epoch before it is laid out).

    .venv/bin/python scripts/bench_shard_index.py --clips 2000000 --workdir /tmp/sim \\
        --tokenizer ../shared/models/whisper-tiny.en [--packing] [--step 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = (
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "silver",
    "swans", "swim", "past", "an", "old", "red", "barn", "near", "the", "station", "and", "every",
    "painter", "moved", "his", "ladder", "into", "a", "bright", "garden", "before", "the", "long",
    "evening", "train",
)


def write_index(out: Path, clips: int, shard_size: int, seed: int = 0) -> dict[str, float]:
    """``index.json`` plus ``shard-NNNNNN.json`` tables for ``clips`` synthetic entries."""
    from toolkit.data.prepare import INDEX_NAME, SHARDS_FORMAT, SHARDS_VERSION, shard_name

    tick = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards, total_seconds, total_bytes = [], 0.0, 0
    for j, start in enumerate(range(0, clips, shard_size)):
        n = min(shard_size, clips - start)
        durations = np.round(rng.uniform(1.0, 30.0, n) ** 0.5 * rng.uniform(0.6, 1.9, n), 3).clip(1.0, 30.0)
        sizes = (durations * 18_000).astype(np.int64)  # about 16-bit FLAC of speech
        offsets = np.cumsum(sizes + 1536) - sizes
        texts = [" ".join(rng.choice(WORDS, max(1, int(d * 2.6)))).capitalize() + "." for d in durations]
        ends = [round(float(d) - 0.1, 2) for d in durations]
        columns = {"id": [f"clip-{start + i:09d}" for i in range(n)], "text": texts,
                   "duration": durations.tolist(), "scale": [1.0] * n,
                   "segments": [json.dumps([[0.1, e, t]]) for e, t in zip(ends, texts, strict=True)],
                   "recording": [""] * n, "no_speech": [False] * n,
                   "offset": offsets.tolist(), "size": sizes.tolist()}
        key = f"{j:032x}"
        size = int(offsets[-1] + sizes[-1] + 1024)
        table = {"key": key, "name": shard_name(j, "tar"), "rows": [start, start + n], "bytes": size,
                 "sha256": key * 2, "samples": n, "seconds": float(durations.sum()), "columns": columns, "skipped": []}
        (out / shard_name(j, "json")).write_text(json.dumps(table))
        shards.append({"name": shard_name(j, "tar"), "table": shard_name(j, "json"), "key": key, "sha256": key * 2,
                       "samples": n, "seconds": float(durations.sum()), "bytes": size})
        total_seconds += float(durations.sum())
        total_bytes += size
    index = {"format": SHARDS_FORMAT, "version": SHARDS_VERSION, "source": "synthetic", "settings": {},
             "samples": clips, "seconds": total_seconds, "hours": total_seconds / 3600, "bytes": total_bytes,
             "source_rows": clips, "skipped": 0, "shards": shards}
    (out / INDEX_NAME).write_text(json.dumps(index))
    return {"write_seconds": round(time.perf_counter() - tick, 1), "hours": round(total_seconds / 3600, 1),
            "shards": len(shards), "tables_mb": round(sum(p.stat().st_size for p in out.glob("*.json")) / 2**20, 1)}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Stages:
    """Wall time and peak RSS at the end of each named stage."""

    def __init__(self) -> None:
        self.start = self.tick = time.perf_counter()
        self.stages: dict[str, dict[str, float]] = {}

    def stage(self, name: str) -> None:
        now = time.perf_counter()
        self.stages[name] = {"seconds": round(now - self.tick, 2), "peak_rss_mb": round(rss_mb())}
        self.tick = now


def measure(args: argparse.Namespace) -> dict[str, object]:
    from transformers import WhisperTokenizerFast

    from toolkit.config import DataConfig
    from toolkit.data.dataset import attach_targets
    from toolkit.data.packing import Packer
    from toolkit.data.pipeline import load_split, open_split
    from toolkit.training.batching import BatchPlan, StepSampler

    tokenizer = WhisperTokenizerFast.from_pretrained(args.tokenizer)
    watch = Stages()
    stage = watch.stage
    stage("imports")
    data_cfg = DataConfig(train=str(args.workdir), cache_dir=str(args.workdir / "cache"))
    source = open_split("train", data_cfg)
    stage("open")
    train = load_split("train", data_cfg, tokenizer, source)
    stage("tokenize")
    vocab_size = json.loads((Path(args.tokenizer) / "config.json").read_text())["vocab_size"]
    attach_targets(train.dataset, tokenizer, vocab_size, seed=42, timestamp_probability=0.5,
                   previous_probability=0.2, token_cache=data_cfg.resolved_cache_dir() / "tokens")
    stage("targets")
    layout = None
    if args.packing:
        train.dataset.packer = Packer.build(train.dataset, tokenizer, 448)
        layout = partial(train.dataset.packer.layout, durations=train.dataset.durations)  # as the loop does
        stage("packer")
    sampler = StepSampler(len(train.dataset), 42, 0, layout=layout)
    plan = BatchPlan(args.global_batch, args.global_batch, 1)
    units = sampler.step_items(args.step, plan)
    stage("locate")
    again = time.perf_counter()
    sampler.step_items(args.step + 1, plan)
    return {"clips": len(train.dataset), "packing": args.packing, "step": args.step, "units": len(units),
            "startup_seconds": round(watch.tick - watch.start, 1),
            "next_step_ms": round((time.perf_counter() - again) * 1000, 2), "peak_rss_mb": round(rss_mb()),
            "stages": watch.stages}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=2_000_000)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--tokenizer", required=True, help="a Whisper checkpoint directory (its tokenizer)")
    p.add_argument("--packing", action="store_true")
    p.add_argument("--step", type=int, default=100_000)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure_only:
        print(json.dumps(measure(args)))
        return
    written = write_index(args.workdir, args.clips, args.shard_size)
    cmd = [sys.executable, __file__, "--measure-only", *sys.argv[1:]]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "true"})
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    print(json.dumps({**written, **json.loads(out.stdout.strip().splitlines()[-1])}))


if __name__ == "__main__":
    main()
