"""How much could grouping training batches by label length save? An upper bound from the FLOP count.

Every label in a micro-batch is padded to the batch's longest, so the decoder computes on padding.
This compares the analytic training FLOPs (:mod:`toolkit.flops`) of random micro-batches (the
toolkit's seeded order) with those of batches of sorted lengths (the best any grouping could do),
and prints one JSON line per micro-batch size. On espeak train with tiny.en (2026-11-26): 1.1% at
micro-batch 8, 1.4% at 16, 2.0% at 64, so the toolkit does not group (README, speed).

    .venv/bin/python scripts/bench_grouping.py --model ../shared/models/whisper-tiny.en \
        --data ../shared/data/espeak-en/train
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from transformers import WhisperConfig, WhisperTokenizer

from toolkit.flops import training_flops


def padded_flops(config: WhisperConfig, batches: list[np.ndarray]) -> int:
    """Training FLOPs when every label of a batch is as long as the batch's longest."""
    return sum(training_flops(config, [int(b.max())] * len(b), False) for b in batches)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a local Whisper directory (config and tokenizer)")
    parser.add_argument("--data", required=True, help="an audiofolder (metadata.csv)")
    parser.add_argument("--text-column", default="sentence")
    parser.add_argument("--micro", type=int, nargs="+", default=[8, 16, 64])
    args = parser.parse_args(argv)
    config = WhisperConfig.from_pretrained(args.model)
    tokenizer = WhisperTokenizer.from_pretrained(args.model)
    with (Path(args.data) / "metadata.csv").open() as handle:
        texts = [row[args.text_column] for row in csv.DictReader(handle)]
    lengths = np.asarray([len(ids) - 1 for ids in tokenizer(texts).input_ids])
    order = np.random.default_rng(0).permutation(len(lengths))
    for micro in args.micro:
        shuffled = [lengths[order[i : i + micro]] for i in range(0, len(order), micro)]
        grouped = [np.sort(lengths)[i : i + micro] for i in range(0, len(order), micro)]
        base, best = padded_flops(config, shuffled), padded_flops(config, grouped)
        print(json.dumps({"micro_batch": micro, "random_flops": base, "grouped_flops": best,
                          "saving_percent": round(100 * (1 - best / base), 2),
                          "label_tokens_mean": round(float(lengths.mean()), 1), "label_tokens_max": int(lengths.max())}))


if __name__ == "__main__":
    main()
