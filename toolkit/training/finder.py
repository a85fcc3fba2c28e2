"""The auto batch-size finder: out-of-memory detection, the all-ranks back-off and its records.

Why not accelerate's ``find_executable_batch_size`` or Trainer's ``auto_find_batch_size``: the first
shrinks the batch on the rank that failed while the others wait in a collective, the second never
rescales gradient accumulation (the optimisation changes) and refuses DeepSpeed. Here:

* Every rank learns of an out-of-memory error through one small all-reduce (:func:`oom_ranks`),
  placed where no other collective can be in flight, and all ranks back off together.
* A back-off halves the micro-batch (to the largest divisor of the per-rank batch at most half the
  old one) and so doubles accumulation: micro x accumulation x world size stays the configured
  global batch (:meth:`BatchPlan.smaller <toolkit.training.batching.BatchPlan.smaller>`).
* What the loop does around it (where the agreement sits, how a failed step is redone) is in
  :mod:`toolkit.training.loop`; the worst-case probe's batch is built by :func:`worst_case_batch`.

The test-only fault injector (:class:`OutOfMemoryInjector`, ``TOOLKIT_INJECT_OOM=RANK:LIMIT``)
raises a real ``torch.OutOfMemoryError`` on one rank, so the multi-process tests exercise the same
code path as a CUDA allocator failure.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size

from toolkit.data.collator import Batch
from toolkit.launch import LaunchInfo
from toolkit.training.batching import BatchPlan

logger = logging.getLogger(__name__)

INJECT_ENV = "TOOLKIT_INJECT_OOM"

_ALLOCATION_FAILURES = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDA error: out of memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure that a smaller batch can cure: torch's (CUDA, CPU), cuBLAS', bitsandbytes'.

    DeepSpeed and bitsandbytes allocate through torch, so their failures arrive as
    ``torch.OutOfMemoryError`` too; accelerate's :func:`should_reduce_batch_size` knows the other
    backends' messages.
    """
    if isinstance(exc, torch.OutOfMemoryError) or should_reduce_batch_size(exc):  # type: ignore[arg-type]
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _ALLOCATION_FAILURES)


def free_memory() -> None:
    """Return what the failed attempt held to the allocator (call outside the ``except`` block)."""
    clear_device_cache(garbage_collection=True)


def oom_ranks(failed: bool, device: torch.device) -> list[int]:
    """The ranks that ran out of memory, known on every rank (one all-reduce of ``world`` ints)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [0] if failed else []
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    flags = torch.zeros(world, dtype=torch.int32, device=device)
    flags[rank] = int(failed)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.SUM)
    return [r for r, flag in enumerate(flags.tolist()) if flag]


@dataclass(frozen=True)
class Backoff:
    """One back-off: at optimizer step ``step`` the micro-batch went from ``before`` to ``after``."""

    step: int
    before: int
    after: int

    def to_dict(self) -> dict[str, int]:
        return {"step": self.step, "from": self.before, "to": self.after}


class OutOfMemoryAtMicroBatchOne(RuntimeError):
    """Even one sample per forward pass does not fit; raised on every rank (they agreed on it)."""


class UnrecoverableOutOfMemory(RuntimeError):
    """An OOM where the ranks cannot agree safely (inside a collective): the run must stop."""


def search(plan: BatchPlan, attempt: Callable[[int], list[int]], step: int = 0) -> tuple[BatchPlan, list[Backoff]]:
    """The plan with the largest micro-batch, from ``plan``'s down, for which ``attempt(micro)`` reports
    no rank out of memory.

    ``attempt`` runs on every rank and returns the agreed list of failing ranks, so every rank walks
    the same sizes. Raises :class:`OutOfMemoryAtMicroBatchOne` (on every rank) when 1 fails.
    """
    backoffs: list[Backoff] = []
    while failed := attempt(plan.micro_batch_size):
        smaller = plan.smaller()
        if smaller is None:
            raise OutOfMemoryAtMicroBatchOne(f"rank(s) {failed} ran out of memory at micro-batch 1")
        logger.warning("micro-batch %d ran out of memory on rank(s) %s; trying %d",
                       plan.micro_batch_size, failed, smaller.micro_batch_size)
        backoffs.append(Backoff(step, plan.micro_batch_size, smaller.micro_batch_size))
        plan = smaller
    return plan, backoffs


def worst_case_batch(
    micro: int, num_mel_bins: int, frames: int, label_tokens: int, vocab_size: int, device: torch.device,
    dtype: torch.dtype | None = None, seed: int = 0,
) -> Batch:
    """``micro`` full 30 s windows with ``label_tokens`` label tokens each: the most memory a step can take.

    Whisper pads every clip to 30 s, so only the label length varies between real batches.
    """
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(micro, num_mel_bins, frames, generator=generator)
    labels = torch.randint(0, vocab_size, (micro, label_tokens), generator=generator)
    batch = Batch(input_features=features, labels=labels, ids=[f"probe-{i}" for i in range(micro)], texts=[""] * micro)
    return batch.to(device, dtype)


class OutOfMemoryInjector:
    """Test-only: ``TOOLKIT_INJECT_OOM=RANK:LIMIT`` makes every forward pass on rank RANK whose batch
    is larger than LIMIT raise ``torch.OutOfMemoryError``, before any work (or collective) of that pass.

    ``RANK:LIMIT:SPARE`` lets the first SPARE such passes through, so that the failure can land on a
    later micro-batch of a step (after others have put their gradients in).
    """

    def __init__(self, rank: int, limit: int, spare: int = 0):
        self.rank, self.limit, self.spare = rank, limit, spare
        self.raised = 0

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> OutOfMemoryInjector | None:
        spec = (environ if environ is not None else os.environ).get(INJECT_ENV, "").strip()
        if not spec:
            return None
        parts = spec.split(":")
        try:
            if len(parts) not in (2, 3):
                raise ValueError
            parsed = cls(*(int(part) for part in parts))
        except ValueError:
            raise ValueError(f"{INJECT_ENV}={spec!r}: expected RANK:LIMIT or RANK:LIMIT:SPARE, like 1:4") from None
        if min(parsed.rank, parsed.limit, parsed.spare) < 0:
            raise ValueError(f"{INJECT_ENV}={spec!r}: the numbers must be >= 0")
        return parsed

    def check(self, rank: int, batch_size: int) -> None:
        if rank == self.rank and batch_size > self.limit:
            if self.spare:
                self.spare -= 1
                return
            self.raised += 1
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate a batch of {batch_size} > {self.limit} "
                f"(injected by {INJECT_ENV} on rank {rank})"
            )

    def attach(self, module: torch.nn.Module, rank: int) -> Any:
        """Check every forward of ``module``; returns the hook handle."""

        return module.register_forward_pre_hook(_InjectorHook(self, rank), with_kwargs=True, prepend=True)


class _InjectorHook:
    """The forward pre-hook of :class:`OutOfMemoryInjector` (a class, so that it can be pickled and tested)."""

    def __init__(self, injector: OutOfMemoryInjector, rank: int):
        self.injector, self.rank = injector, rank

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        size = batch_size_of(args, kwargs)
        if size is not None:
            self.injector.check(self.rank, size)


def batch_size_of(args: tuple, kwargs: dict) -> int | None:
    """The batch dimension of a Whisper forward call (features, decoder ids or encoder outputs)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return int(value.shape[0])
        hidden = getattr(value, "last_hidden_state", None)
        if isinstance(hidden, torch.Tensor):
            return int(hidden.shape[0])
    return None


