"""Process-group set-up shared by every command, and small collectives.

accelerate forms a multi-process CPU group (gloo) only when told the run is on CPU, and DeepSpeed
on CPU needs gloo named explicitly; this module is the one place that knows both rules.
"""

from __future__ import annotations

import os
import signal
import sys
from datetime import timedelta
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import InitProcessGroupKwargs, parse_flag_from_env

# Preprocessing a large corpus happens between two barriers; the default 30 min can be too short.
PROCESS_GROUP_TIMEOUT = timedelta(hours=2)


def use_cpu() -> bool:
    if parse_flag_from_env("ACCELERATE_USE_CPU"):
        return True
    # DeepSpeed must not be told "cpu": accelerate would silently drop it (it runs on gloo instead).
    return not torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def cpu_backend() -> str | None:
    """gloo for a multi-process launch without CUDA; None (accelerate's choice) otherwise.

    Naming a backend in a single process makes accelerate look for a group that was never created.
    """
    return "gloo" if launched_world_size() > 1 and not torch.cuda.is_available() else None


def process_group_kwargs() -> InitProcessGroupKwargs:
    return InitProcessGroupKwargs(backend=cpu_backend(), timeout=PROCESS_GROUP_TIMEOUT)


def init_state() -> PartialState:
    """The process state for commands that do not build an Accelerator (evaluate, bench)."""
    kwargs: dict[str, Any] = {"cpu": use_cpu()}
    if launched_world_size() > 1:
        kwargs["timeout"] = PROCESS_GROUP_TIMEOUT
        if cpu_backend():
            kwargs["backend"] = cpu_backend()
    return PartialState(**kwargs)


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object; one broadcast when there are several ranks)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def exit_with_launcher() -> None:
    """Have the kernel send this process SIGTERM when its launcher dies (Linux ``PR_SET_PDEATHSIG``).

    torch elastic starts each rank in a session of its own, so killing the launcher's process group
    leaves the ranks training as orphans. With this they get a stop signal instead, checkpoint at
    the next step boundary and exit, as on a preemption. A no-op outside a launcher or off Linux.
    """
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:  # the launcher died before the call: nobody would send the signal
        os.kill(os.getpid(), signal.SIGTERM)


def leave(code: int) -> int:
    """End a command: return ``code``, or, in one of several launched ranks, exit with it at once.

    Interpreter teardown (C++ static destructors, finalizers) races with the threads gloo and
    DeepSpeed leave running: now and then a rank whose work was done aborted there ("terminate
    called without an active exception", exit -6) and failed the whole launch. Every file the
    command wrote is closed by now; stdout, stderr and the log handlers are flushed, and
    ``os._exit`` skips the teardown. Only a process that joined a group of several ranks does so
    (not, say, a test calling ``main`` in-process with ``WORLD_SIZE`` set); another returns.
    """
    joined = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not joined or torch.distributed.get_world_size() <= 1:
        if joined:
            torch.distributed.destroy_process_group()
        return code
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def is_main_process_env() -> bool:
    """Rank 0 according to the launcher, usable before any process group exists."""
    return int(os.environ.get("RANK", "0")) == 0


def all_reduce_max(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on any rank."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return flag
    tensor = torch.tensor([1 if flag else 0], device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return bool(tensor.item())


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""Slurm preemption (and ``scancel``) signals every process of a job with these."""


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: leave stop signals to the main process.

    A worker killed by SIGTERM makes the main process raise before it can write its checkpoint.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


GRADIENT_BUCKET_BYTES = 64 * 2**20


def average_gradients(parameters: Any, bucket_bytes: int = GRADIENT_BUCKET_BYTES) -> None:
    """Average the ``.grad`` of ``parameters`` over all ranks, in flat buckets (DDP's arithmetic).

    The training loop runs every micro-batch under ``no_sync`` and calls this after the ranks have
    agreed that none ran out of memory: DDP's own all-reduce fires inside the backward, where a rank
    that fails mid-way would leave the others waiting in a collective forever. A parameter without a
    gradient on this rank contributes zeros, so every rank makes the same collectives.
    """
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    world = torch.distributed.get_world_size()
    if world == 1:
        return
    params = [p for p in parameters if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.Tensor] = []
    size = 0
    for p in params:
        if bucket and (size + p.grad.numel() * p.grad.element_size() > bucket_bytes or p.grad.dtype != bucket[0].dtype):
            _all_reduce_mean(bucket, world)
            bucket, size = [], 0
        bucket.append(p.grad)
        size += p.grad.numel() * p.grad.element_size()
    if bucket:
        _all_reduce_mean(bucket, world)


def _all_reduce_mean(grads: list[torch.Tensor], world: int) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    flat.div_(world)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
