"""The explicit accelerate training loop: set-up, the steps, evaluation, checkpoints and the export.

:class:`TrainingRun` follows torchtune's recipes: a cheap ``__init__`` that only keeps the config,
:meth:`~TrainingRun.setup` that loads everything, and :meth:`~TrainingRun.run`. What differs per
backend (DDP, ZeRO-2, ZeRO-3) is one step object (:mod:`toolkit.training.step`); the run owns the
batch plan, which everything else receives as an argument.

Out-of-memory errors back off on every rank together: the step's object applies its backend's
retry rule, the run halves the micro-batch (accumulation doubles, the global batch and so the
optimisation are unchanged), and the rest of the step's samples follow at the smaller size.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from toolkit.adapters import AdapterCheckpointHooks
from toolkit.config import ConfigError, RunConfig, dump_config
from toolkit.data.collator import WhisperCollator
from toolkit.data.corpora import open_sources
from toolkit.data.loader import TimedBatches
from toolkit.distributed import (
    all_reduce_max,
    broadcast_from_main,
    exit_with_launcher,
    process_group_kwargs,
    use_cpu,
)
from toolkit.evaluation.generate import GenerationSettings
from toolkit.evaluation.normalize import make_normalizer
from toolkit.memory.advice import advice_for_run, checkpointing_needed
from toolkit.modeling import LoadedModel, compile_layers, load_model, trainable_parameters
from toolkit.oom import Backoff, OutOfMemoryAtMicroBatchOne, free_memory, install_injector
from toolkit.output import append_skipped, export_model, push_to_hub, write_json
from toolkit.training import zero
from toolkit.training.batching import BatchPlan
from toolkit.training.checkpoint import CheckpointManager, SavedState, TrainState
from toolkit.training.evals import Evaluator, guard_breach
from toolkit.training.feeds import IndexedFeed
from toolkit.training.fingerprint import check_resume, fingerprint
from toolkit.training.lock import OutputLock
from toolkit.training.manifest import verify
from toolkit.training.metrics import MetricsLogger, StepStats, Window, peak_memory_gib, run_peak_flops
from toolkit.training.mixture import build_sampler
from toolkit.training.optim import build_optimizer, build_scheduler
from toolkit.training.probe import run_probe
from toolkit.training.rundata import load_run_data
from toolkit.training.signals import Preempted, StopSignal
from toolkit.training.step import NonFiniteTraining, StepParts, StepProgress, TrainStep, step_class
from toolkit.training.stream_feed import StreamFeed

logger = logging.getLogger(__name__)


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


class TrainingRun:
    """One ``train`` invocation: ``TrainingRun(config)``, then :meth:`setup`, then :meth:`run`."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.out = Path(config.output.dir)
        self.state = TrainState()
        self.metrics: MetricsLogger | None = None
        self.batches: Any = None
        self.backoff_seconds = 0.0
        self.probe_summary: dict[str, Any] | None = None
        self.nonfinite_streak = 0
        self.stopped_by: str | None = None
        """Why a guard set stopped the run early (``evaluation.guard[].max_rise``)."""
        self.lock = OutputLock(self.out)
        """Steps in a row whose update was skipped for a non-finite loss or gradient norm."""

    def close(self) -> None:
        """Stop the train loader's workers and release ``output.dir``: also after an error, where a
        live worker would otherwise hold the interpreter's exit (it ignores the stop signals)."""
        self.batches = None
        self.lock.release()

    # -- set-up -----------------------------------------------------------------------------------
    def setup(self) -> None:
        """Accelerator, model, data, batch plan, optimizer and the backend's step object.

        The order matters: the seed is set first and everything that draws random numbers (LoRA's
        initialisation) comes in the same order on every run, so a rerun is bit-identical.
        """
        config = self.config
        self.accelerator = acc = make_accelerator(config)
        exit_with_launcher()
        self._lock_output_dir()
        set_seed(config.training.seed)
        # Listing the data checks every spec and manifest: a bad one fails before the model loads.
        sources = open_sources(config.data)
        if config.training.gradient_checkpointing == "auto":
            config.training.gradient_checkpointing = checkpointing_needed(config, acc.num_processes, acc.device)
            logger.info("gradient checkpointing: %s (auto)", "on" if config.training.gradient_checkpointing else "off")
        with zero.full_weights_at_load(acc):
            self.loaded: LoadedModel = load_model(config.model, config.training, lora_cfg=config.lora, device=acc.device)
        skipped = self.out / "skipped.jsonl" if acc.is_main_process else None
        self.data = load_run_data(config, sources, self.loaded.processor.tokenizer,
                                  self.loaded.model.config.vocab_size, skipped)
        self.checkpoints = CheckpointManager(self.out / "checkpoints", config.output.keep_checkpoints, acc)
        self.checkpoints.clean_partial()
        # Read once: the plan starts from the micro-batch the run had found, before DeepSpeed is configured with it.
        self.saved: SavedState | None = self.checkpoints.latest_saved()
        self._check_recipe()
        self.plan = self._initial_plan()
        model_cfg = self.loaded.model.config
        self.collator = WhisperCollator(self.loaded.processor.feature_extractor, model_cfg.decoder_start_token_id,
                                        config.data.features_on, model_cfg.pad_token_id)
        self.normalize = make_normalizer(self.loaded.english, self.loaded.processor.tokenizer)
        self.evaluator = Evaluator(
            config, self.collator, self.loaded.processor.feature_extractor, self.loaded.processor.tokenizer,
            self.normalize, self.data.evals,
            [(guard, split.dataset) for guard, split in zip(config.evaluation.guard, self.data.guards, strict=True)],
        )
        model = self.loaded.model
        self.feed: IndexedFeed | StreamFeed
        if self.data.train is None:  # data.streaming
            self.feed = StreamFeed.open(sources["train"], config, self.loaded.processor.tokenizer,
                                        model.config.vocab_size, self.collator, model.config)
        else:
            self.sampler = build_sampler(self.data.train.dataset, self.data.mix, config.training.seed, acc.process_index)
            self.feed = IndexedFeed(self.data.train.dataset, self.sampler, self.collator,
                                    num_workers=config.data.num_workers, training=config.training, model_config=model.config)
        if config.training.compile:
            logger.info("compiled %d layers (torch.compile)", compile_layers(model, zero.zero_stage(acc)))
        optimizer = build_optimizer(model, config.training, acc.device)
        scheduler = build_scheduler(optimizer, config.training)
        # Counted before prepare: ZeRO-3 leaves each rank only its partition of every parameter.
        self.param_counts = trainable_parameters(model)
        install_injector(model, acc.process_index)
        # A partial, not a bound method: the step object must not hold the run (a cycle would keep
        # the run, and its loader's workers, alive until a garbage collection).
        advice = partial(advice_for_run, config, model.config, acc.num_processes,
                         self._worst_label_tokens(), acc.device)
        parts = StepParts(acc, model, optimizer, scheduler, model.config.pad_token_id,
                          model.config.decoder_start_token_id, config.training.max_grad_norm, advice)
        self.step: TrainStep = step_class(acc).prepare(parts, config.training, self.plan)
        if config.training.method == "lora":
            AdapterCheckpointHooks(acc).register()
        self.peak_flops = run_peak_flops(acc.device, config.training.mixed_precision, acc.num_processes)
        """The run's peak FLOP/s for MFU (None where the device is not in the table); the bench may set it."""

    def _lock_output_dir(self) -> None:
        """Rank 0 takes ``output.dir``'s lock for the whole run; every rank learns whether it could."""
        refusal = None
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            try:
                self.lock.acquire()
            except ConfigError as exc:
                refusal = str(exc)
        refusal = broadcast_from_main(refusal)
        if refusal:
            raise ConfigError(refusal)

    def _check_recipe(self) -> None:
        """Refuse a resume that changes the optimisation unless forced (:mod:`.fingerprint`); record the recipe."""
        now = fingerprint(self.config, self.data.train.dataset if self.data.train else None)
        name = check_resume(self.config, self.out, self.saved.state if self.saved else None, now)
        self.state.fingerprint = now
        if self.accelerator.is_main_process:
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(dump_config(self.config))
            tmp.replace(self.out / name)

    def _initial_plan(self) -> BatchPlan:
        cfg = self.config.training
        world = self.accelerator.num_processes
        micro = cfg.micro_batch_ceiling(world)
        found = self.saved.micro_batch_size if self.saved is not None else None
        if found:
            if found < micro:
                logger.info("resuming at the micro-batch found before: %d", found)
            micro = min(micro, found)
        # The config already refused a global batch that does not split over the launched processes.
        return BatchPlan.create(cfg.global_batch_size, max(micro, 1), world)

    def resume(self) -> None:
        if self.saved is None:
            return
        zero.check_resumable(self.accelerator, self.saved.path)
        zero.check_shards_are_plain(self.saved.path)  # before DeepSpeed unpickles them (a no-op without shards)
        self.accelerator.load_state(str(self.saved.path))
        if self.saved.scheduler is not None:
            self.step.scheduler.load_state_dict(self.saved.scheduler)
        self.state = self.saved.state
        if isinstance(self.feed, StreamFeed):
            self.feed.load_state_dict(self.state.stream)
        if self.accelerator.is_main_process:
            # skipped.jsonl was rewritten from the data at set-up; the skipped steps (and streamed rows) live in the checkpoint.
            append_skipped(self.out / "skipped.jsonl", [*self.state.stream_skips, *self.state.nonfinite_steps])
        logger.info("resumed from %s at step %d", self.saved.path, self.state.step)

    def train_loader(self, start: int, skip_samples: int = 0) -> Any:
        return self.feed.loader(start, self.plan, skip_samples)

    # -- one optimizer step -------------------------------------------------------------------------
    def train_step(self, step: int) -> StepStats:
        """This rank's micro-batches of ``step`` and one optimizer step, backing off on out-of-memory.

        When any rank runs out of memory, the step object applies its retry rule (DDP redoes the
        step, ZeRO continues it), all ranks back off together (:meth:`back_off`), and the samples of
        the step not yet in the gradient follow at the smaller micro-batch: each sample of the step
        contributes exactly once.
        """
        tick = time.perf_counter()
        waited = self.batches.waited
        samples = self.feed.step_samples(step, self.plan)
        feed_seconds = time.perf_counter() - tick  # a stream reads and decodes here: waiting for data too
        scale = self.accelerator.num_processes / samples.tokens
        progress = StepProgress.start(self.accelerator.device)
        while failed_ranks := self.step.accumulate(self.batches, self.plan, scale, progress):
            self.step.recover(progress)
            free_memory()  # out of the except block: what the failed attempt held goes back
            self.back_off(step, failed_ranks)
            self.batches = None  # its workers stop before the new loader's start
            self.batches = TimedBatches(self.train_loader(step, skip_samples=progress.samples))
        self.backoff_seconds += progress.lost_seconds
        update = self.step.finish(progress)
        if update.skipped is not None:
            self._skip_step(step, samples.ids(), update.skipped)
        else:
            self.nonfinite_streak = 0
        return StepStats(progress.loss_sum, samples.tokens, samples.clips, samples.seconds, time.perf_counter() - tick,
                         update.grad_norm, applied=update.skipped is None, windows=samples.windows, flops=samples.flops,
                         loader_seconds=self.batches.waited - waited + feed_seconds)

    def _skip_step(self, step: int, ids: list[str], reason: str) -> None:
        """Record a step whose update was skipped (its samples go to ``skipped.jsonl``); stop after too many."""
        self.nonfinite_streak += 1
        record = {"step": step, "reason": reason, "ids": ids}
        self.state.nonfinite_steps.append(record)
        logger.warning("step %d: %s on some rank; update skipped (%d in a row); samples: %s",
                       step, reason, self.nonfinite_streak, ", ".join(ids))
        if self.accelerator.is_main_process:
            append_skipped(self.out / "skipped.jsonl", [record])
        if self.metrics is not None:
            self.metrics.log(step, {"nonfinite": {"reason": reason, "streak": self.nonfinite_streak}})
        limit = self.config.training.max_nonfinite_steps
        if self.nonfinite_streak >= limit:
            newest = self.checkpoints.latest()
            raise NonFiniteTraining(
                f"{limit} steps in a row had a {reason} (last: step {step}); stopping. The newest checkpoint "
                f"({newest or 'none yet'}) holds finite weights; see skipped.jsonl for the samples. Check the "
                "learning rate and the data, or raise training.max_nonfinite_steps"
            )

    def save_checkpoint(self) -> None:
        """A checkpoint of the current step, refused (the run stops) if any weight is not finite."""
        if not self.step.weights_finite():
            raise NonFiniteTraining(
                f"the weights are not finite at step {self.state.step}; no checkpoint written. The newest "
                f"checkpoint ({self.checkpoints.latest() or 'none yet'}) is good: lower training.learning_rate"
            )
        self._collect_stream()
        self.checkpoints.save(self.state, self.plan, self.step.scheduler.state_dict())

    def _collect_stream(self) -> None:
        """A stream's positions into the state, and its skipped rows into ``skipped.jsonl`` (a collective)."""
        if not isinstance(self.feed, StreamFeed):
            return
        self.state.stream, skips = self.feed.collect()
        self.state.stream_skips += skips
        if skips and self.accelerator.is_main_process:
            append_skipped(self.out / "skipped.jsonl", skips)

    def back_off(self, step: int, failed_ranks: list[int]) -> None:
        """Halve the micro-batch on every rank (accumulation doubles) and re-prepare what depends on it."""
        smaller = self.plan.smaller()
        if smaller is None:
            raise OutOfMemoryAtMicroBatchOne(
                f"rank(s) {failed_ranks} ran out of memory at micro-batch 1 (step {step}, "
                f"{self.config.training.global_batch_size} global batch): nothing smaller to try; {self.step.parts.advice()}"
            )
        record = Backoff(self.plan.micro_batch_size, smaller.micro_batch_size, step)
        logger.warning(
            "rank %d: out of memory on rank(s) %s at step %d: micro-batch %d -> %d, accumulation %d -> %d, "
            "global batch %d unchanged", self.accelerator.process_index, failed_ranks, step, self.plan.micro_batch_size,
            smaller.micro_batch_size, self.plan.accumulation, smaller.accumulation, smaller.global_batch_size,
        )
        self._apply_plan(smaller)
        self.state.backoffs.append(record.to_dict())
        if self.metrics is not None:
            self.metrics.log(step, {"backoff": record.to_dict(), **self._batch_values()})

    def _apply_plan(self, plan: BatchPlan) -> None:
        self.plan = plan
        self.step.resize(plan)

    def _batch_values(self) -> dict[str, int]:
        return {"micro_batch_size": self.plan.micro_batch_size, "gradient_accumulation_steps": self.plan.accumulation}

    def _worst_label_tokens(self) -> int:
        """The most decoder positions a training sample can take (timestamps and prompts included)."""
        return min(self.feed.worst_positions(self.config.data.max_label_tokens), self.loaded.model.config.max_target_positions)

    def probe(self) -> None:
        """Find the largest micro-batch that fits a worst-case batch before the first step (:mod:`.probe`)."""
        result = run_probe(self.step, self.plan, self.loaded.model.config, self._worst_label_tokens(), self.state.step)
        if result.plan != self.plan:
            self._apply_plan(result.plan)
        self.state.backoffs += [b.to_dict() for b in result.backoffs]
        self.probe_summary = result.summary
        if self.metrics is not None:
            self.metrics.log(self.state.step, {"probe": self.probe_summary, **self._batch_values()})

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        """Metrics of the eval split and the guard sets; generation backs off on its own (its memory is not training's)."""
        eval_cfg = self.config.evaluation
        batch_size = min(eval_cfg.batch_size, self.state.eval_batch_size or eval_cfg.batch_size)
        settings = GenerationSettings.from_config(
            eval_cfg, batch_size=batch_size, num_workers=self.config.data.num_workers,
            autocast=self.accelerator.autocast, synced_gpus=self.step.synced_generation,
        )
        metrics, result = self.evaluator.run(self.accelerator.unwrap_model(self.step.model), settings)
        if result is not None:
            self.state.eval_batch_size = result.batch_size
            for backoff in result.backoffs:
                record = {"step": self.state.step, **backoff}
                self.state.eval_backoffs.append(record)
                if self.metrics is not None:
                    self.metrics.log(self.state.step, {"eval_backoff": record})
        return metrics

    @property
    def evaluates(self) -> bool:
        return bool(self.data.evals or self.data.guards)

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.config.training
        acc = self.accelerator
        self.resume()
        metrics = self.metrics = MetricsLogger(self.out, acc.is_main_process, resume_step=self.state.step)
        if self.saved is None and cfg.probe:
            self.probe()
        trainable, total_params = self.param_counts
        logger.info(
            "%s | %s training samples | %d steps (%.2f epochs) | %.1fM of %.1fM parameters trainable",
            self.plan.describe(), self.feed.num_samples or "streamed", cfg.max_steps,
            self.feed.epoch_of(cfg.max_steps, self.plan), trainable / 1e6, total_params / 1e6,
        )
        if acc.is_main_process:
            print(f"effective global batch: {self.plan.describe()}", flush=True)
        if self.evaluates and self.config.evaluation.at_start and self.state.step == 0:
            self.state.baseline_eval = baseline = self.evaluate()
            metrics.log(0, {f"eval/{k}": v for k, v in baseline.items()})
            logger.info("baseline eval: %s", baseline)

        start_step = self.state.step
        window, totals = Window(self.peak_flops), Window(self.peak_flops)
        last_eval: dict[str, Any] | None = None
        progress = tqdm(total=cfg.max_steps, initial=start_step, disable=not acc.is_main_process, desc="train")
        self.batches = TimedBatches(self.train_loader(start_step))
        self.step.model.train()
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
                    if values["loss"] is not None:
                        progress.set_postfix(loss=f"{values['loss']:.4f}")
                is_best = False
                every = self.config.evaluation.every_steps
                if self.evaluates and every and (self.state.step % every == 0 or done):
                    # The train loader's workers stop during the evaluation (its own start); the
                    # sample order is a function of the step, so a new loader goes on exactly.
                    self.batches = None
                    last_eval = self.evaluate()
                    is_best = self.state.record_eval(self.state.step, last_eval)
                    metrics.log(self.state.step, {f"eval/{k}": v for k, v in last_eval.items()})
                    logger.info("step %d eval: %s", self.state.step, last_eval)
                    self.stopped_by = guard_breach(self.state.evals_since_start(), self.config.evaluation.guard)
                    done = done or self.stopped_by is not None
                    if not done:
                        self.batches = TimedBatches(self.train_loader(self.state.step))
                preempt = all_reduce_max(stop.received is not None, acc.device)
                if is_best or done or preempt or (cfg.save_every and self.state.step % cfg.save_every == 0):
                    self.save_checkpoint()
                if preempt and not done:
                    progress.close()
                    metrics.close()
                    self.batches = None
                    raise Preempted(self.state.step)
                if self.stopped_by:
                    logger.warning("stopping at step %d: %s", self.state.step, self.stopped_by)
                    break
        progress.close()
        # Shut the train loader's workers down now: not alongside the final evaluation's, and not at
        # interpreter exit (multiprocessing would terminate() them, and they ignore stop signals).
        self.batches = None
        results = self.finish(last_eval, totals)
        if results.get("eval"):
            metrics.log(self.state.step, {"final/" + k: v for k, v in results["eval"].items()})
        metrics.close()
        return results

    def log_values(self, window: Window) -> dict[str, Any]:
        values = window.flush(self.accelerator)
        values["lr"] = self.step.scheduler.get_last_lr()[0]
        values["epoch"] = round(self.feed.epoch_of(self.state.step, self.plan), 4)
        values["peak_memory_gib"] = round(peak_memory_gib(self.accelerator.device), 3)
        values.update(self._batch_values())
        return values

    def finish(self, last_eval: dict[str, Any] | None, totals: Window) -> dict[str, Any]:
        """Final eval and export; ``totals`` covers the steps this invocation trained."""
        acc = self.accelerator
        self._collect_stream()
        if self.config.output.final_model == "best" and self.state.best_step not in (None, self.state.step):
            best = self.checkpoints.path_for(self.state.best_step)  # type: ignore[arg-type]
            problem = verify(best)
            if problem is None:
                acc.load_state(str(best))
                logger.info("final model: best checkpoint %s (wer %.3f)", best, self.state.best_metric)
                last_eval = None
            else:
                logger.warning("final model: the last weights, since the best checkpoint %s is damaged (%s)",
                               best, problem)
        if self.evaluates and last_eval is None:
            last_eval = self.evaluate()
        results: dict[str, Any] = {
            "eval": last_eval,
            "baseline_eval": self.state.baseline_eval,
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
            "train_samples": self.feed.num_samples,
            "packing": self.config.data.packing and not self.config.data.streaming,
            "train_clips": totals.samples,
            "train_windows": totals.windows,
            "train_audio_hours": round(totals.audio / 3600, 4),
            **totals.rates(),
            "train_runtime_s": round(totals.seconds, 2),
            "skipped": sum(len(split.skips) for split in self.data.splits()) + len(self.state.stream_skips),
            "stopped_by_guard": self.stopped_by,
            "final_model": self.config.output.final_model,
        }
        acc.wait_for_everyone()
        state_dict = self.step.export_state_dict()  # a collective under ZeRO-3: on every rank
        if acc.is_main_process:
            final_dir = self.out / "final"
            export_model(
                acc.unwrap_model(self.step.model), self.loaded.processor, final_dir, self.config, results, state_dict=state_dict
            )
            if self.config.output.push_to_hub:
                results["hub_url"] = push_to_hub(final_dir, self.config.output.hub_model_id or "", self.config.output.hub_private)
            write_json(self.out / "results.json", results)
            logger.info("results: %s", self.out / "results.json")
        acc.wait_for_everyone()
        return results


def train(config: RunConfig) -> dict[str, Any]:
    run = TrainingRun(config)
    try:
        run.setup()
        return run.run()
    finally:
        run.close()