def install_injector(model: torch.nn.Module, rank: int) -> OutOfMemoryInjector | None:
    """Attach the injector from the environment, if ``TOOLKIT_INJECT_OOM`` is set.

    It goes on the Whisper model itself, under a PEFT wrapper if there is one: training's forward
    reaches it through the wrapper, and a wrapper's ``generate`` calls the base model directly.
    """
    injector = OutOfMemoryInjector.from_env()
    if injector is not None:
        injector.attach(model.get_base_model() if hasattr(model, "get_base_model") else model, rank)
        if injector.rank == rank:
            logger.warning("%s: forward passes with a batch > %d raise OutOfMemoryError on this rank",
                           INJECT_ENV, injector.limit)
    return injector


def current_mode(method: str, quantization: str, optimizer: str, launch: LaunchInfo) -> str:
    """This run's mode, in the names of ``python -m toolkit plan``."""
    if method == "lora":
        return {"int8": "lora-int8", "nf4": "qlora-nf4"}.get(quantization, "lora")
    if launch.deepspeed:
        stage = "zero3" if launch.zero_stage == 3 else "zero2"
        return stage + ("-offload" if launch.offload_optimizer or launch.offload_params else "")
    return "full-adamw8bit" if optimizer == "adamw8bit" else "full"


def device_memory(device: torch.device) -> int:
    """Memory one process may use: the GPU's, or on CPU the host's share per local process."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    import psutil

    return int(psutil.virtual_memory().total // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def advice_at_micro_batch_one(
    model_config: Any, mode: str, gpus: int, label_tokens: int, gradient_checkpointing: bool, memory: int
) -> str:
    """Which modes ``plan`` expects to fit ``memory`` at micro-batch 1, for the error that ends the run."""
    from toolkit import plan as planner

    command = f"python -m toolkit plan --model MODEL --gpu-memory {memory / planner.GIB:.0f}GiB --gpus {gpus}"
    try:
        estimates = planner.plan(model_config, gpus=gpus, micro_batch=1, label_tokens=label_tokens,
                                 gradient_checkpointing=True)
    except planner.PlanError as exc:  # pragma: no cover - a config plan cannot read
        return f"the planner cannot estimate this model ({exc}); see `{command}`"
    fitting = [e for e in estimates if e.mode != mode and e.fits(memory)]
    tips = [] if gradient_checkpointing else ["turn on training.gradient_checkpointing=true"]
    if fitting:
        listed = "; ".join(
            f"{e.mode} (~{e.total / planner.GIB:.1f} GiB: {planner.get_mode(e.mode).recipe} with "
            f"{planner.launch_config(planner.get_mode(e.mode), gpus)})" for e in fitting
        )
        tips.append(f"modes that `plan` expects to fit {memory / planner.GIB:.1f} GiB at micro-batch 1: {listed}")
    else:
        tips.append(f"`plan` finds no mode that fits {memory / planner.GIB:.1f} GiB at micro-batch 1: "
                    + planner.suggestion(model_config, memory, gpus, 1, label_tokens, True))
    return "; ".join(tips) + f" (full table: `{command}`)"
