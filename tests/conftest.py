"""Shared fixtures: tiny random Whisper models, small synthetic audio corpora, and a launcher helper."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_MODEL = SHARED / "models" / "whisper-tiny.en"
SHARED_DATA = SHARED / "data" / "espeak-en"

needs_shared = pytest.mark.skipif(
    not (SHARED_MODEL.is_dir() and SHARED_DATA.is_dir()),
    reason="needs ../shared/models/whisper-tiny.en and ../shared/data/espeak-en (present on the team's machines only)",
)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A stitch in time saves nine.",
    "Whisper models turn speech into text.",
    "Every rank counts its own errors.",
    "Colour and color are spelled two ways.",
    "It costs twenty dollars, Mr. Smith.",
    "Seven silver swans swam silently.",
    "Nothing ventured, nothing gained.",
]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path_factory.getbasetemp() / "toolkit-cache"
    monkeypatch.setenv("WHISPER_TOOLKIT_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from toolkit.testing import make_tiny_whisper

    return make_tiny_whisper(tmp_path_factory.mktemp("tiny-en") / "model")


@pytest.fixture(scope="session")
def tiny_multilingual_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from toolkit.testing import make_tiny_whisper

    return make_tiny_whisper(tmp_path_factory.mktemp("tiny-ml") / "model", multilingual=True)


def write_clip(path: Path, seconds: float, sr: int = 16_000, channels: int = 1, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    tone = 0.3 * np.sin(2 * np.pi * (200 + 40 * seed) * t) + 0.02 * rng.standard_normal(t.shape)
    data = np.stack([tone] * channels, axis=1) if channels > 1 else tone
    sf.write(path, data.astype(np.float32), sr)


def write_audiofolder(root: Path, n: int, *, seconds: float = 1.0, sr: int = 16_000, start_seed: int = 0) -> Path:
    """An audiofolder of ``n`` short tone clips with English sentences as transcripts."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = f"clip-{i:03d}.flac"
        write_clip(root / name, seconds + 0.1 * (i % 5), sr=sr, seed=start_seed + i)
        rows.append({"file_name": name, "sentence": SENTENCES[i % len(SENTENCES)]})
    with (root / "metadata.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file_name", "sentence"])
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``train/`` (32 clips) and ``dev/`` (10 clips) audiofolders."""
    root = tmp_path_factory.mktemp("corpus")
    write_audiofolder(root / "train", 32)
    write_audiofolder(root / "dev", 10, start_seed=100)
    return root


def launch(
    args: list[str], *, processes: int, env: dict[str, str] | None = None, timeout: int = 600, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    """Run ``python -m toolkit ARGS`` on ``processes`` CPU processes through ``accelerate launch``.

    A free port per launch (``--main_process_port 0``); past ``timeout`` the whole process tree is
    killed and the test fails, so a hang never blocks the suite.
    """
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    if processes > 1:
        full_env["ACCELERATE_USE_CPU"] = "1"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "toolkit", *args]
    else:
        cmd = [sys.executable, "-m", "toolkit", *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)  # the workers too: a hung run must not outlive its test
        stdout, stderr = proc.communicate()
        pytest.fail(f"hung for {timeout} s: {' '.join(args[:1])}\n{stderr[-5000:]}")
    result = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if result.returncode != 0:
        print(result.stdout[-5000:], result.stderr[-8000:], sep="\n")
    return result


def last_json_line(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in output:\n{text[-2000:]}")


TINY_RUN = {
    "data.num_workers": "0",
    "data.packing": "false",  # one clip per sample, as most tests count them; packing tests turn it on
    "training.max_steps": "4",
    "training.global_batch_size": "8",
    "training.micro_batch_size": "2",
    "training.learning_rate": "1e-3",
    "training.warmup_steps": "0",
    "training.log_every": "1",
    "training.save_every": "0",
    "evaluation.at_start": "false",
    "evaluation.every_steps": "0",
    "evaluation.batch_size": "4",
    "evaluation.max_new_tokens": "6",
}
"""A few steps on the tone corpus: global 8 = micro 2 x accumulation over the processes."""


def train_args(model: Path, corpus: Path, out: Path, *overrides: str) -> list[str]:
    """``python -m toolkit train`` arguments for a tiny run on ``corpus/{train,dev}``; later overrides win."""
    values = {
        "model.name_or_path": str(model),
        "data.train": str(corpus / "train"),
        "data.eval": str(corpus / "dev"),
        **TINY_RUN,
        "output.dir": str(out),
    }
    for item in overrides:
        key, _, value = item.partition("=")
        values[key] = value
    return ["train", "--config", str(ROOT / "recipes" / "demo.yaml"), *(f"{k}={v}" for k, v in values.items())]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every worker: torch elastic starts workers in sessions of their own,
    so killing the launcher's process group alone would leave them running."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
    except psutil.NoSuchProcess:
        return
    victims = [parent, *parent.children(recursive=True)]
    for victim in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.kill()
    psutil.wait_procs(victims, timeout=60)


LAUNCH_DIR = ROOT / "launch_configs"


def ds_launch(
    config: str, args: list[str], out_log: Path, *, env: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file launch_configs/CONFIG.yaml --num_processes 2`` on CPU.

    DeepSpeed on CPU: DS_ACCELERATOR=cpu and never ACCELERATE_USE_CPU=1 (accelerate would silently
    drop DeepSpeed). A hang fails the test after ``timeout`` seconds, with the log.
    """
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                **(env or {})}
    full_env.pop("ACCELERATE_USE_CPU", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH_DIR / f"{config}.yaml"),
           "--num_processes", "2", "--main_process_port", "0", "-m", "toolkit", *args]
    with out_log.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            pytest.fail(f"{config}: hung for {timeout} s\n{out_log.read_text()[-5000:]}")
    text = out_log.read_text()
    if proc.returncode != 0:
        print(text[-8000:])
    return subprocess.CompletedProcess(cmd, proc.returncode, text, "")
