"""Benchmark: host memory of a training run's processes, and what a DataLoader worker costs to start.

``rss`` launches a 2-process CPU training run (``accelerate launch ... -m toolkit train``) and
samples every process of it every 0.2 s from ``/proc``: the launcher, the two ranks, the forkservers
and the DataLoader workers (``pt_data_worker``). It prints one JSON object: each process's peak RSS
and peak anonymous RSS, the peaks per role, and the peak over time of the sum of RSS and of PSS
(PSS splits shared pages between the processes that map them: its sum is the memory actually used).
A guard kills the whole run when the machine's available memory falls below ``--guard-gib``.

    .venv/bin/python scripts/bench_host_memory.py make-model /tmp/whisper-base-random
    .venv/bin/python scripts/bench_host_memory.py rss --model /tmp/whisper-base-random \\
        --data ../shared/data/espeak-en --out /tmp/bench-rss -- data.num_workers=2 \\
        training.max_steps=3 evaluation.every_steps=2
    # the old behaviour (workers forked from the trainer), for comparison:
    WHISPER_TOOLKIT_WORKER_START=fork .venv/bin/python scripts/bench_host_memory.py rss ...

``--tree DIR`` runs the toolkit of another source tree (a copy of this one with other changes).

``start`` times a loader's start (``iter()`` until the first batch, one worker) for each start
method, each in a fresh process holding ``--ballast-gib`` of written memory (the trainer's stand-in):
the first loader of a process (forkserver: the server starts and imports its preload) and the
median of the later ones (each training step after an evaluation, each evaluation):

    .venv/bin/python scripts/bench_host_memory.py start --model ../shared/models/whisper-tiny.en \\
        --data ../shared/data/espeak-en/train
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")
GIB = 2**30
MIB = 2**20


# -- the model ------------------------------------------------------------------------------------
def make_model(path: Path) -> Path:
    """A random multilingual Whisper with whisper-base's sizes (74M parameters) and a tokenizer layout."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from toolkit.testing import make_tiny_whisper

    make_tiny_whisper(path, multilingual=True)  # processor and generation config (Whisper's token layout)
    small = WhisperConfig.from_pretrained(path)
    sizes = {"d_model": 512, "encoder_layers": 6, "decoder_layers": 6, "encoder_attention_heads": 8,
             "decoder_attention_heads": 8, "encoder_ffn_dim": 2048, "decoder_ffn_dim": 2048, "vocab_size": 51865}
    config = WhisperConfig(**{**small.to_dict(), **sizes})
    model = WhisperForConditionalGeneration(config)
    model.generation_config = WhisperForConditionalGeneration.from_pretrained(path).generation_config
    model.save_pretrained(path)
    return path


