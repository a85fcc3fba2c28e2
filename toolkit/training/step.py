"""One optimizer step, one class per backend: :class:`DDPStep`, :class:`ZeroStep`, :class:`Zero3Step`.

The loop (:mod:`toolkit.training.loop`) owns the batch plan, the data and the records; a step
object owns what differs between backends:

* :meth:`TrainStep.accumulate` runs this rank's remaining micro-batches of the step (forward and
  backward, gradients accumulated) and returns the ranks that ran out of memory, agreed on every
  rank;
* :meth:`TrainStep.recover` applies the backend's retry rule after such a failure, so that the
  loop can go on with the rest of the step at a smaller micro-batch;
* :meth:`TrainStep.resize` tells the backend about the new micro-batch;
* :meth:`TrainStep.probe` runs the worst-case probe's passes at one size;
* :meth:`TrainStep.finish` reduces, clips and applies the update, unless the loss or the gradient
  norm is not finite on some rank (agreed on every rank): then the update is skipped (DDP) or, where
  it already happened inside the backward (ZeRO), the run stops before it can save such weights.

The loss of a micro-batch is the sum of its token losses times ``scale`` = world size / label
tokens of the whole global step, so the gradient is the token-level mean of the global batch however
the step is split over micro-batches and processes (DDP's averaging over ranks cancels the factor
``world``). A new backend (FSDP, say) is a new subclass; the loop does not change.
"""

from __future__ import annotations

import contextlib
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from transformers.models.whisper.modeling_whisper import shift_tokens_right

from toolkit.config import TrainingConfig
from toolkit.data.collator import IGNORE_INDEX, Batch
from toolkit.distributed import all_reduce_max, average_gradients
from toolkit.oom import UnrecoverableOutOfMemory, free_memory, is_out_of_memory, oom_ranks
from toolkit.training import zero
from toolkit.training.batching import BatchPlan
from toolkit.training.optim import build_scheduler


def loss_sum(model: Any, batch: Batch, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """Summed token cross-entropy of a micro-batch."""
    assert batch.labels is not None
    decoder_input_ids = batch.decoder_input_ids
    if decoder_input_ids is None:
        decoder_input_ids = shift_tokens_right(batch.labels, pad_token_id, decoder_start_token_id)
    logits = model(input_features=batch.input_features, decoder_input_ids=decoder_input_ids).logits
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), batch.labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


@dataclass
class RngState:
    """torch's CPU and current-GPU generator states (dropout): the one way the toolkit saves and restores them."""

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


@contextlib.contextmanager
def rng_unchanged(device: torch.device) -> Iterator[None]:
    """Leave the random generators as they were before the block, whatever it draws or raises."""
    state = RngState.capture(device)
    try:
        yield
    finally:
        state.restore()


@dataclass
class StepProgress:
    """How far this rank is into an optimizer step, across out-of-memory retries."""

    loss_sum: torch.Tensor
    """Summed token loss of the micro-batches whose gradient is in."""
    rng: RngState
    """The generators at the start of the step, for a backend that redoes it."""
    samples: int = 0
    """This rank's samples of the step whose gradient is in."""
    lost_seconds: float = 0.0
    """Time spent on attempts that ran out of memory."""

    @classmethod
    def start(cls, device: torch.device) -> StepProgress:
        return cls(torch.zeros((), device=device), RngState.capture(device))


class NonFiniteTraining(RuntimeError):
    """Training cannot go on: non-finite steps persist, or the weights are no longer finite."""


@dataclass(frozen=True)
class Update:
    """What :meth:`TrainStep.finish` did."""

    grad_norm: float | None
    """The global gradient norm before clipping, when known."""
    skipped: str | None = None
    """Why the update was skipped ("non-finite loss", "non-finite gradient norm"), None if applied."""


