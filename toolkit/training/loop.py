"""The explicit accelerate training loop.

One optimizer step = this rank's micro-batches of that step (see :mod:`toolkit.training.batching`).
The loss is the sum of token losses divided by the label tokens of the *whole global step*, so the
gradient is the same however the step is split into micro-batches and processes: the token-level
mean of the global batch (Trainer's per-micro-batch mean is not). DDP averages gradients over
ranks, hence the factor ``world_size``. Under DeepSpeed ZeRO the same loss and the same gradient
result; what differs (auto config, backward/step, clipping, ZeRO-3 eval and export) is in
:mod:`toolkit.training.zero`.
"""

from __future__ import annotations

import contextlib
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
    ignore_stop_signals,
    process_group_kwargs,
    use_cpu,
)
from toolkit.evaluation.generate import evaluate_model
from toolkit.evaluation.normalize import make_normalizer
from toolkit.modeling import LoadedModel, load_model, trainable_parameters
from toolkit.output import export_model, push_to_hub, write_json, write_skipped
from toolkit.training import zero
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
        self.plan = BatchPlan.create(
            config.training.global_batch_size, config.training.micro_batch_size, self.accelerator.num_processes
        )
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
        self.checkpoints = CheckpointManager(self.out / "checkpoints", config.output.keep_checkpoints, self.accelerator)
        self.state = TrainState()
        self.sampler = StepSampler(len(self.data.train.dataset), self.plan, config.training.seed, self.accelerator.process_index)
        self.baseline: dict[str, Any] | None = None

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

    def resume(self) -> None:
        self.checkpoints.clean_partial()
        latest = self.checkpoints.latest()
        if latest is None:
            return
        zero.check_resumable(self.accelerator, latest)
        self.accelerator.load_state(str(latest))
        self.state = TrainState.load(latest)
        logger.info("resumed from %s at step %d", latest, self.state.step)

    def train_loader(self, start: int) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self.data.train.dataset,
            batch_sampler=StepBatchSampler(self.sampler, start, self.config.training.max_steps),
            collate_fn=self.collator,
            num_workers=self.config.data.num_workers,
            persistent_workers=False,
            worker_init_fn=ignore_stop_signals,
            # Its own generator: creating the iterator draws a worker seed, which must not consume
            # the global RNG that dropout uses (a resumed run would then diverge from an unbroken one).
            generator=torch.Generator().manual_seed(self.config.training.seed + start),
        )

    # -- one optimizer step -------------------------------------------------------------------------
    def train_step(self, step: int, batches: Any) -> StepStats:
        """Forward/backward over this rank's micro-batches of ``step``, then one optimizer step."""
        tick = time.perf_counter()
        indices = self.sampler.step_indices(step)
        step_tokens = int(self.data.label_lengths[indices].sum())
        scale = self.accelerator.num_processes / step_tokens
        total = torch.zeros((), device=self.accelerator.device)
        for micro in range(self.plan.accumulation):
            batch = next(batches).to(self.accelerator.device, self.input_dtype)
            last = micro == self.plan.accumulation - 1
            if self.deepspeed:
                # The engine reduces, clips and steps (once) inside the last micro-batch's backward.
                summed = loss_sum(self.model, batch, self.pad_id, self.start_id)
                zero.backward(self.accelerator, summed * scale, last)
                total += summed.detach()
                continue
            # Gradients are all-reduced once, on the step's last micro-batch.
            sync = contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)
            with sync:
                summed = loss_sum(self.model, batch, self.pad_id, self.start_id)
                self.accelerator.backward(summed * scale)
            total += summed.detach()
        grad_norm = None
        if self.deepspeed:
            grad_norm = zero.grad_norm(self.accelerator)
        elif self.config.training.max_grad_norm is not None:
            norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.training.max_grad_norm)
            grad_norm = float(norm) if norm is not None else None
        self.optimizer.step()
        if not self.accelerator.optimizer_step_was_skipped:  # fp16 overflow: the lr schedule waits too
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        audio = float(self.data.train.dataset.durations[indices].sum())
        return StepStats(total, step_tokens, len(indices), audio, time.perf_counter() - tick, grad_norm)

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        assert self.data.eval is not None
        eval_cfg = self.config.evaluation
        result = evaluate_model(
            self.accelerator.unwrap_model(self.model), self.data.eval.dataset, self.collator,
            self.loaded.processor.tokenizer, self.normalize, batch_size=eval_cfg.batch_size,
            max_new_tokens=eval_cfg.max_new_tokens, num_beams=eval_cfg.num_beams,
            num_workers=self.config.data.num_workers, autocast=self.accelerator.autocast,
            synced_gpus=self.zero_stage == 3,  # ZeRO-3: every forward gathers parameters from all ranks
        )
        return result.metrics

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.config.training
        acc = self.accelerator
        self.resume()
        self.state.micro_batch_size = self.plan.micro_batch_size
        self.state.gradient_accumulation_steps = self.plan.accumulation
        metrics = MetricsLogger(self.out, acc.is_main_process, resume_step=self.state.step)
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
        batches = iter(self.train_loader(start_step))
        self.model.train()
        with StopSignal() as stop:
            for step in range(start_step, cfg.max_steps):
                stats = self.train_step(step, batches)
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