# -- sampling /proc ---------------------------------------------------------------------------------
def _read(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return None


def _fields(text: str | None, names: tuple[str, ...]) -> dict[str, int]:
    """``Name: N kB`` lines of a /proc file, in bytes."""
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        key, _, rest = line.partition(":")
        if key in names:
            out[key] = int(rest.split()[0]) * 1024
    return out


def descendants(root: int) -> list[int]:
    """``root`` and every process below it (from each process's parent in /proc/PID/stat)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _read(f"/proc/{entry}/stat")
        if stat is None:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def role_of(pid: int) -> str:
    comm = (_read(f"/proc/{pid}/comm") or "").strip()
    cmdline = (_read(f"/proc/{pid}/cmdline") or "").replace("\0", " ")
    if comm == "pt_data_worker":
        return "worker"
    if "multiprocessing.forkserver" in cmdline:
        return "forkserver"
    if "resource_tracker" in cmdline:
        return "resource_tracker"
    if "accelerate" in cmdline or "torch.distributed" in cmdline:
        return "launcher"
    if "toolkit" in cmdline:
        return "rank"
    return "other"


@dataclass
class Peak:
    pid: int
    role: str
    first_seen_s: float
    rss: int = 0
    rss_anon: int = 0
    pss: int = 0

    def row(self) -> dict[str, Any]:
        return {"pid": self.pid, "role": self.role, "first_seen_s": round(self.first_seen_s, 1),
                "peak_rss_mib": round(self.rss / MIB), "peak_rss_anon_mib": round(self.rss_anon / MIB),
                "peak_pss_mib": round(self.pss / MIB)}


@dataclass
class Sampler:
    root: int
    tick: float = field(default_factory=time.monotonic)
    peaks: dict[int, Peak] = field(default_factory=dict)
    sum_rss: int = 0
    sum_pss: int = 0
    sum_rss_at_s: float = 0.0
    most_alive: dict[str, int] = field(default_factory=dict)

    def sample(self) -> None:
        now = time.monotonic() - self.tick
        total_rss = total_pss = 0
        alive: dict[str, int] = {}
        for pid in descendants(self.root):
            status = _fields(_read(f"/proc/{pid}/status"), ("VmRSS", "RssAnon"))
            if "VmRSS" not in status:
                continue  # gone, or a zombie
            pss = _fields(_read(f"/proc/{pid}/smaps_rollup"), ("Pss",)).get("Pss", 0)
            peak = self.peaks.get(pid)
            if peak is None or peak.role != "worker":  # a worker names itself pt_data_worker once started
                role = role_of(pid)
                peak = self.peaks[pid] = peak or Peak(pid, role, now)
                peak.role = role
            peak.rss = max(peak.rss, status["VmRSS"])
            peak.rss_anon = max(peak.rss_anon, status.get("RssAnon", 0))
            peak.pss = max(peak.pss, pss)
            total_rss += status["VmRSS"]
            total_pss += pss
            alive[peak.role] = alive.get(peak.role, 0) + 1
        if total_rss > self.sum_rss:
            self.sum_rss, self.sum_rss_at_s = total_rss, now
        self.sum_pss = max(self.sum_pss, total_pss)
        for role, count in alive.items():
            self.most_alive[role] = max(self.most_alive.get(role, 0), count)

    def summary(self) -> dict[str, Any]:
        roles: dict[str, dict[str, Any]] = {}
        for peak in self.peaks.values():
            entry = roles.setdefault(peak.role, {"processes": 0, "max_peak_rss_mib": 0, "max_peak_rss_anon_mib": 0})
            entry["processes"] += 1
            entry["max_peak_rss_mib"] = max(entry["max_peak_rss_mib"], round(peak.rss / MIB))
            entry["max_peak_rss_anon_mib"] = max(entry["max_peak_rss_anon_mib"], round(peak.rss_anon / MIB))
        for role, count in self.most_alive.items():
            roles[role]["most_alive_at_once"] = count
        return {
            "peak_sum_rss_mib": round(self.sum_rss / MIB),
            "peak_sum_rss_at_s": round(self.sum_rss_at_s, 1),
            "peak_sum_pss_mib": round(self.sum_pss / MIB),
            "roles": roles,
            "processes": [p.row() for p in sorted(self.peaks.values(), key=lambda p: p.first_seen_s)],
        }


def mem_available() -> int:
    return _fields(_read("/proc/meminfo"), ("MemAvailable",))["MemAvailable"]


def kill_tree(root: int) -> None:
    for pid in reversed(descendants(root)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def rss(args: argparse.Namespace) -> dict[str, Any]:
    """Launch the training run, sample it until it ends, return the figures."""
    tree = Path(args.tree).resolve()
    out = Path(args.out).resolve()
    data = Path(args.data).resolve()
    overrides = [
        f"model.name_or_path={Path(args.model).resolve()}", "model.language=en",
        f"data.train={data / 'train'}", f"data.eval={data / 'dev'}",
        "data.max_train_samples=64", "data.max_eval_samples=32", "data.num_workers=2",
        "training.global_batch_size=16", "training.max_steps=3", "training.warmup_steps=0",
        "training.log_every=1", "training.save_every=0",
        "evaluation.at_start=false", "evaluation.every_steps=2", "evaluation.max_new_tokens=32",
        f"output.dir={out}", *args.overrides,
    ]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "toolkit", "train", "--config", str(tree / "recipes" / "demo.yaml"), *overrides]
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "WHISPER_TOOLKIT_CACHE": str(out / "cache")}  # its own cache: every run decodes the same way
    log = out / "launch.log"
    guard = int(args.guard_gib * GIB)
    tick = time.monotonic()
    with log.open("w") as handle:
        proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=handle, stderr=subprocess.STDOUT)
        sampler = Sampler(proc.pid)
        lowest, guarded = mem_available(), False
        while proc.poll() is None:
            sampler.sample()
            available = mem_available()
            lowest = min(lowest, available)
            if available < guard:
                guarded = True
                kill_tree(proc.pid)
                break
            time.sleep(args.interval)
        returncode = proc.wait()
    results = out / "results.json"
    return {
        "command": " ".join(cmd),
        "cwd": str(tree),
        "worker_start": os.environ.get("WHISPER_TOOLKIT_WORKER_START", "default"),
        "returncode": returncode,
        "completed": returncode == 0 and results.is_file(),
        "killed_by_guard": guarded,
        "wall_s": round(time.monotonic() - tick, 1),
        "lowest_mem_available_gib": round(lowest / GIB, 2),
        **sampler.summary(),
        "log_tail": "" if returncode == 0 else log.read_text()[-3000:],
    }


# -- loader start time ------------------------------------------------------------------------------
def start_one(args: argparse.Namespace) -> dict[str, Any]:
    """In this process: ballast, then ``--repeat`` loaders with one worker; times to the first batch."""
    os.environ["WHISPER_TOOLKIT_WORKER_START"] = args.method
    import numpy as np
    from transformers import WhisperProcessor

    from toolkit.config import DataConfig
    from toolkit.data.collator import WhisperCollator
    from toolkit.data.loader import build_loader
    from toolkit.data.pipeline import load_split

    ballast = np.ones(int(args.ballast_gib * GIB) // 8)
    processor = WhisperProcessor.from_pretrained(args.model)
    split = load_split("train", DataConfig(train=args.data, text_column="sentence", max_train_samples=64,
                                           num_workers=0), processor.tokenizer)
    collator = WhisperCollator(processor.feature_extractor, 0)
    batches = [list(range(i, i + 8)) for i in range(0, 64, 8)]
    starts, firsts = [], []
    for _ in range(args.repeat):
        loader = build_loader(split.dataset, batches, collator, num_workers=args.workers)
        tick = time.perf_counter()
        iterator = iter(loader)
        started = time.perf_counter()
        next(iterator)
        done = time.perf_counter()
        del iterator  # the workers stop: the next loader starts its own, as after each evaluation
        starts.append((started - tick) * 1000)
        firsts.append((done - tick) * 1000)
    tick = time.perf_counter()
    collator([split.dataset[i] for i in batches[0]])
    in_process = (time.perf_counter() - tick) * 1000
    del ballast
    return {
        "method": args.method, "ballast_gib": args.ballast_gib, "workers": args.workers,
        "first_loader_start_ms": round(starts[0], 1), "first_loader_first_batch_ms": round(firsts[0], 1),
        "later_start_ms_median": round(statistics.median(starts[1:]), 1),
        "later_first_batch_ms_median": round(statistics.median(firsts[1:]), 1),
        "one_batch_in_process_ms": round(in_process, 1),
    }


def start(args: argparse.Namespace) -> dict[str, Any]:
    """``start-one`` for each start method, each in a fresh process (a forkserver starts once per process)."""
    rows = []
    for method in args.methods:
        cmd = [sys.executable, str(Path(__file__).resolve()), "start-one", "--method", method, "--model", args.model,
               "--data", args.data, "--repeat", str(args.repeat), "--ballast-gib", str(args.ballast_gib),
               "--workers", str(args.workers)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    return {"start": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-model", help="write a random whisper-base-sized multilingual Whisper")
    make.add_argument("path")
    run = sub.add_parser("rss", help="peak host memory of a 2-process CPU training run")
    run.add_argument("--model", required=True)
    run.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "espeak-en"),
                     help="a directory with train/ and dev/ audiofolders")
    run.add_argument("--out", required=True)
    run.add_argument("--tree", default=str(ROOT), help="the source tree to run (default: this one)")
    run.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    run.add_argument("--guard-gib", type=float, default=2.5, help="kill the run below this much available memory")
    run.add_argument("overrides", nargs="*", help="more recipe overrides (after --)")
    for name in ("start", "start-one"):
        timing = sub.add_parser(name, help="time a DataLoader's start per worker start method")
        timing.add_argument("--model", required=True, help="a Whisper directory (its processor is used)")
        timing.add_argument("--data", required=True, help="an audiofolder with a sentence column")
        timing.add_argument("--repeat", type=int, default=6)
        timing.add_argument("--ballast-gib", type=float, default=2.0)
        timing.add_argument("--workers", type=int, default=1)
        if name == "start":
            timing.add_argument("--methods", nargs="+", default=["fork", "forkserver", "spawn"])
        else:
            timing.add_argument("--method", required=True)
    args = parser.parse_args()
    if args.command == "make-model":
        print(json.dumps({"model": str(make_model(Path(args.path)))}))
        return
    figures = {"rss": rss, "start": start, "start-one": start_one}[args.command](args)
    print(json.dumps(figures, indent=None if args.command == "start-one" else 2))


if __name__ == "__main__":
    main()
