"""Does ``torch.compile`` speed up a Whisper training step here? Eager against compiled, same batch.

Times forward + backward of one batch of 30 s windows (random features, fixed label length) in
eager mode and after ``torch.compile`` (inductor), and prints one JSON line: the first (compiling)
call and the median of the following ones for each. On this project's 2-core CPU machine
(2026-11-26, whisper-tiny.en, batch 8, 24 label tokens) compiling made the step slower: 5.90 s
(``--static``) and 6.60 s (dynamic shapes) against 4.99 and 4.93 s eager, after 49 and 85 s of
compilation; so the toolkit's ``training.compile`` (regional: each layer) is off by default. The
GPU question is open (see the README).

    .venv/bin/python scripts/bench_compile.py --model ../shared/models/whisper-tiny.en --batch 8 --static
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
from transformers import WhisperForConditionalGeneration


def timed_steps(model: Any, params: list[torch.nn.Parameter], batch: dict[str, torch.Tensor], repeats: int) -> tuple[float, float]:
    """(first call, median of ``repeats`` more) seconds of forward + backward on ``batch``."""
    times = []
    for _ in range(repeats + 1):
        tick = time.perf_counter()
        model(**batch).loss.backward()
        if batch["input_features"].is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tick)
        for p in params:
            p.grad = None
    return times[0], statistics.median(times[1:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a local Whisper directory")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=24, help="label tokens per sample")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--static", action="store_true", help="compile for fixed shapes (dynamic=False)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32).to(device).train()
    model.config.use_cache = False
    config = model.config
    batch = {
        "input_features": torch.randn(args.batch, config.num_mel_bins, 3000, device=device),
        "labels": torch.randint(0, config.vocab_size, (args.batch, args.tokens), device=device),
    }
    params = list(model.parameters())
    eager = timed_steps(model, params, batch, args.repeats)
    compiled = timed_steps(torch.compile(model, dynamic=not args.static), params, batch, args.repeats)
    print(json.dumps({
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "batch": args.batch,
        "tokens": args.tokens, "dynamic": not args.static, "torch_threads": torch.get_num_threads(),
        "eager_first_s": round(eager[0], 2), "eager_step_s": round(eager[1], 3),
        "compiled_first_s": round(compiled[0], 2), "compiled_step_s": round(compiled[1], 3),
        "speedup": round(eager[1] / compiled[1], 3),
    }))


if __name__ == "__main__":
    main()
