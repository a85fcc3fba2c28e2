"""Every accelerate launch config in launch_configs/ starts a real 2-step training run on CPU.

The world size each config must produce is asserted from results.json: on a machine without a
GPU, a wrongly written config silently runs ONE process instead of failing.
DeepSpeed configs get their header and JSON checked here. The one-machine ones (ds_*.yaml) each
train (and are compared with DDP) in tests/training/test_deepspeed.py, so they are not trained a
second time here. Of the multi-node ones, multi_node_zero3.yaml trains here on two "machines" on
127.0.0.1; multi_node_zero2.yaml trains on two Slurm nodes, a preemption and requeue included, in
tests/test_slurm.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import write_audiofolder

REPO = Path(__file__).resolve().parents[1]
LAUNCH_DIR = REPO / "launch_configs"
TIMEOUT_S = 300

pytestmark = pytest.mark.slow


# -- fixtures (the audio: tests/conftest.py's write_audiofolder) ------------------------------------------


def write_recipe(path: Path, model: Path, train: Path, dev: Path, **training: object) -> Path:
    """A tiny recipe: 2 steps of 4 samples, no evaluation during training (one at the end)."""
    recipe = {
        "model": {"name_or_path": str(model)},
        "data": {"train": str(train), "eval": str(dev), "num_workers": 1},
        "training": {
            "max_steps": 2, "global_batch_size": 4, "micro_batch_size": 2, "learning_rate": 1e-4,
            "warmup_steps": 0, "log_every": 1, "save_every": 0, "mixed_precision": "no", **training,
        },
        "evaluation": {"at_start": False, "every_steps": 0, "batch_size": 4, "max_new_tokens": 4},
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from toolkit.testing import make_tiny_whisper

    root = tmp_path_factory.mktemp("launch")
    model = make_tiny_whisper(root / "tiny-whisper")
    train = write_audiofolder(root / "data" / "train", 8)
    dev = write_audiofolder(root / "data" / "dev", 4, start_seed=100)
    return {"root": root, "recipe": write_recipe(root / "recipe.yaml", model, train, dev), "cache": root / "cache"}


def launch_env(cache: Path, cpu: bool, deepspeed: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", WHISPER_TOOLKIT_CACHE=str(cache), TOKENIZERS_PARALLELISM="false")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("ACCELERATE_USE_CPU", None)
    if cpu and deepspeed:
        env["DS_ACCELERATOR"] = "cpu"  # never ACCELERATE_USE_CPU=1: accelerate would drop DeepSpeed
    elif cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    return env


def accelerate_bin() -> str:
    beside = Path(sys.executable).parent / "accelerate"
    return str(beside) if beside.exists() else "accelerate"


def accelerate_cmd(config: Path, flags: list[str], recipe: Path, out: Path) -> list[str]:
    return [
        accelerate_bin(), "launch", "--config_file", str(config), *flags,
        "-m", "toolkit", "train", "--config", str(recipe), f"output.dir={out}",
    ]


def run_all(commands: list[list[str]], env: dict[str, str], logs: list[Path]) -> None:
    """Start all commands at once (each in its own session), wait for all; kill all on a hang."""
    procs = []
    for command, log in zip(commands, logs, strict=True):
        with log.open("w") as handle:
            procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    try:
        for proc in procs:
            proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"launch hung for {TIMEOUT_S} s:\n" + "\n".join(tail(log) for log in logs))
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, f"exit {proc.returncode}:\n{tail(log)}"


def tail(log: Path, lines: int = 40) -> str:
    text = log.read_text(errors="replace") if log.exists() else "(no log)"
    return f"--- {log.name}\n" + "\n".join(text.splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- the configs ----------------------------------------------------------------------------------------

CONFIG_FILES = sorted(p for p in LAUNCH_DIR.iterdir() if p.suffix in (".yaml", ".yml", ".json")) if LAUNCH_DIR.is_dir() else []


def is_deepspeed(path: Path) -> bool:
    return path.suffix == ".json" or "deepspeed" in path.read_text().lower()


def machines(path: Path) -> int:
    return int(load(path).get("num_machines", 1)) if path.suffix != ".json" else 1


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def test_launch_configs_exist() -> None:
    names = {p.name for p in CONFIG_FILES}
    assert {"1gpu.yaml", "multi_gpu.yaml", "multi_node.yaml", "multi_node_zero2.yaml", "multi_node_zero3.yaml"} <= names, names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_launch_config_has_no_hyperparameters(path: Path) -> None:
    config = load(path)
    # 'no' must be a string: a bare `no` in YAML is False, which accelerate rejects.
    assert config.get("mixed_precision", "no") == "no", "mixed precision belongs in the recipe (training.mixed_precision)"
    for key in config:
        assert not any(word in key for word in ("batch", "learning_rate", "lr", "accumulation")), key
    assert f"accelerate launch --config_file launch_configs/{path.name}" in path.read_text(), "header must show the command"


DS_FILES = [p for p in CONFIG_FILES if is_deepspeed(p)]
RECIPE_DECIDES = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")


@pytest.mark.parametrize("path", DS_FILES, ids=lambda p: p.name)
def test_deepspeed_config_leaves_the_recipe_in_charge(path: Path) -> None:
    """ds_NAME.yaml and multi_node_NAME.yaml point to deepspeed/NAME.json, whose recipe-dependent
    values are all "auto"."""
    config = load(path)
    assert config["distributed_type"] == "DEEPSPEED"
    # accelerate refuses a launch-config mixed_precision next to a deepspeed_config_file
    assert "mixed_precision" not in config
    ds_file = config["deepspeed_config"]["deepspeed_config_file"]
    assert ds_file == f"launch_configs/deepspeed/{path.stem.removeprefix('ds_').removeprefix('multi_node_')}.json"
    ds = json.loads((REPO / ds_file).read_text())
    for key in RECIPE_DECIDES:
        assert ds[key] == "auto", key
    assert ds["fp16"]["enabled"] == "auto" and ds["bf16"]["enabled"] == "auto"
    assert "optimizer" not in ds and "scheduler" not in ds  # the toolkit's AdamW and lr schedule
    zero = ds["zero_optimization"]
    assert zero["stage"] == int(path.stem.split("zero")[1][0])
    if zero["stage"] == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # final/ gets full weights
    offload = "offload" in path.stem
    assert (zero.get("offload_optimizer", {}).get("device") == "cpu") == offload
    assert (zero.get("offload_param", {}).get("device") == "cpu") == (offload and zero["stage"] == 3)
    assert f"DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 accelerate launch --config_file launch_configs/{path.name}" in path.read_text()


@pytest.mark.parametrize("path", DS_FILES, ids=lambda p: p.name)
def test_deepspeed_multi_node_config_uses_the_standard_launcher(path: Path) -> None:
    """On several machines accelerate 1.15 runs DeepSpeed's own launcher (pdsh: ssh to a hostfile's
    hosts) unless deepspeed_multinode_launcher is 'standard', which starts torchrun on this machine
    only: the one `accelerate launch` per node that slurm/train.sbatch runs under srun."""
    config = load(path)
    launcher = config["deepspeed_config"].get("deepspeed_multinode_launcher")
    if machines(path) == 1:
        assert launcher is None, "one-machine DeepSpeed configs leave the multi-node launcher unset"
        return
    assert launcher == "standard"
    assert config["rdzv_backend"] == "static" and config["same_network"] is True  # master_addr/port, as multi_node.yaml
    text = path.read_text()
    assert f"LAUNCH_CONFIG=launch_configs/{path.name}" in text, "header must show the sbatch command"
    assert "--num_machines $NNODES --machine_rank $NODE_RANK" in text


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_launch_config_trains(path: Path, tiny_run: dict[str, Path]) -> None:
    if is_deepspeed(path) and machines(path) == 1:
        pytest.skip("DeepSpeed config: trained and compared with DDP in tests/training/test_deepspeed.py")
    if path.name == "multi_node_zero2.yaml":
        pytest.skip("trained on 2 Slurm nodes, preemption included, in tests/test_slurm.py")
    config = load(path)
    kind = str(config.get("distributed_type", "NO"))
    nodes = machines(path)
    out = tiny_run["root"] / f"out-{path.stem}"
    recipe = tiny_run["recipe"]
    logs = [tiny_run["root"] / f"{path.stem}-{i}.log" for i in range(2)]
    if kind == "NO":
        env = launch_env(tiny_run["cache"], cpu=False)
        run_all([accelerate_cmd(path, [], recipe, out)], env, logs[:1])
        expected = 1
    elif kind == "MULTI_GPU" and nodes == 1:
        # CPU stand-in for "all GPUs of one machine": 2 processes over gloo
        env = launch_env(tiny_run["cache"], cpu=True)
        flags = ["--num_processes", "2", "--main_process_port", "0"]
        run_all([accelerate_cmd(path, flags, recipe, out)], env, logs[:1])
        expected = 2
    elif kind in ("MULTI_GPU", "DEEPSPEED"):
        # two "machines" on 127.0.0.1, one process each, as slurm/train.sbatch launches them
        env = launch_env(tiny_run["cache"], cpu=True, deepspeed=kind == "DEEPSPEED")
        port = free_port()
        commands = [
            accelerate_cmd(path, ["--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                                  "--main_process_port", str(port), "--num_processes", "2"], recipe, out)
            for rank in (1, 0)
        ]
        run_all(commands, env, logs)
        expected = 2
    else:
        pytest.fail(f"{path.name}: no test for distributed_type {kind}; extend test_launch_config_trains")
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == expected, results
    assert results["steps"] == 2
    assert results["global_batch_size"] == 4
    if kind == "DEEPSPEED":  # DeepSpeed's checkpoint, one optimizer partition per rank: not DDP in disguise
        from toolkit.training.zero import checkpoint_layout

        stage = json.loads((REPO / config["deepspeed_config"]["deepspeed_config_file"]).read_text())["zero_optimization"]["stage"]
        assert checkpoint_layout(out / "checkpoints" / "checkpoint-2") == (stage, 2)


def test_recipe_mixed_precision_beats_launch_config(tiny_run: dict[str, Path]) -> None:
    """A launch config's mixed_precision reaches the processes as ACCELERATE_MIXED_PRECISION;
    the toolkit's Accelerator must still use the recipe's training.mixed_precision."""
    code = (
        "import sys; from toolkit.config import load_config; from toolkit.training.loop import make_accelerator\n"
        "config = load_config(sys.argv[1], ['output.dir=' + sys.argv[2]])\n"
        "print(make_accelerator(config).mixed_precision)\n"
    )
    env = launch_env(tiny_run["cache"], cpu=True)
    env["ACCELERATE_MIXED_PRECISION"] = "bf16"
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_run["recipe"]), str(tiny_run["root"] / "mp")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "no"
