"""Process-group set-up shared by every command, and small collectives.

accelerate forms a multi-process CPU group (gloo) only when told the run is on CPU, and DeepSpeed
on CPU needs gloo named explicitly; this module is the one place that knows both rules.
"""

from __future__ import annotations

import os
import signal
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
