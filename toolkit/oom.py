"""Out-of-memory handling shared by training and evaluation: detection, rank agreement, records.

Nothing here knows about training or evaluation; both back off through these pieces:

* :func:`is_out_of_memory` recognises an allocation failure that a smaller batch can cure;
* :func:`oom_ranks` tells every rank which ranks failed (one small all-reduce), so that all of them
  back off together instead of one rank shrinking while the others wait in a collective;
* :class:`Backoff` is the record of one back-off, in checkpoints, metrics and results;
* the two exceptions end a run that cannot back off any further, or not safely.

The test-only fault injector (:class:`OutOfMemoryInjector`, ``TOOLKIT_INJECT_OOM=RANK:LIMIT``)
raises a real ``torch.OutOfMemoryError`` on one rank, so the multi-process tests exercise the same
code path as a CUDA allocator failure.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size

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
    """One back-off: the batch went from ``before`` to ``after`` (at optimizer step ``step``, in training)."""

    before: int
    after: int
    step: int | None = None

    def to_dict(self) -> dict[str, int]:
        record = {} if self.step is None else {"step": self.step}
        return {**record, "from": self.before, "to": self.after}


class OutOfMemoryAtMicroBatchOne(RuntimeError):
    """Even one sample per forward pass does not fit; raised on every rank (they agreed on it)."""


class UnrecoverableOutOfMemory(RuntimeError):
    """An OOM where the ranks cannot agree safely (inside a collective): the run must stop."""


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
