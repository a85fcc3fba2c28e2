"""Benchmark: what the out-of-memory back-off costs, against starting at the size it settles on.

Runs ``toolkit train`` twice with the same recipe and overrides: once at ``--start`` (a micro-batch
that does not fit, or ``auto``), once directly at the micro-batch the first run settled on, and
prints one JSON object: the sizes, the back-offs, the time lost (failed attempts, and the probe),
and the training throughput of both. On a GPU:

    python scripts/bench_backoff.py --launch "accelerate launch --config_file launch_configs/1gpu.yaml" \\
        --start 64 -- --config recipes/dhivehi-whisper-small.yaml model.name_or_path=openai/whisper-medium \\
        training.max_steps=20 evaluation.every_steps=0 data.eval=null

On CPU (what CI runs) the out-of-memory errors come from the fault injector:
``TOOLKIT_INJECT_OOM=0:2 python scripts/bench_backoff.py --start 8 -- --config ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from toolkit.oom import INJECT_ENV


def train(launch: list[str], train_args: list[str], out: Path, micro: str, env: dict[str, str]) -> dict[str, Any]:
    cmd = [*launch, "-m", "toolkit", "train", *train_args, f"training.micro_batch_size={micro}", f"output.dir={out}"]
    tick = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - tick
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-5000:])
        raise SystemExit(f"run failed ({result.returncode}): {shlex.join(cmd)}")
    summary = json.loads((out / "results.json").read_text())
    keys = ("micro_batch_size", "gradient_accumulation_steps", "global_batch_size", "world_size", "backoffs",
            "backoff_seconds", "probe", "train_samples_per_second", "train_runtime_s", "steps")
    return {"start": micro, "wall_s": round(wall, 1), **{k: summary.get(k) for k in keys}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--launch", default=f"{sys.executable}", help="launcher prefix (default: this python)")
    parser.add_argument("--start", default="auto", help="micro-batch to start the first run at (a number or auto)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-backoff"))
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the `toolkit train` arguments")
    args = parser.parse_args()
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    launch = shlex.split(args.launch)
    env = dict(os.environ)
    backed = train(launch, train_args, args.out / "backed-off", args.start, env)
    env.pop(INJECT_ENV, None)  # the direct run starts at the size found: nothing to inject
    direct = train(launch, train_args, args.out / "direct", str(backed["micro_batch_size"]), env)
    lost = (backed["backoff_seconds"] or 0) + ((backed["probe"] or {}).get("seconds") or 0)
    rates = backed["train_samples_per_second"], direct["train_samples_per_second"]
    print(json.dumps({
        "backed_off": backed, "direct": direct, "seconds_lost_to_backoff_and_probe": round(lost, 2),
        "throughput_ratio": round(rates[0] / rates[1], 3) if all(rates) else None,
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
