"""Step objects in-process, on one CPU process: a step, a back-off, the probe, and ZeRO's retry rule.

The multi-process runs in ``test_finder.py`` and ``test_deepspeed.py`` cover the same paths under
``accelerate launch``; these run in seconds, so a step's logic can be tested without a launcher.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, train_args
from toolkit.config import load_config
from toolkit.data.collator import Batch
from toolkit.data.loader import TimedBatches
from toolkit.oom import INJECT_ENV, UnrecoverableOutOfMemory, install_injector
from toolkit.training import finder, zero
from toolkit.training.batching import BatchPlan
from toolkit.training.loop import TrainingRun
from toolkit.training.step import DDPStep, StepParts, StepProgress, Zero3Step, ZeroStep, rng_unchanged

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def set_up(model: Path, corpus: Path, out: Path, *overrides: str) -> TrainingRun:
    args = train_args(model, corpus, out, "data.eval=null", "training.global_batch_size=8", *overrides)
    run = TrainingRun(load_config(ROOT / "recipes" / "demo.yaml", args[3:]))
    run.setup()
    run.batches = TimedBatches(run.train_loader(0))
    run.step.model.train()
    return run


def weights(run: TrainingRun) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in run.step.model.state_dict().items()}


def test_cheap_init_loads_nothing(tmp_path: Path, tiny_model: Path, corpus: Path) -> None:
    args = train_args(tiny_model, corpus, tmp_path / "run")
    run = TrainingRun(load_config(ROOT / "recipes" / "demo.yaml", args[3:]))
    assert not hasattr(run, "step") and not (tmp_path / "run").exists()


def test_one_step_updates_the_weights_and_reports_the_global_step(tmp_path: Path, tiny_model: Path, corpus: Path) -> None:
    run = set_up(tiny_model, corpus, tmp_path / "run", "training.micro_batch_size=4")
    assert isinstance(run.step, DDPStep) and run.plan.accumulation == 2
    before = weights(run)
    stats = run.train_step(0)
    assert stats.samples == 8 and stats.tokens > 0 and torch.isfinite(stats.loss_sum)
    assert stats.grad_norm is not None and stats.grad_norm > 0
    assert any(not torch.equal(before[k], v) for k, v in weights(run).items())
    assert all(p.grad is None for p in run.step.model.parameters())  # zeroed for the next step


def test_a_back_off_mid_step_redoes_it_and_matches_a_run_at_the_smaller_size(
    tmp_path: Path, tiny_model: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    direct = set_up(tiny_model, corpus, tmp_path / "direct", "training.micro_batch_size=2")
    direct_stats = [direct.train_step(step) for step in range(2)]
    # The first batch of 4 goes through, the second runs out of memory: the step is redone at 2.
    monkeypatch.setenv(INJECT_ENV, "0:2:1")
    backed = set_up(tiny_model, corpus, tmp_path / "backed", "training.micro_batch_size=4")
    backed_stats = [backed.train_step(step) for step in range(2)]
    assert backed.plan == direct.plan and backed.state.backoffs == [{"step": 0, "from": 4, "to": 2}]
    assert backed.backoff_seconds > 0
    # Dropout is on: equal weights also show that the redone step drew the same masks.
    for key, value in weights(direct).items():
        assert torch.equal(value, weights(backed)[key]), key
    assert [float(s.loss_sum) for s in backed_stats] == [float(s.loss_sum) for s in direct_stats]


def test_the_probe_finds_the_size_and_leaves_weights_gradients_and_rng_unchanged(
    tmp_path: Path, tiny_model: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(INJECT_ENV, "0:2")
    run = set_up(tiny_model, corpus, tmp_path / "run", "training.micro_batch_size=8")
    before, rng = weights(run), torch.get_rng_state()
    run.probe()
    assert run.plan.micro_batch_size == 2 and run.probe_summary is not None and run.probe_summary["to"] == 2
    assert [b["to"] for b in run.state.backoffs] == [4, 2]
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in weights(run).items())
    assert all(p.grad is None for p in run.step.model.parameters())


# -- ZeRO's retry rule, with DeepSpeed's backward stood in for ------------------------------------


class FakeAccelerator:
    device = torch.device("cpu")
    process_index = 0


class PlainBackward:
    """Stands in for DeepSpeed's backward: autograd, recording each accumulation boundary flag."""

    def __init__(self, lasts: list[bool]):
        self.lasts = lasts

    def __call__(self, accelerator: object, loss: torch.Tensor, last: bool) -> None:
        self.lasts.append(last)
        loss.backward()


