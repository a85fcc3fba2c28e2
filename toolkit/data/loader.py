"""Every DataLoader of the toolkit, with workers that do not inherit the trainer's memory.

A DataLoader worker started by ``fork`` (the Linux default) is a copy-on-write image of the process
that starts it: by the time the training loop and the evaluation start their loaders, that process
holds the model, the optimizer states (with ZeRO offload, all of them: about 35 GB for large-v3)
and the probe's buffers. Every page the trainer then writes (each optimizer step rewrites the
weights and the states) is copied once for each live worker, so a worker soon pins as much
anonymous memory as the trainer. A 2-process CPU run of whisper-base was killed by the OOM killer
with three workers of 5.3-5.6 GB each beside its ranks.

Workers are therefore started by ``forkserver``: a small server process, started once per process
by fork+exec (a fresh interpreter, none of the trainer's memory), imports :data:`PRELOAD` (torch,
numpy, datasets, the feature extractor, the collator) and forks each worker from itself. A worker
costs tens of milliseconds instead of a fresh interpreter's seconds (``spawn``, the fallback where
``forkserver`` is missing), and holds only what it unpickles: the dataset (a memory-mapped Arrow
table, pickled by path), the collator and the ``worker_init_fn``. Everything a worker receives
must therefore pickle; the batch sampler stays in the main process.

``WHISPER_TOOLKIT_WORKER_START`` (``forkserver``, ``spawn`` or ``fork``) overrides the start method:
``fork`` restores the old behaviour, for comparison (``scripts/bench_host_memory.py``) or for a
dataset that cannot be pickled.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Sequence
from multiprocessing.context import BaseContext
from typing import Any

import torch

from toolkit.distributed import ignore_stop_signals

START_METHOD_ENV = "WHISPER_TOOLKIT_WORKER_START"
"""Environment variable that overrides the workers' start method (``forkserver``, ``spawn``, ``fork``)."""

START_METHODS = ("forkserver", "spawn", "fork")

PRELOAD = (
    "__main__",  # multiprocessing's own default: a script's main module, imported once, not per worker
    "torch",
    "numpy",
    "datasets",
    "transformers.models.whisper.feature_extraction_whisper",
    "toolkit.distributed",
    "toolkit.data.dataset",
    "toolkit.data.collator",
    "toolkit.data.worker_server",  # last: the server then ignores stop signals, as the workers do
)
"""Modules the forkserver imports once, so that each worker forked from it starts without importing them."""


def start_method() -> str:
    """The workers' start method: ``$WHISPER_TOOLKIT_WORKER_START``, else forkserver where available, else spawn."""
    wanted = os.environ.get(START_METHOD_ENV, "").strip().lower()
    if wanted:
        if wanted not in START_METHODS:
            raise ValueError(f"{START_METHOD_ENV}={wanted!r}: expected one of {', '.join(START_METHODS)}")
        return wanted
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def worker_context() -> BaseContext:
    """The multiprocessing context DataLoader workers are started with (see the module docstring).

    For ``forkserver``, the server imports :data:`PRELOAD`; the list takes effect when the process's
    forkserver starts (with its first worker) and is kept from then on.
    """
    method = start_method()
    context = torch.multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(list(PRELOAD))
    return context


def build_loader(
    dataset: torch.utils.data.Dataset,
    batch_sampler: Sequence[list[int]] | Iterable[list[int]],
    collate_fn: Callable[[list[Any]], Any],
    *,
    num_workers: int = 0,
    generator: torch.Generator | None = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset`` in the batches ``batch_sampler`` yields (lists of indices).

    ``num_workers > 0`` starts that many workers per iterator, with :func:`worker_context` (not
    ``fork``) and :func:`~toolkit.distributed.ignore_stop_signals` as their ``worker_init_fn``
    (stop signals are left to the main process). Workers live as long as the iterator: drop it
    before another loader's workers start. ``generator`` draws the workers' base seed (give one
    of the loader's own so that creating an iterator leaves the global RNG untouched).
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    context = worker_context() if num_workers > 0 else None
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,  # type: ignore[arg-type]
        collate_fn=collate_fn,
        num_workers=num_workers,
        multiprocessing_context=context,
        persistent_workers=False,
        # page-locked batches copy to the GPU asynchronously (Batch.to uses non_blocking)
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=ignore_stop_signals,
        generator=generator,
    )


class TimedBatches:
    """An iterator of batches that adds the time spent waiting for each one to :attr:`waited`."""

    def __init__(self, loader: Iterable[Any]):
        self._it = iter(loader)
        self.waited = 0.0

    def __iter__(self) -> TimedBatches:
        return self

    def __next__(self) -> Any:
        tick = time.perf_counter()
        try:
            return next(self._it)
        finally:
            self.waited += time.perf_counter() - tick
