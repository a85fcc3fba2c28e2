"""The non-finite guard: a NaN/Inf loss or gradient norm skips the update, is recorded, and stops the
run after ``training.max_nonfinite_steps`` in a row (exit 5); no checkpoint is written from
non-finite weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, launch, train_args, write_audiofolder
from toolkit.config import load_config
from toolkit.data.loader import TimedBatches
from toolkit.training.loop import TrainingRun
from toolkit.training.step import NonFiniteTraining

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


class PoisonLogits:
    """A forward hook that turns the model's logits into NaN while ``on``."""

    def __init__(self) -> None:
        self.on = False

    def __call__(self, module: torch.nn.Module, args: tuple, output: object) -> object:
        if self.on:
            output.logits = output.logits * float("nan")  # type: ignore[attr-defined]
        return output


def set_up(model: Path, corpus: Path, out: Path, *overrides: str) -> TrainingRun:
    args = train_args(model, corpus, out, "data.eval=null", *overrides)
    run = TrainingRun(load_config(ROOT / "recipes" / "demo.yaml", args[3:]))
    run.setup()
    run.batches = TimedBatches(run.train_loader(0))
    return run


def test_a_non_finite_loss_skips_the_update_records_the_samples_and_stops_after_the_limit(
    tmp_path: Path, tiny_model: Path, corpus: Path
) -> None:
    run = set_up(tiny_model, corpus, tmp_path / "run", "training.max_nonfinite_steps=2")
    poison = PoisonLogits()
    run.step.model.register_forward_hook(poison)
    before = {k: v.clone() for k, v in run.step.model.state_dict().items()}
    poison.on = True
    stats = run.train_step(0)
    assert not stats.applied and run.nonfinite_streak == 1
    assert all(torch.equal(before[k], v) for k, v in run.step.model.state_dict().items())
    assert all(p.grad is None for p in run.step.model.parameters())
    lines = [json.loads(x) for x in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert lines[-1]["reason"] == "non-finite loss" and lines[-1]["step"] == 0 and len(lines[-1]["ids"]) == 8
    assert run.state.nonfinite_steps == [lines[-1]]
    poison.on = False
    assert run.train_step(1).applied and run.nonfinite_streak == 0  # a good step resets the count
    poison.on = True
    run.train_step(2)
    with pytest.raises(NonFiniteTraining, match="2 steps in a row had a non-finite loss"):
        run.train_step(3)


def test_no_checkpoint_is_written_from_non_finite_weights(tmp_path: Path, tiny_model: Path, corpus: Path) -> None:
    run = set_up(tiny_model, corpus, tmp_path / "run")
    run.train_step(0)
    run.state.step = 1
    run.save_checkpoint()
    with torch.no_grad():
        next(run.step.model.parameters())[0].fill_(float("inf"))
    run.state.step = 2
    with pytest.raises(NonFiniteTraining, match="weights are not finite at step 2"):
        run.save_checkpoint()
    assert [s for s, _ in run.checkpoints.complete()] == [1]


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_a_huge_learning_rate_stops_with_exit_5_and_a_finite_newest_checkpoint(
    processes: int, tmp_path: Path, tiny_model: Path, corpus: Path
) -> None:
    out = tmp_path / "run"
    args = train_args(tiny_model, corpus, out, "data.eval=null", "training.learning_rate=1e10", "training.max_steps=8",
                      "training.save_every=1", "output.keep_checkpoints=2")
    result = launch(args, processes=processes, timeout=300)
    if processes == 1:
        assert result.returncode == 5, result.stderr[-2000:]
    else:  # accelerate launch exits 1 whatever the ranks' codes; torch elastic's report has them
        assert result.returncode != 0 and "exitcode  : 5" in result.stderr, result.stderr[-2000:]
    assert "non-finite loss" in result.stderr and "holds finite weights" in result.stderr
    newest = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    weights = load_file(newest / "model.safetensors")
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())
    assert any(json.loads(x).get("reason") == "non-finite loss" for x in (out / "skipped.jsonl").read_text().splitlines())


@pytest.mark.slow
def test_one_clip_of_absurd_amplitude_is_skipped_and_training_stays_finite(tmp_path: Path, tiny_model: Path) -> None:
    corpus = tmp_path / "corpus"
    write_audiofolder(corpus / "train", 16)
    # A float WAV whose samples are finite but one is 1e30: its log-mel is not finite.
    clip = np.random.default_rng(0).normal(0, 0.1, 16_000).astype(np.float32)
    clip[50] = 1e30
    sf.write(corpus / "train" / "loud.wav", clip, 16_000, subtype="FLOAT")
    with (corpus / "train" / "metadata.csv").open("a") as handle:
        handle.write("loud.wav,a clip with one enormous sample\n")
    out = tmp_path / "run"
    args = train_args(tiny_model, corpus, out, "data.eval=null", "training.max_steps=8", "training.save_every=1",
                      "output.keep_checkpoints=2", "training.global_batch_size=4")
    result = launch(args, processes=1, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    skipped = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert [s["id"] for s in skipped if "id" in s] == ["loud.wav"]
    weights = load_file(out / "final" / "model.safetensors")
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())
