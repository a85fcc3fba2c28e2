"""``python -m toolkit plan``: its options, the human-readable table, and the ``--json`` lines.

``--gpu-memory`` is the card's total memory (``nvidia-smi --query-gpu=memory.total``), read by
:func:`parse_memory`; everything printed is per GPU.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from toolkit.config import WHISPER_MAX_TARGET_POSITIONS
from toolkit.memory.advice import faster_with_more_gpus, recommend, suggestion
from toolkit.memory.estimate import GIB, Estimate, estimate_modes
from toolkit.memory.modes import COMMON_KEYS, get_mode, launch_config
from toolkit.memory.params import LORA_RANK, LORA_TARGETS, load_stats
from toolkit.memory.scenario import Scenario
from toolkit.memory.sizes import PlanError

_UNITS = {"": GIB, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": GIB, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_memory(text: str) -> int:
    """Bytes in ``16GB`` (10^9), ``15GiB`` (2^30), ``15360 MiB`` (nvidia-smi's form) or a bare number of GiB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise PlanError(f"--gpu-memory: cannot read {text!r}; write it like 16GB, 15GiB or 15360MiB")
    return int(float(match.group(1)) * _UNITS[unit])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``plan`` subcommand's options."""
    parser.add_argument("--model", required=True,
                        help="size (tiny ... large-v3, turbo, .en variants), local model directory, or Hub id")
    parser.add_argument("--gpu-memory", required=True, help="memory per GPU: 16GB (10^9 bytes), 15GiB, 15360MiB")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs in all (one node)")
    parser.add_argument("--micro-batch", type=int, default=16, help="samples per forward pass per GPU")
    parser.add_argument("--label-tokens", type=int, default=WHISPER_MAX_TARGET_POSITIONS,
                        help=f"label tokens per sample ({WHISPER_MAX_TARGET_POSITIONS}, the worst case, by default)")
    parser.add_argument("--no-gradient-checkpointing", action="store_true",
                        help="estimate without activation checkpointing (on by default, as recommended)")
    parser.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa",
                        help="attention implementation (sdpa, transformers' default, keeps no score matrix)")
    parser.add_argument("--lora-rank", type=int, default=LORA_RANK, help="LoRA rank (lora.rank)")
    parser.add_argument("--lora-targets", default=",".join(LORA_TARGETS),
                        help="comma-separated LoRA target modules (lora.target_modules)")
    parser.add_argument("--json", action="store_true", help="one JSON object per mode per line")


def scenario_from_args(args: argparse.Namespace) -> Scenario:
    """The :class:`Scenario` the ``plan`` options describe (loads the model's stats)."""
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    return Scenario(load_stats(args.model), gpus=args.gpus, micro_batch=args.micro_batch,
                    label_tokens=args.label_tokens, gradient_checkpointing=not args.no_gradient_checkpointing,
                    attention=args.attention, lora_rank=args.lora_rank, lora_targets=targets)


def _gib(value: int) -> str:
    return f"{value / GIB:.2f}"


def _params(n: int) -> str:
    return f"{n / 1e6:,.1f}M"


def format_table(rows: list[list[str]]) -> str:
    """Aligned columns, a rule under the header; the first two columns left-aligned, the rest right."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        cells = zip(row, widths, strict=True)
        lines.append("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(cells)))
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report(scenario: Scenario, estimates: list[Estimate], gpu_memory: int) -> str:
    """The human-readable plan: header, table, recommendation."""
    stats, gpus, micro_batch = scenario.stats, scenario.gpus, scenario.micro_batch
    checkpointing = scenario.gradient_checkpointing
    lines = [
        f"{stats.name}: {_params(stats.total)} parameters (encoder {_params(stats.encoder)}, decoder "
        f"{_params(stats.decoder)}, embeddings {_params(stats.embeddings)}); LoRA r={scenario.lora_rank} on "
        f"{','.join(scenario.lora_targets)}: {_params(scenario.lora_params)} trainable",
        f"settings: {gpus} GPU{'s' if gpus > 1 else ''} x {_gib(gpu_memory)} GiB, micro-batch {micro_batch}, "
        f"{scenario.label_tokens} label tokens, 30 s windows, gradient checkpointing {'on' if checkpointing else 'off'}, "
        f"{scenario.attention} attention, bf16/fp16",
        f"every mode runs with: training.micro_batch_size={micro_batch} {COMMON_KEYS}"
        + ("" if checkpointing else " (here: training.gradient_checkpointing=false)"),
        "",
    ]
    rows = [["mode", "run with", "weights", "grads", "optimizer", "activations", "other", "total GiB", "fits"]]
    for e in estimates:
        m = get_mode(e.mode)
        run = f"{m.recipe} + {launch_config(m, gpus).removeprefix('launch_configs/')}"
        rows.append([e.mode, run, _gib(e.weights), _gib(e.grads), _gib(e.optimizer), _gib(e.activations),
                     _gib(e.overhead), _gib(e.total), "yes" if e.fits(gpu_memory) else "no"])
    lines.append(format_table(rows))
    lines.append("")
    offload = [e for e in estimates if e.cpu]
    if offload:
        lines.append("host memory for offloaded states (DeepSpeed's estimate, per node): "
                     + ", ".join(f"{e.mode} {_gib(e.cpu)} GiB" for e in offload))
    best = recommend(estimates, gpu_memory)
    if best is None:
        lines.append(f"nothing fits in {_gib(gpu_memory)} GiB per GPU; " + suggestion(scenario, gpu_memory))
    else:
        m = get_mode(best.mode)
        lines.append(
            f"recommended: {best.mode} ({m.summary}), the fastest mode that fits: {_gib(best.total)} of "
            f"{_gib(gpu_memory)} GiB per GPU.\n  accelerate launch --config_file {launch_config(m, gpus)} -m toolkit "
            f"train --config RECIPE {m.recipe} training.micro_batch_size={micro_batch} {COMMON_KEYS}"
        )
        more = faster_with_more_gpus(scenario, gpu_memory, best)
        if more:
            lines.append(f"  ({more})")
    return "\n".join(lines)


def run_cli(args: argparse.Namespace) -> int:
    """``python -m toolkit plan``; returns the exit status (2 for a bad model or argument)."""
    try:
        gpu_memory = parse_memory(args.gpu_memory)
        scenario = scenario_from_args(args)
        estimates = estimate_modes(scenario)
    except PlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        for e in estimates:
            print(json.dumps({"model": scenario.stats.name, **e.to_dict(gpu_memory)}))
    else:
        print(report(scenario, estimates, gpu_memory))
    return 0
