"""DeepSpeed ZeRO-2/3 (+ CPU offload) in the toolkit's loop: every ds_*.yaml launch config on 2 CPU processes.

Each config trains the same tiny dropout-free model as a DDP reference run (fp32, global batch 8 =
micro-batch 2 x accumulation 2 x 2 processes, clipping on) and must give the same loss curve, lr,
gradient norm and final weights. The gradient norm is the sensitive check: AdamW with clipping is
nearly invariant to a constant gradient scale, so a missed 1/gradient_accumulation_steps compensation
shows in the norm (off by 2x) but hardly in the loss. Measured on the 2-core CPU machine (6 steps):
losses identical to DDP for ZeRO-2/3 (2.3e-7 relative with offload's DeepSpeedCPUAdam), grad norms
equal to the 5 logged decimals, final weights at most 1.2e-7 apart (2.4e-7 with CPU Adam).
The file takes about 2.5 min, plus about 50 s the first time DeepSpeed runs on a machine (ninja
compiles its CPU ops, shm comm and CPU Adam, into ~/.cache/torch_extensions).

CPU form of a DeepSpeed launch: DS_ACCELERATOR=cpu and never ACCELERATE_USE_CPU=1 (accelerate would
silently drop DeepSpeed); the world size is asserted from results.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import LAUNCH_DIR, ds_launch, launch, train_args
from toolkit.config import ConfigError

DS_CONFIGS = sorted(p.stem for p in LAUNCH_DIR.glob("ds_*.yaml"))
TIMEOUT_S = 300
STEPS = 6


def ds_args(model: Path, corpus: Path, out: Path) -> list[str]:
    # fp32 (the demo recipe's mixed_precision "no"); 10 eval clips in batches of 4 = 3 batches on
    # 2 ranks: under ZeRO-3 rank 1 runs a filler batch.
    return train_args(model, corpus, out, f"training.max_steps={STEPS}", "training.warmup_steps=1",
                      "training.max_grad_norm=1.0", "training.save_every=2", "evaluation.every_steps=3",
                      "output.keep_checkpoints=10")


def train_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model without dropout (dropout masks differ per sample split)."""
    import transformers

    path = tmp_path_factory.mktemp("ds-model") / "model"
    transformers.WhisperForConditionalGeneration.from_pretrained(tiny_model, dropout=0.0).save_pretrained(path)
    transformers.WhisperProcessor.from_pretrained(tiny_model).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ddp_run(model: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ds-ddp") / "run"
    result = launch(ds_args(model, corpus, out), processes=2, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["world_size"] == 2
    return out


class Runs:
    """One run per DeepSpeed launch config, started on first use and shared by the tests."""

    def __init__(self, model: Path, corpus: Path, root: Path):
        self.model, self.corpus, self.root = model, corpus, root
        self.done: dict[str, Path] = {}

    def __call__(self, config: str) -> Path:
        if config not in self.done:
            out = self.root / config
            result = ds_launch(config, ds_args(self.model, self.corpus, out), self.root / f"{config}.log")
            assert result.returncode == 0, f"{config} failed:\n{result.stdout[-3000:]}"
            assert "effective global batch: global batch 8 = micro-batch 2 x accumulation 2 x 2 process(es)" in result.stdout
            self.done[config] = out
        return self.done[config]


@pytest.fixture(scope="module")
def ds_runs(model: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(model, corpus, tmp_path_factory.mktemp("ds-runs"))


def test_every_deepspeed_config_is_tested() -> None:
    assert DS_CONFIGS == ["ds_zero2", "ds_zero2_offload", "ds_zero3", "ds_zero3_offload"], DS_CONFIGS


@pytest.mark.slow
@pytest.mark.parametrize("config", DS_CONFIGS)
def test_deepspeed_config_trains_evaluates_and_exports(config: str, ds_runs: Runs) -> None:
    from transformers import WhisperForConditionalGeneration

    run = ds_runs(config)
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2, results  # one process would mean accelerate dropped DeepSpeed
    assert (results["steps"], results["gradient_accumulation_steps"]) == (STEPS, 2)
    assert results["eval"]["num_samples"] == 10
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval/wer" in line]
    assert [line["step"] for line in evals] == [3, 6]
    # DeepSpeed's own checkpoint layout, one optimizer partition per rank, written via the temp dir
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-3", "checkpoint-4", "checkpoint-6"]
    shards = sorted(p.name for p in (checkpoints / "checkpoint-6" / "pytorch_model").glob("*optim_states.pt"))
    assert len(shards) == 2, shards
    # full weights, not ZeRO-3's empty partitions, and nothing missing (from_pretrained would re-initialise it)
    start, final = load_file(ds_runs.model / "model.safetensors"), weights(run)
    assert {k: v.shape for k, v in final.items()} == {k: v.shape for k, v in start.items()}
    assert WhisperForConditionalGeneration.from_pretrained(run / "final").config.d_model == 64
    assert (run / "final" / "README.md").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("config", DS_CONFIGS)
def test_deepspeed_matches_ddp(config: str, ds_runs: Runs, ddp_run: Path) -> None:
    run = ds_runs(config)
    ref, got = train_lines(ddp_run), train_lines(run)
    assert [line["step"] for line in got] == list(range(1, STEPS + 1))
    assert [line["lr"] for line in got] == [line["lr"] for line in ref]  # the toolkit's schedule, stepped once per step
    assert [line["loss"] for line in got] == pytest.approx([line["loss"] for line in ref], rel=1e-5)
    # grad_norm is logged to 5 decimals: allow that rounding, nothing like the 2x of a missed GAS scale
    assert [line["grad_norm"] for line in got] == pytest.approx([line["grad_norm"] for line in ref], rel=1e-4, abs=2e-5)
    a, b = weights(ddp_run), weights(run)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ds_zero3", "ds_zero2_offload"])
def test_deepspeed_resume_matches_the_unbroken_run(config: str, ds_runs: Runs, tmp_path: Path) -> None:
    unbroken = ds_runs(config)
    broken = tmp_path / "run"
    shutil.copytree(unbroken, broken)
    for name in ("checkpoint-3", "checkpoint-4", "checkpoint-6"):
        shutil.rmtree(broken / "checkpoints" / name)
    shutil.rmtree(broken / "final")
    (broken / "results.json").unlink()
    args = ds_args(ds_runs.model, ds_runs.corpus, broken)
    result = ds_launch(config, args, tmp_path / "resume.log")
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"resumed from {broken / 'checkpoints' / 'checkpoint-2'} at step 2" in result.stdout
    assert json.loads((broken / "results.json").read_text())["world_size"] == 2
    got, ref = train_lines(broken), train_lines(unbroken)
    assert [line["step"] for line in got] == list(range(1, STEPS + 1))  # none duplicated by the resume
    assert [line["lr"] for line in got] == [line["lr"] for line in ref]
    a, b = weights(unbroken), weights(broken)
    if "offload" not in config:  # torch AdamW: bit for bit
        assert [line["loss"] for line in got] == [line["loss"] for line in ref]
        assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the unbroken run"
        return
    # DeepSpeedCPUAdam keeps beta^t as a running float product and recomputes it with pow() after a
    # resume: the bias correction differs in the last bit (measured: weights 2.4e-7 apart, losses 2e-7
    # relative). A wrong lr or lost optimizer state after the resume is orders of magnitude larger.
    assert [line["loss"] for line in got] == pytest.approx([line["loss"] for line in ref], rel=2e-6)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=2e-6, msg=key)


# -- the DeepSpeed config filling, without a launch --------------------------------------------------------


def fake_accelerator(ds_config: dict, mixed_precision: str = "no") -> SimpleNamespace:
    plugin = SimpleNamespace(deepspeed_config=ds_config)
    return SimpleNamespace(
        state=SimpleNamespace(deepspeed_plugin=plugin), mixed_precision=mixed_precision, gradient_accumulation_steps=1
    )


def test_fill_config_fills_auto_from_the_recipe() -> None:
    from toolkit.config import TrainingConfig
    from toolkit.training import zero
    from toolkit.training.batching import BatchPlan

    config = json.loads((LAUNCH_DIR / "deepspeed" / "zero3_offload.json").read_text())
    acc = fake_accelerator(config)
    plan = BatchPlan.create(32, 4, 2)  # accumulation 4
    zero.fill_config(acc, plan, TrainingConfig(max_grad_norm=0.5, mixed_precision="no"))
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (4, 4)
    assert (config["train_batch_size"], config["gradient_clipping"]) == (32, 0.5)
    assert acc.gradient_accumulation_steps == 4

    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto"}
    zero.fill_config(fake_accelerator(config), plan, TrainingConfig(max_grad_norm=None, mixed_precision="no"))
    assert config["gradient_clipping"] == 0.0  # DeepSpeed's "no clipping"


def test_fill_config_refuses_numbers_that_contradict_the_recipe() -> None:
    from toolkit.config import TrainingConfig
    from toolkit.training import zero
    from toolkit.training.batching import BatchPlan

    plan = BatchPlan.create(32, 4, 2)
    zero.fill_config(fake_accelerator({"gradient_accumulation_steps": 4}), plan, TrainingConfig(mixed_precision="no"))
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=8 but the recipe gives 4"):
        zero.fill_config(fake_accelerator({"gradient_accumulation_steps": 8}), plan, TrainingConfig(mixed_precision="no"))
    with pytest.raises(ConfigError, match="enables bf16 but training.mixed_precision is no"):
        zero.fill_config(fake_accelerator({}, mixed_precision="bf16"), plan, TrainingConfig(mixed_precision="no"))


def test_check_resumable_names_the_fix(tmp_path: Path) -> None:
    from accelerate.utils import DistributedType

    from toolkit.training import zero

    def accelerator(stage: int | None, processes: int) -> SimpleNamespace:
        acc = fake_accelerator({"zero_optimization": {"stage": stage}})
        acc.distributed_type = DistributedType.DEEPSPEED if stage else DistributedType.MULTI_CPU
        acc.num_processes = processes
        return acc

    ddp = tmp_path / "ddp"
    ddp.mkdir()
    z3 = tmp_path / "z3" / zero.CHECKPOINT_SUBDIR
    z3.mkdir(parents=True)
    for rank in (0, 1):
        (z3 / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").touch()
        (z3 / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").touch()
    assert zero.checkpoint_layout(ddp) == (None, 0) and zero.checkpoint_layout(z3.parent) == (3, 2)
    zero.check_resumable(accelerator(None, 2), ddp)
    zero.check_resumable(accelerator(3, 2), z3.parent)
    with pytest.raises(ConfigError, match="written by ZeRO-3 on 2 processes; this run is ZeRO-3 on 4"):
        zero.check_resumable(accelerator(3, 4), z3.parent)
    with pytest.raises(ConfigError, match="this run is ZeRO-2 on 2"):
        zero.check_resumable(accelerator(2, 2), z3.parent)
    with pytest.raises(ConfigError, match="written without DeepSpeed"):
        zero.check_resumable(accelerator(2, 2), ddp)
    with pytest.raises(ConfigError, match="cannot be resumed without DeepSpeed"):
        zero.check_resumable(accelerator(None, 2), z3.parent)