def zero_step(cls: type[ZeroStep], model_dir: Path, monkeypatch: pytest.MonkeyPatch, lasts: list[bool]) -> ZeroStep:
    """A ZeRO step object whose backward is plain autograd; ``lasts`` records each accumulation boundary."""
    import transformers

    model = transformers.WhisperForConditionalGeneration.from_pretrained(model_dir, dropout=0.0)
    monkeypatch.setattr(zero, "backward", PlainBackward(lasts))
    parts = StepParts(FakeAccelerator(), model, None, None, model.config.pad_token_id,
                      model.config.decoder_start_token_id, None, advice=str)
    return cls(parts)


def micro_batches(batch: Batch, size: int) -> Iterator[Batch]:
    for i in range(0, len(batch.ids), size):
        assert batch.labels is not None
        yield Batch(batch.input_features[i : i + size], batch.labels[i : i + size], batch.ids[i : i + size],
                    batch.texts[i : i + size])


def test_zero_continues_a_step_from_the_micro_batches_already_reduced(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = finder.worst_case_batch(8, 80, 3000, 5, 100, torch.device("cpu"), seed=1)
    plan = BatchPlan.create(8, 4, 1)
    lasts: list[bool] = []
    reference = zero_step(ZeroStep, tiny_model, monkeypatch, lasts)
    progress = StepProgress.start(torch.device("cpu"))
    assert reference.accumulate(micro_batches(batch, 4), plan, 0.01, progress) == [] and lasts == [False, True]
    expected = {n: p.grad.clone() for n, p in reference.model.named_parameters() if p.grad is not None}

    lasts.clear()
    step = zero_step(ZeroStep, tiny_model, monkeypatch, lasts)
    monkeypatch.setenv(INJECT_ENV, "0:2:1")
    install_injector(step.model, 0)
    progress = StepProgress.start(torch.device("cpu"))
    assert step.accumulate(micro_batches(batch, 4), plan, 0.01, progress) == [0]
    assert progress.samples == 4 and lasts == [False]  # the first micro-batch is in
    step.recover(progress)
    assert progress.samples == 4  # ZeRO keeps it
    smaller = plan.smaller()
    assert smaller is not None
    rest = micro_batches(Batch(batch.input_features[4:], batch.labels[4:], batch.ids[4:], batch.texts[4:]), 2)
    assert step.accumulate(rest, smaller, 0.01, progress) == [] and progress.samples == 8
    assert lasts == [False, False, True]
    for name, param in step.model.named_parameters():
        if name in expected:
            torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-6)


def test_zero3_cannot_back_off_in_a_forward_and_names_the_size_to_set(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    step = zero_step(Zero3Step, tiny_model, monkeypatch, [])
    monkeypatch.setenv(INJECT_ENV, "0:2")
    install_injector(step.model, 0)
    batch = finder.worst_case_batch(4, 80, 3000, 5, 100, torch.device("cpu"))
    with pytest.raises(UnrecoverableOutOfMemory, match=r"ZeRO-3 gathers.*training.micro_batch_size=2 "):
        step.accumulate(micro_batches(batch, 4), BatchPlan.create(4, 4, 1), 0.01, StepProgress.start(torch.device("cpu")))
    assert Zero3Step.synced_generation and not ZeroStep.synced_generation


def test_rng_unchanged_restores_the_generators_even_on_error() -> None:
    state = torch.get_rng_state()
    with pytest.raises(RuntimeError), rng_unchanged(torch.device("cpu")):
        torch.rand(3)
        raise RuntimeError("boom")
    assert torch.equal(torch.get_rng_state(), state)


class CountingStep:
    """Stands in for a step object in the probe: counts the passes it is asked for."""

    device = torch.device("cpu")
    input_dtype = None

    def __init__(self) -> None:
        self.probed: list[int] = []

    def probe(self, batch: Batch, plan: BatchPlan) -> list[int]:
        self.probed.append(len(batch.ids))
        return []


def test_a_worst_case_batch_too_large_for_the_host_counts_as_out_of_memory_without_being_built(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    from toolkit.training import probe

    config = transformers.WhisperConfig.from_pretrained(tiny_model)
    monkeypatch.setattr(probe, "device_memory", lambda device: 64 * 2**20)  # 64 MiB: 33 windows fit in half
    step = CountingStep()
    plan = BatchPlan.create(100_000, 50_000, 1)
    assert probe.attempt(step, config, 5, plan, 50_000) == [0] and step.probed == []  # nothing allocated
    found = probe.run_probe(step, BatchPlan.create(64, 64, 1), config, 5, at_step=0)  # type: ignore[arg-type]
    assert found.plan.micro_batch_size == 32 and step.probed == [32]
