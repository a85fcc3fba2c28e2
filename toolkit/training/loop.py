"""The explicit accelerate training loop.

One optimizer step = this rank's micro-batches of that step (see :mod:`toolkit.training.batching`).
The loss is the sum of token losses divided by the label tokens of the *whole global step*, so the
gradient is the same however the step is split into micro-batches and processes: the token-level
mean of the global batch (Trainer's per-micro-batch mean is not). DDP averages gradients over
ranks, hence the factor ``world_size``. Under DeepSpeed ZeRO the same loss and the same gradient
result; what differs (auto config, backward/step, clipping, ZeRO-3 eval and export) is in
:mod:`toolkit.training.zero`.

Out-of-memory errors back off on every rank together (:mod:`toolkit.training.finder`): the step is
redone at half the micro-batch with the same samples, so the global batch and the optimisation are
unchanged; see :meth:`TrainingRun.train_step`.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers.models.whisper.modeling_whisper import shift_tokens_right

from toolkit.adapters import AdapterCheckpointHooks
from toolkit.config import ConfigError, RunConfig, dump_config
from toolkit.data.collator import IGNORE_INDEX, Batch, WhisperCollator
from toolkit.data.pipeline import LoadedSplit, load_split
from toolkit.distributed import (
    STOP_SIGNALS,
    all_reduce_max,
    average_gradients,
    ignore_stop_signals,
    process_group_kwargs,
    use_cpu,
)
from toolkit.evaluation.generate import evaluate_model
from toolkit.evaluation.normalize import make_normalizer
from toolkit.launch import LaunchInfo
from toolkit.modeling import LoadedModel, load_model, trainable_parameters
from toolkit.output import export_model, push_to_hub, write_json, write_skipped
from toolkit.training import finder, zero
from toolkit.training.batching import BatchPlan, StepBatchSampler, StepSampler
from toolkit.training.checkpoint import CheckpointManager, TrainState
from toolkit.training.metrics import MetricsLogger, peak_memory_gib
from toolkit.training.optim import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; the sbatch script requeues on it


class Preempted(Exception):
    """A stop signal arrived; a checkpoint was saved at ``step``."""

    def __init__(self, step: int):
        super().__init__(f"stopped by signal; checkpoint saved at step {step}; rerun the same command to resume")
        self.step = step


class StopSignal:
    """Remembers SIGTERM/SIGUSR1 (Slurm preemption, ``scancel --signal``) until the next step boundary."""

    SIGNALS = STOP_SIGNALS

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum


def make_accelerator(config: RunConfig) -> Accelerator:
    precision = config.training.mixed_precision
    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("training.mixed_precision=fp16 needs a CUDA GPU; use bf16 or no on CPU")
    return Accelerator(
        mixed_precision=precision,
        cpu=use_cpu(),
        kwargs_handlers=[process_group_kwargs()],
        project_dir=config.output.dir,
    )


def loss_sum(model: Any, batch: Batch, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """Summed token cross-entropy of a micro-batch."""
    assert batch.labels is not None
    decoder_input_ids = shift_tokens_right(batch.labels, pad_token_id, decoder_start_token_id)
    logits = model(input_features=batch.input_features, decoder_input_ids=decoder_input_ids).logits
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), batch.labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


@dataclass
class StepStats:
    """What one optimizer step did; ``loss_sum`` is this rank's, the counts are the global step's."""

    loss_sum: torch.Tensor
    tokens: int
    samples: int
    audio_seconds: float
    seconds: float
    grad_norm: float | None = None


@dataclass
class RunData:
    train: LoadedSplit
    eval: LoadedSplit | None
    label_lengths: np.ndarray


class TrainingRun:
    """Everything one ``train`` invocation holds, with the loop split into testable steps."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.accelerator = make_accelerator(config)
        self.out = Path(config.output.dir)
        set_seed(config.training.seed)
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "recipe.yaml").write_text(dump_config(config))
        with zero.full_weights_at_load(self.accelerator):
            self.loaded: LoadedModel = load_model(
                config.model, config.training, lora_cfg=config.lora, device=self.accelerator.device
            )
        self.data = self._load_data()
        self.checkpoints = CheckpointManager(self.out / "checkpoints", config.output.keep_checkpoints, self.accelerator)
        self.checkpoints.clean_partial()
        latest = self.checkpoints.latest()
        # A resumed run starts from the micro-batch it had found (read before DeepSpeed is configured with it).
        self.found = TrainState.load(latest) if latest is not None else None
        self.plan = self._initial_plan()
        self.collator = WhisperCollator(
            self.loaded.processor.feature_extractor, self.loaded.model.config.decoder_start_token_id
        )
        self.normalize = make_normalizer(self.loaded.english, self.loaded.processor.tokenizer)
        model = self.loaded.model
        self.pad_id = model.config.pad_token_id
        self.start_id = model.config.decoder_start_token_id
        optimizer = build_optimizer(model, config.training, self.accelerator.device)
        self.scheduler = build_scheduler(optimizer, config.training)
        # Counted before prepare: ZeRO-3 leaves each rank only its partition of every parameter.
        self.param_counts = trainable_parameters(model)
        self.injector = finder.install_injector(model, self.accelerator.process_index)
        self.deepspeed = zero.is_deepspeed(self.accelerator)
        if self.deepspeed:
            zero.fill_config(self.accelerator, self.plan, config.training)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.zero_stage = zero.zero_stage(self.accelerator)
        self.input_dtype = zero.compute_dtype(self.accelerator)
        if self.deepspeed:
            self.scheduler = zero.ensure_scheduler_drives(
                self.scheduler, self.optimizer, lambda inner: build_scheduler(inner, config.training)
            )
        self.accelerator.register_for_checkpointing(self.scheduler)
        if config.training.method == "lora":
            AdapterCheckpointHooks(self.accelerator).register()
        self.state = TrainState()
        self.sampler = StepSampler(len(self.data.train.dataset), self.plan, config.training.seed, self.accelerator.process_index)
        self.baseline: dict[str, Any] | None = None
        self.metrics: MetricsLogger | None = None
        self.batches: Any = None
        self.backoff_seconds = 0.0
        self.probe_summary: dict[str, Any] | None = None

    # -- set-up -----------------------------------------------------------------------------------
    def _load_data(self) -> RunData:
        tokenizer = self.loaded.processor.tokenizer
        train = load_split("train", self.config.data, tokenizer)
        evaluation = load_split("eval", self.config.data, None) if self.config.data.eval else None
        if self.accelerator.is_main_process:
            skips = train.skips + (evaluation.skips if evaluation else [])
            count = write_skipped(self.out / "skipped.jsonl", skips)
            if count:
                logger.info("%d samples left out; see %s", count, self.out / "skipped.jsonl")
        return RunData(train, evaluation, train.dataset.label_lengths())

    def _initial_plan(self) -> BatchPlan:
        cfg = self.config.training
        world = self.accelerator.num_processes
        micro = cfg.micro_batch_ceiling(world)
        if self.found is not None and self.found.micro_batch_size:
            if self.found.micro_batch_size < micro:
                logger.info("resuming at the micro-batch found before: %d", self.found.micro_batch_size)
            micro = min(micro, self.found.micro_batch_size)
        # Refuses a global batch that does not split over the processes.
        return BatchPlan.create(cfg.global_batch_size, max(micro, 1), world)

    def resume(self) -> None:
        latest = self.checkpoints.latest()
        if latest is None:
            return
        zero.check_resumable(self.accelerator, latest)
        self.accelerator.load_state(str(latest))
        self.state = TrainState.load(latest)
        logger.info("resumed from %s at step %d", latest, self.state.step)

    def train_loader(self, start: int, skip: int = 0) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self.data.train.dataset,
            batch_sampler=StepBatchSampler(self.sampler, start, self.config.training.max_steps, skip),
            collate_fn=self.collator,
            num_workers=self.config.data.num_workers,
            persistent_workers=False,
            worker_init_fn=ignore_stop_signals,
            # Its own generator: creating the iterator draws a worker seed, which must not consume
            # the global RNG that dropout uses (a resumed run would then diverge from an unbroken one).
            generator=torch.Generator().manual_seed(self.config.training.seed + start),
        )

    # -- one optimizer step -------------------------------------------------------------------------
    def train_step(self, step: int) -> StepStats:
        """Forward/backward over this rank's micro-batches of ``step``, then one optimizer step.

        When any rank runs out of memory, all ranks back off together (:meth:`back_off`) and the
        step goes on at the smaller micro-batch with the same samples: under DDP it is redone from
        its start (gradients zeroed); under DeepSpeed the micro-batches that completed keep their
        gradient, which ZeRO has already reduced, and the rest of the step's samples follow in the
        smaller micro-batches. Either way each sample of the step contributes exactly once.
        """
        tick = time.perf_counter()
        indices = self.sampler.step_indices(step)
        step_tokens = int(self.data.label_lengths[indices].sum())
        scale = self.accelerator.num_processes / step_tokens
        total = torch.zeros((), device=self.accelerator.device)
        first = 0
        rng = RngState.capture(self.accelerator.device)
        while True:
            attempt = self._deepspeed_micro_batches(scale, first) if self.deepspeed else self._ddp_micro_batches(scale)
            total += attempt.loss_sum
            if not attempt.failed_ranks:
                break
            done = 0
            if self.deepspeed:
                done = attempt.completed * self.plan.micro_batch_size
            else:
                total.zero_()
                self.optimizer.zero_grad(set_to_none=True)
                rng.restore()  # the redone step draws the same dropout masks as a run at the smaller size
            finder.free_memory()
            self.back_off(step, attempt.failed_ranks)
            first = done // self.plan.micro_batch_size
            self.batches = iter(self.train_loader(step, skip=first))
            self.backoff_seconds += attempt.seconds
        grad_norm = None
        if self.deepspeed:
            grad_norm = zero.grad_norm(self.accelerator)
        else:
            average_gradients(self.model.parameters())
            if self.config.training.max_grad_norm is not None:
                norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.training.max_grad_norm)
                grad_norm = float(norm) if norm is not None else None
        self.optimizer.step()
        if not self.accelerator.optimizer_step_was_skipped:  # fp16 overflow: the lr schedule waits too
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        audio = float(self.data.train.dataset.durations[indices].sum())
        return StepStats(total, step_tokens, len(indices), audio, time.perf_counter() - tick, grad_norm)

    def _ddp_micro_batches(self, scale: float) -> _Attempt:
        """All of the step's micro-batches without gradient sync; the ranks then agree on OOM.

        DDP would all-reduce inside the last backward, where a rank that runs out of memory would leave
        the others waiting in the collective; so every backward runs under ``no_sync`` and the loop
        averages the gradients itself (:func:`~toolkit.distributed.average_gradients`) once the ranks
        have agreed that none failed. A rank that fails skips its remaining micro-batches.
        """
        tick = time.perf_counter()
        total = torch.zeros((), device=self.accelerator.device)
        completed, failed = 0, False
        for _ in range(self.plan.accumulation):
            batch = next(self.batches).to(self.accelerator.device, self.input_dtype)
            summed = self._unsynced_forward_backward(batch, scale)
            if summed is None:
                failed = True
                break
            total += summed
            completed += 1
        del batch
        ranks = finder.oom_ranks(failed, self.accelerator.device)
        return _Attempt(total, ranks, completed, time.perf_counter() - tick)

    def _deepspeed_micro_batches(self, scale: float, first: int) -> _Attempt:
        """Micro-batches ``first..`` of the step under DeepSpeed, agreeing on OOM after each forward.

        ZeRO-2 reduces gradients inside every backward, so the agreement sits between forward and
        backward, where no collective is in flight: an OOM in the forward backs off; one in the
        backward (or anywhere under ZeRO-3, whose forward gathers weights from all ranks) cannot be
        told to the other ranks, which are inside a collective, and ends the run with the size to set.
        """
        total = torch.zeros((), device=self.accelerator.device)
        for micro in range(first, self.plan.accumulation):
            tick = time.perf_counter()
            batch = next(self.batches).to(self.accelerator.device, self.input_dtype)
            summed, ranks = self._deepspeed_forward(batch, "forward")
            if ranks:
                return _Attempt(total, ranks, micro, time.perf_counter() - tick)
            self._deepspeed_backward(summed * scale, micro == self.plan.accumulation - 1, "backward")
            total += summed.detach()
        return _Attempt(total, [], self.plan.accumulation, 0.0)

    def _unsynced_forward_backward(self, batch: Batch, scale: float) -> torch.Tensor | None:
        """Summed loss of one micro-batch, gradients accumulated without DDP's sync; None on OOM."""
        try:
            with self.accelerator.no_sync(self.model):
                summed = loss_sum(self.model, batch, self.pad_id, self.start_id)
                self.accelerator.backward(summed * scale)
        except Exception as exc:
            if not finder.is_out_of_memory(exc):
                raise
            return None
        return summed.detach()

    def _deepspeed_forward(self, batch: Batch, where: str) -> tuple[torch.Tensor, list[int]]:
        """Summed loss, and the ranks whose forward ran out of memory (agreed; empty under ZeRO-3)."""
        summed = None
        try:
            summed = loss_sum(self.model, batch, self.pad_id, self.start_id)
        except Exception as exc:
            if not finder.is_out_of_memory(exc):
                raise
            if self.zero_stage == 3:
                raise self._unrecoverable(where, "ZeRO-3 gathers the weights from all ranks in it") from None
        if self.zero_stage == 3:
            return summed, []  # type: ignore[return-value]
        ranks = finder.oom_ranks(summed is None, self.accelerator.device)  # no collective is in flight here
        return summed, ranks  # type: ignore[return-value]

    def _deepspeed_backward(self, loss: torch.Tensor, last: bool, where: str) -> None:
        try:
            zero.backward(self.accelerator, loss, last)
        except Exception as exc:
            if finder.is_out_of_memory(exc):
                raise self._unrecoverable(where, "ZeRO reduces gradients inside it") from None
            raise

    def _unrecoverable(self, where: str, why: str) -> finder.UnrecoverableOutOfMemory:
        micro = self.plan.micro_batch_size
        smaller = self.plan.smaller()
        fix = (f"rerun the same command with training.micro_batch_size={smaller.micro_batch_size} "
               "(it resumes from the last checkpoint)" if smaller else self._advice())
        return finder.UnrecoverableOutOfMemory(
            f"rank {self.accelerator.process_index} ran out of memory in the {where} at micro-batch {micro}, "
            f"where the other ranks cannot be told ({why}); {fix}"
        )

    def back_off(self, step: int, failed_ranks: list[int]) -> None:
        """Halve the micro-batch on every rank (accumulation doubles) and re-prepare what depends on it."""
        smaller = self.plan.smaller()
        if smaller is None:
            raise finder.OutOfMemoryAtMicroBatchOne(
                f"rank(s) {failed_ranks} ran out of memory at micro-batch 1 (step {step}, "
                f"{self.config.training.global_batch_size} global batch): nothing smaller to try; {self._advice()}"
            )
        record = finder.Backoff(step, self.plan.micro_batch_size, smaller.micro_batch_size)
        logger.warning(
            "rank %d: out of memory on rank(s) %s at step %d: micro-batch %d -> %d, accumulation %d -> %d, "
            "global batch %d unchanged", self.accelerator.process_index, failed_ranks, step, self.plan.micro_batch_size, smaller.micro_batch_size, self.plan.accumulation,
            smaller.accumulation, smaller.global_batch_size,
        )
        self._apply_plan(smaller)
        self.state.backoffs.append(record.to_dict())
        if self.metrics is not None:
            self.metrics.log(step, {"backoff": record.to_dict(), **self._batch_values()})

    def _apply_plan(self, plan: BatchPlan) -> None:
        self.plan = plan
        self.sampler.plan = plan
        if self.deepspeed:
            zero.resize(self.accelerator, plan)
        self.state.micro_batch_size = plan.micro_batch_size
        self.state.gradient_accumulation_steps = plan.accumulation

    def _batch_values(self) -> dict[str, int]:
        return {"micro_batch_size": self.plan.micro_batch_size, "gradient_accumulation_steps": self.plan.accumulation}

    def _advice(self) -> str:
        cfg = self.config
        mode = finder.current_mode(cfg.training.method, cfg.model.quantization, cfg.training.optimizer, LaunchInfo.from_env())
        label_tokens = self._worst_label_tokens()
        return finder.advice_at_micro_batch_one(
            self.loaded.model.config, mode, self.accelerator.num_processes, label_tokens,
            cfg.training.gradient_checkpointing, finder.device_memory(self.accelerator.device),
        )

    def _worst_label_tokens(self) -> int:
        """The longest label of the training data, within what the decoder takes."""
        return min(int(self.data.label_lengths.max()), self.loaded.model.config.max_target_positions)

    # -- the worst-case probe ---------------------------------------------------------------------
    def probe(self) -> None:
        """Find the largest micro-batch that fits a worst-case batch before the first real step.

        Two forward/backward passes (the second with the gradients of the first in memory, as in
        accumulation) on full 30 s windows with the longest label of the data; the RNG is restored
        afterwards and the gradients left are zeros, so the run trains as if no probe had happened.
        AdamW's states appear only at the first optimizer step: the back-off during training covers
        what they add.
        """
        tick = time.perf_counter()
        start = self.plan.micro_batch_size
        label_tokens = self._worst_label_tokens()
        try:
            plan, backoffs = finder.search(
                self.plan, lambda micro: self._probe_attempt(micro, label_tokens), step=self.state.step
            )
        except finder.OutOfMemoryAtMicroBatchOne as exc:
            raise finder.OutOfMemoryAtMicroBatchOne(
                f"probe: {exc} (30 s clips, {label_tokens} label tokens); {self._advice()}"
            ) from None
        if plan != self.plan:
            self._apply_plan(plan)
        self.state.backoffs += [b.to_dict() for b in backoffs]
        seconds = time.perf_counter() - tick
        self.probe_summary = {"from": start, "to": plan.micro_batch_size, "label_tokens": label_tokens,
                              "seconds": round(seconds, 2)}
        logger.info("probe: micro-batch %d fits a worst-case batch (30 s clips, %d label tokens); %.1f s",
                    plan.micro_batch_size, label_tokens, seconds)
        if self.metrics is not None:
            self.metrics.log(self.state.step, {"probe": self.probe_summary, **self._batch_values()})

    def _probe_attempt(self, micro: int, label_tokens: int) -> list[int]:
        config = self.loaded.model.config
        batch = finder.worst_case_batch(
            micro, config.num_mel_bins, 2 * config.max_source_positions, label_tokens, config.vocab_size,
            self.accelerator.device, self.input_dtype,
        )
        failed = False
        devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for _ in range(2):
                if not self.deepspeed:
                    if self._unsynced_forward_backward(batch, 0.0) is None:
                        failed = True
                        break
                    continue
                summed, ranks = self._deepspeed_forward(batch, "probe's forward")
                if ranks:
                    del summed
                    finder.free_memory()
                    return ranks
                # A zero gradient into ZeRO's buffers: x + 0 == x, so the first step is unchanged.
                self._deepspeed_backward(summed * 0.0, False, "probe's backward")
                del summed
        if not self.deepspeed:
            self.optimizer.zero_grad(set_to_none=True)
        finder.free_memory()
        return [] if self.deepspeed else finder.oom_ranks(failed, self.accelerator.device)

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        """Corpus metrics on the eval split; generation backs off on its own (its memory is not training's)."""
        assert self.data.eval is not None
        eval_cfg = self.config.evaluation
        batch_size = min(eval_cfg.batch_size, self.state.eval_batch_size or eval_cfg.batch_size)
        result = evaluate_model(
            self.accelerator.unwrap_model(self.model), self.data.eval.dataset, self.collator,
            self.loaded.processor.tokenizer, self.normalize, batch_size=batch_size,
            max_new_tokens=eval_cfg.max_new_tokens, num_beams=eval_cfg.num_beams,
            num_workers=self.config.data.num_workers, autocast=self.accelerator.autocast,
            synced_gpus=self.zero_stage == 3,  # ZeRO-3: every forward gathers parameters from all ranks
        )
        self.state.eval_batch_size = result.batch_size
        for backoff in result.backoffs:
            record = {"step": self.state.step, **backoff}
            self.state.eval_backoffs.append(record)
            if self.metrics is not None:
                self.metrics.log(self.state.step, {"eval_backoff": record})
        return result.metrics

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.config.training
        acc = self.accelerator
        self.resume()
        self.state.micro_batch_size = self.plan.micro_batch_size
        self.state.gradient_accumulation_steps = self.plan.accumulation
        metrics = self.metrics = MetricsLogger(self.out, acc.is_main_process, resume_step=self.state.step)
        if self.found is None and cfg.probe:
            self.probe()
        trainable, total_params = self.param_counts
        logger.info(
            "%s | %d training samples | %d steps (%.2f epochs) | %.1fM of %.1fM parameters trainable",
            self.plan.describe(), len(self.data.train.dataset), cfg.max_steps, self.sampler.epoch_of(cfg.max_steps),
            trainable / 1e6, total_params / 1e6,
        )
        if acc.is_main_process:
            print(f"effective global batch: {self.plan.describe()}", flush=True)
        if self.data.eval is not None and self.config.evaluation.at_start and self.state.step == 0:
            self.baseline = self.evaluate()
            metrics.log(0, {f"eval/{k}": v for k, v in self.baseline.items()})
            logger.info("baseline eval: %s", self.baseline)

        start_step = self.state.step
        window, totals = _Window(), _Window()
        last_eval: dict[str, Any] | None = None
        progress = tqdm(total=cfg.max_steps, initial=start_step, disable=not acc.is_main_process, desc="train")
        self.batches = iter(self.train_loader(start_step))
        self.model.train()
        with StopSignal() as stop:
            for step in range(start_step, cfg.max_steps):
                stats = self.train_step(step)
                self.state.step = step + 1
                window.add(stats)
                totals.add(stats)
                progress.update(1)
                done = self.state.step == cfg.max_steps
                if self.state.step % cfg.log_every == 0 or done:
                    values = self.log_values(window)
                    metrics.log(self.state.step, values)
                    progress.set_postfix(loss=f"{values['loss']:.4f}")
                is_best = False
                every = self.config.evaluation.every_steps
                if self.data.eval is not None and every and (self.state.step % every == 0 or done):
                    last_eval = self.evaluate()
                    is_best = self.state.record_eval(self.state.step, last_eval)
                    metrics.log(self.state.step, {f"eval/{k}": v for k, v in last_eval.items()})
                    logger.info("step %d eval: %s", self.state.step, last_eval)
                preempt = all_reduce_max(stop.received is not None, acc.device)
                if is_best or done or preempt or (cfg.save_every and self.state.step % cfg.save_every == 0):
                    self.checkpoints.save(self.state)
                if preempt and not done:
                    progress.close()
                    metrics.close()
                    raise Preempted(self.state.step)
        progress.close()
        results = self.finish(last_eval, totals)
        if results.get("eval"):
            metrics.log(self.state.step, {"final/" + k: v for k, v in results["eval"].items()})
        metrics.close()
        return results

    def log_values(self, window: _Window) -> dict[str, Any]:
        values = window.flush(self.accelerator)
        values["lr"] = self.scheduler.get_last_lr()[0]
        values["epoch"] = round(self.sampler.epoch_of(self.state.step), 4)
        values["peak_memory_gib"] = round(peak_memory_gib(self.accelerator.device), 3)
        values.update(self._batch_values())
        return values

    def finish(self, last_eval: dict[str, Any] | None, totals: _Window) -> dict[str, Any]:
        """Final eval and export; ``totals`` covers the steps this invocation trained."""
        acc = self.accelerator
        if self.config.output.final_model == "best" and self.state.best_step not in (None, self.state.step):
            best = self.checkpoints.path_for(self.state.best_step)  # type: ignore[arg-type]
            acc.load_state(str(best))
            logger.info("final model: best checkpoint %s (wer %.3f)", best, self.state.best_metric)
            last_eval = None
        if self.data.eval is not None and last_eval is None:
            last_eval = self.evaluate()
        results: dict[str, Any] = {
            "eval": last_eval,
            "baseline_eval": self.baseline,
            "best": {"step": self.state.best_step, "wer": self.state.best_metric},
            "steps": self.state.step,
            "global_batch_size": self.plan.global_batch_size,
            "micro_batch_size": self.plan.micro_batch_size,
            "gradient_accumulation_steps": self.plan.accumulation,
            "world_size": self.plan.world_size,
            "backoffs": self.state.backoffs,
            "backoff_seconds": round(self.backoff_seconds, 3),
            "eval_batch_size": self.state.eval_batch_size,
            "eval_backoffs": self.state.eval_backoffs,
            "probe": self.probe_summary,
            "train_samples": len(self.data.train.dataset),
            **totals.rates(),
            "train_runtime_s": round(totals.seconds, 2),
            "skipped": len(self.data.train.skips) + (len(self.data.eval.skips) if self.data.eval else 0),
            "final_model": self.config.output.final_model,
        }
        acc.wait_for_everyone()
        # Under ZeRO-3 the module's own parameters are partitioned: gather the full state (a
        # collective, so on every rank; rank 0 receives it). ZeRO-2 and DDP save the module as is.
        state_dict = acc.get_state_dict(self.model) if self.zero_stage == 3 else None
        if acc.is_main_process:
            final_dir = self.out / "final"
            export_model(
                acc.unwrap_model(self.model), self.loaded.processor, final_dir, self.config, results, state_dict=state_dict
            )
            if self.config.output.push_to_hub:
                results["hub_url"] = push_to_hub(final_dir, self.config.output.hub_model_id or "", self.config.output.hub_private)
            write_json(self.out / "results.json", results)
            logger.info("results: %s", self.out / "results.json")
        acc.wait_for_everyone()
        return results