def agreed_nonfinite(loss_sum: torch.Tensor, grad_norm: float | None, device: torch.device) -> str | None:
    """Whether this step's loss (any rank's) or the global gradient norm is non-finite; the same on every rank."""
    bad_grad = grad_norm is not None and not math.isfinite(grad_norm)
    flags = torch.tensor([0 if bool(torch.isfinite(loss_sum)) else 1, int(bad_grad)], device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    if flags[0]:
        return "non-finite loss"
    return "non-finite gradient norm" if flags[1] else None


@dataclass
class StepParts:
    """What every backend's step works on, after ``accelerator.prepare``."""

    accelerator: Accelerator
    model: Any
    optimizer: Any
    scheduler: Any
    pad_token_id: int
    decoder_start_token_id: int
    max_grad_norm: float | None
    advice: Callable[[], str] = field(repr=False)
    """What to try when even micro-batch 1 does not fit (the memory planner's modes)."""


class TrainStep(ABC):
    """One optimizer step on one backend; see the module docstring for the protocol."""

    synced_generation: ClassVar[bool] = False
    """Whether every rank must take part in every generation step (evaluation)."""

    def __init__(self, parts: StepParts, input_dtype: torch.dtype | None = None):
        self.parts = parts
        self.accelerator = parts.accelerator
        self.device = parts.accelerator.device
        self.input_dtype = input_dtype
        """Under DeepSpeed the whole model is cast to fp16/bf16 (no autocast): inputs must match."""

    @classmethod
    @abstractmethod
    def prepare(cls, parts: StepParts, cfg: TrainingConfig, plan: BatchPlan) -> TrainStep:
        """``accelerator.prepare`` the model and optimizer of ``parts`` for this backend; the step to run."""

    @property
    def model(self) -> Any:
        return self.parts.model

    @property
    def scheduler(self) -> Any:
        return self.parts.scheduler

    def batch_on_device(self, batch: Batch) -> Batch:
        return batch.to(self.device, self.input_dtype)

    def micro_loss(self, batch: Batch) -> torch.Tensor:
        return loss_sum(self.parts.model, batch, self.parts.pad_token_id, self.parts.decoder_start_token_id)

    @abstractmethod
    def accumulate(self, batches: Iterator[Batch], plan: BatchPlan, scale: float, progress: StepProgress) -> list[int]:
        """Forward/backward over this rank's micro-batches until its share of the step is in ``progress``.

        Returns the ranks that ran out of memory (the same list on every rank); empty when done.
        """

    @abstractmethod
    def recover(self, progress: StepProgress) -> None:
        """After an out-of-memory attempt: leave in ``progress`` (and the gradients) what the step keeps."""

    @abstractmethod
    def resize(self, plan: BatchPlan) -> None:
        """The micro-batch changed (a back-off); backends that fixed it at ``prepare`` follow."""

    def probe(self, batch: Batch, plan: BatchPlan) -> list[int]:
        """Two forward/backward passes of ``batch`` (the second with the first's gradients in memory, as
        in accumulation) that leave the weights, the gradients the step will use and the generators as
        they were; the ranks that ran out of memory. ``plan`` is the plan being tried."""
        with rng_unchanged(self.device):
            failed = self._probe_passes(batch, plan)
        free_memory()
        return failed

    @abstractmethod
    def _probe_passes(self, batch: Batch, plan: BatchPlan) -> list[int]: ...

    @abstractmethod
    def _reduce_and_clip(self) -> float | None:
        """Make the gradients global and clip them; the pre-clip global norm when known."""

    def finish(self, progress: StepProgress) -> Update:
        """Apply the step's update, or skip it when the loss or gradient norm is not finite on any rank."""
        grad_norm = self._reduce_and_clip()
        skipped = agreed_nonfinite(progress.loss_sum, grad_norm, self.device)
        if skipped is None:
            self.parts.optimizer.step()
            if not self.accelerator.optimizer_step_was_skipped:  # fp16 overflow: the lr schedule waits too
                self.parts.scheduler.step()
        self.parts.optimizer.zero_grad(set_to_none=True)
        return Update(grad_norm, skipped)

    def weights_finite(self) -> bool:
        """Whether every rank's weights (its partition, under ZeRO-3) are finite: checked before a save."""
        local = all(bool(torch.isfinite(p).all()) for p in self.parts.model.parameters() if p.is_floating_point())
        return not all_reduce_max(not local, self.device)

    def export_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full weights for the final export when the module's own are not (None: save the module)."""
        return None

    def _unrecoverable(self, plan: BatchPlan, where: str, why: str) -> UnrecoverableOutOfMemory:
        smaller = plan.smaller()
        fix = (f"rerun the same command with training.micro_batch_size={smaller.micro_batch_size} "
               "(it resumes from the last checkpoint)" if smaller else self.parts.advice())
        return UnrecoverableOutOfMemory(
            f"rank {self.accelerator.process_index} ran out of memory in the {where} at micro-batch "
            f"{plan.micro_batch_size}, where the other ranks cannot be told ({why}); {fix}"
        )


class DDPStep(TrainStep):
    """DDP, or a single process. Retry rule: **the step is redone** from its start.

    DDP would all-reduce inside the last backward, where a rank that runs out of memory would leave
    the others waiting in the collective; so every backward runs under ``no_sync``, the ranks agree
    on out-of-memory once all micro-batches are through, and only then are the gradients averaged
    (:func:`~toolkit.distributed.average_gradients`). A rank that fails skips its remaining
    micro-batches. After a failure the gradients are zeroed and the generators restored, so the
    redone step draws the same dropout masks as a run started at the smaller micro-batch.
    """

    @classmethod
    def prepare(cls, parts: StepParts, cfg: TrainingConfig, plan: BatchPlan) -> DDPStep:
        parts.model, parts.optimizer = parts.accelerator.prepare(parts.model, parts.optimizer)
        return cls(parts)

    def accumulate(self, batches: Iterator[Batch], plan: BatchPlan, scale: float, progress: StepProgress) -> list[int]:
        tick = time.perf_counter()
        failed = False
        while progress.samples < plan.per_rank:
            batch = self.batch_on_device(next(batches))
            summed = self._unsynced_forward_backward(batch, scale)
            if summed is None:
                failed = True
                break
            progress.loss_sum += summed
            progress.samples += len(batch.ids)
        ranks = oom_ranks(failed, self.device)
        if ranks:
            progress.lost_seconds += time.perf_counter() - tick
        return ranks

    def recover(self, progress: StepProgress) -> None:
        progress.loss_sum.zero_()
        progress.samples = 0
        self.parts.optimizer.zero_grad(set_to_none=True)
        progress.rng.restore()

    def resize(self, plan: BatchPlan) -> None:
        """Nothing to do: DDP does not know the micro-batch, which the loop alone cuts."""

    def _unsynced_forward_backward(self, batch: Batch, scale: float) -> torch.Tensor | None:
        """Summed loss of one micro-batch, gradients accumulated without DDP's sync; None on OOM."""
        try:
            with self.accelerator.no_sync(self.parts.model):
                summed = self.micro_loss(batch)
                self.accelerator.backward(summed * scale)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            return None
        return summed.detach()

    def _probe_passes(self, batch: Batch, plan: BatchPlan) -> list[int]:
        failed = any(self._unsynced_forward_backward(batch, 0.0) is None for _ in range(2))
        self.parts.optimizer.zero_grad(set_to_none=True)
        return oom_ranks(failed, self.device)

    def _reduce_and_clip(self) -> float | None:
        average_gradients(self.parts.model.parameters())
        if self.parts.max_grad_norm is None:
            # Not clipping, but the norm is still needed: a non-finite one skips the update.
            grads = [p.grad for p in self.parts.model.parameters() if p.grad is not None]
            return float(torch.nn.utils.get_total_norm(grads)) if grads else None
        norm = self.accelerator.clip_grad_norm_(self.parts.model.parameters(), self.parts.max_grad_norm)
        return float(norm) if norm is not None else None


class ZeroStep(TrainStep):
    """DeepSpeed ZeRO-2 (optionally with offload). Retry rule: **the step continues** where it failed.

    ZeRO-2 reduces gradients inside every backward, so the ranks agree on out-of-memory between each
    forward and its backward, where no collective is in flight. Micro-batches that completed keep
    their gradient (ZeRO has already reduced it); the rest of the step's samples follow at the
    smaller micro-batch. An OOM inside a backward cannot be told to the other ranks and ends the run
    with the size to set. The update happens inside the step's last backward (see :mod:`.zero`).
    """

    where_forward_fails: ClassVar[str] = ""
    """Why an OOM in the forward cannot back off ('' when the ranks can agree there)."""

    @classmethod
    def prepare(cls, parts: StepParts, cfg: TrainingConfig, plan: BatchPlan) -> ZeroStep:
        accelerator = parts.accelerator
        zero.fill_config(accelerator, plan, cfg)
        parts.model, parts.optimizer = accelerator.prepare(parts.model, parts.optimizer)
        parts.scheduler = zero.ensure_scheduler_drives(parts.scheduler, parts.optimizer, cfg, build_scheduler)
        return cls(parts, zero.compute_dtype(accelerator))

    def accumulate(self, batches: Iterator[Batch], plan: BatchPlan, scale: float, progress: StepProgress) -> list[int]:
        while progress.samples < plan.per_rank:
            tick = time.perf_counter()
            batch = self.batch_on_device(next(batches))
            summed, ranks = self._forward(batch, plan, "forward")
            if ranks:
                progress.lost_seconds += time.perf_counter() - tick
                return ranks
            if all_reduce_max(not bool(torch.isfinite(summed)), self.device):  # type: ignore[arg-type]
                raise NonFiniteTraining(
                    "non-finite loss under DeepSpeed, whose update happens inside the backward and cannot be "
                    "skipped: stopping before it reaches the weights; the newest checkpoint is good"
                )
            last = progress.samples + len(batch.ids) == plan.per_rank
            self._backward(summed * scale, last, plan, "backward")
            progress.loss_sum += summed.detach()
            progress.samples += len(batch.ids)
        return []

    def recover(self, progress: StepProgress) -> None:
        """Nothing to undo: the completed micro-batches' gradients are already reduced and kept."""

    def resize(self, plan: BatchPlan) -> None:
        zero.resize(self.accelerator, plan)

    def _forward(self, batch: Batch, plan: BatchPlan, where: str) -> tuple[torch.Tensor | None, list[int]]:
        """Summed loss, and the ranks whose forward ran out of memory (agreed)."""
        summed = None
        try:
            summed = self.micro_loss(batch)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
        return summed, oom_ranks(summed is None, self.device)  # no collective is in flight here

    def _backward(self, loss: torch.Tensor, last: bool, plan: BatchPlan, where: str) -> None:
        try:
            zero.backward(self.accelerator, loss, last)
        except Exception as exc:
            if is_out_of_memory(exc):
                raise self._unrecoverable(plan, where, "ZeRO reduces gradients inside it") from None
            raise

    def _probe_passes(self, batch: Batch, plan: BatchPlan) -> list[int]:
        for _ in range(2):
            summed, ranks = self._forward(batch, plan, "probe's forward")
            if ranks:
                return ranks
            # A zero gradient into ZeRO's buffers: x + 0 == x, so the first step is unchanged.
            self._backward(summed * 0.0, False, plan, "probe's backward")  # type: ignore[operator]
            del summed
        return []

    def _reduce_and_clip(self) -> float | None:
        return zero.grad_norm(self.accelerator)  # DeepSpeed reduced and clipped in the last backward

    def finish(self, progress: StepProgress) -> Update:
        """The update already happened inside the last backward: a non-finite norm there is fatal."""
        update = super().finish(progress)
        if update.skipped is not None and not self.accelerator.optimizer_step_was_skipped:
            raise NonFiniteTraining(f"{update.skipped} under DeepSpeed after the update was applied; "
                                    "the newest checkpoint is good")
        return update


class Zero3Step(ZeroStep):
    """DeepSpeed ZeRO-3. Retry rule: as ZeRO-2, but an OOM in a forward ends the run too.

    Every ZeRO-3 forward gathers the weights from all ranks: a rank that fails there leaves the
    others inside a collective, so there is no safe point to agree and nothing backs off. Generation
    must be synced across ranks, and the export gathers the partitioned weights.
    """

    synced_generation = True

    def _forward(self, batch: Batch, plan: BatchPlan, where: str) -> tuple[torch.Tensor | None, list[int]]:
        try:
            return self.micro_loss(batch), []
        except Exception as exc:
            if is_out_of_memory(exc):
                raise self._unrecoverable(plan, where, "ZeRO-3 gathers the weights from all ranks in it") from None
            raise

    def export_state_dict(self) -> dict[str, torch.Tensor] | None:
        # A collective, so on every rank; rank 0 receives the gathered weights.
        return self.accelerator.get_state_dict(self.parts.model)


def step_class(accelerator: Accelerator) -> type[TrainStep]:
    """The step object for this launch."""
    stage = zero.zero_stage(accelerator)
    if stage is None:
        return DDPStep
    return Zero3Step if stage == 3 else ZeroStep
