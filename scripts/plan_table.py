"""Print the README's memory-planner table (Markdown): estimated peak GiB per GPU, every mode x model x micro-batch.

    python scripts/plan_table.py                       # the README's table: 16 GB card, 1 GPU, micro-batch 16 and 8
    python scripts/plan_table.py --gpu-memory 24GB --micro-batches 32,16 --models small,large-v3

Same estimates as ``python -m toolkit plan`` (toolkit/memory/); nothing is loaded or downloaded.
"""

from __future__ import annotations

import argparse

from toolkit.config import WHISPER_MAX_TARGET_POSITIONS
from toolkit.memory import (
    GIB,
    MODE_NAMES,
    Estimate,
    Scenario,
    estimate_modes,
    load_stats,
    parse_memory,
    recommend,
)


def table(models: list[str], micro_batches: list[int], gpu_memory: int, gpus: int, label_tokens: int,
          gradient_checkpointing: bool) -> str:
    stats = {name: load_stats(name) for name in models}
    columns = [(name, b) for name in models for b in micro_batches]
    estimates: dict[tuple[str, int], dict[str, Estimate]] = {}
    for name, b in columns:
        scenario = Scenario(stats[name], gpus=gpus, micro_batch=b, label_tokens=label_tokens,
                            gradient_checkpointing=gradient_checkpointing)
        estimates[name, b] = {e.mode: e for e in estimate_modes(scenario)}
    header = ["mode"] + [f"{stats[name].name.removeprefix('whisper-')} B={b}" for name, b in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * len(columns)]
    for mode in MODE_NAMES:
        cells = []
        for column in columns:
            e = estimates[column][mode]
            cells.append(f"{e.total / GIB:.1f} {'✓' if e.fits(gpu_memory) else '✗'}")
        lines.append(f"| `{mode}` | " + " | ".join(cells) + " |")
    picks = []
    for column in columns:
        best = recommend(list(estimates[column].values()), gpu_memory)
        picks.append(f"`{best.mode}`" if best else "none")
    lines.append("| **recommended** | " + " | ".join(picks) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small,medium,large-v3,turbo")
    parser.add_argument("--micro-batches", default="16,8")
    parser.add_argument("--gpu-memory", default="16GB")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--label-tokens", type=int, default=WHISPER_MAX_TARGET_POSITIONS)
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    args = parser.parse_args()
    print(table(
        [m.strip() for m in args.models.split(",")], [int(b) for b in args.micro_batches.split(",")],
        parse_memory(args.gpu_memory), args.gpus, args.label_tokens, not args.no_gradient_checkpointing,
    ))


if __name__ == "__main__":
    main()