@dataclass
class _Attempt:
    """One try at (the rest of) a step's micro-batches."""

    loss_sum: torch.Tensor
    failed_ranks: list[int]
    """Ranks that ran out of memory (the same list on every rank); empty when the step went through."""
    completed: int
    """Micro-batches whose gradient is in (under DeepSpeed, where a failed step continues from there)."""
    seconds: float
    """Time lost if the attempt failed."""


@dataclass
class RngState:
    """torch's CPU and current-GPU generator states (dropout), to redo a step as if it were the first try."""

    cpu: torch.Tensor
    device: torch.device
    cuda: torch.Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> RngState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), device, cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


class _Window:
    """Sums of :class:`StepStats` over a span of steps (between two log lines, or the whole run)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.tokens = self.samples = 0
        self.audio = self.seconds = 0.0
        self.grad_norm: float | None = None

    def add(self, stats: StepStats) -> None:
        self.losses.append(stats.loss_sum)
        self.tokens += stats.tokens
        self.samples += stats.samples
        self.audio += stats.audio_seconds
        self.seconds += stats.seconds
        self.grad_norm = stats.grad_norm

    def rates(self) -> dict[str, float | None]:
        if not self.seconds:
            return {"train_samples_per_second": None, "train_audio_seconds_per_second": None}
        return {
            "train_samples_per_second": round(self.samples / self.seconds, 4),
            "train_audio_seconds_per_second": round(self.audio / self.seconds, 3),
        }

    def flush(self, accelerator: Accelerator) -> dict[str, Any]:
        """Mean token loss over all ranks (one all-reduce) and throughput; then start a new window."""
        total = float(accelerator.reduce(torch.stack(self.losses).sum(), reduction="sum"))
        rates = self.rates()
        values: dict[str, Any] = {
            "loss": total / self.tokens,
            "samples_per_second": rates["train_samples_per_second"],
            "audio_seconds_per_second": rates["train_audio_seconds_per_second"],
        }
        if self.grad_norm is not None:
            values["grad_norm"] = round(self.grad_norm, 5)
        self.reset()
        return values


def train(config: RunConfig) -> dict[str, Any]:
    run = TrainingRun(config)
    return run.run()
