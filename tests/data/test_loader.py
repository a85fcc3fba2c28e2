"""build_loader: workers that inherit none of the caller's memory, still deaf to stop signals, same batches."""

from __future__ import annotations

import os
import pickle
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from toolkit.data.loader import START_METHOD_ENV, build_loader, start_method, worker_context

BALLAST_BYTES = 2**30
"""What the test process allocates and touches before it starts a worker (the trainer's stand-in).

A worker forked by the forkserver maps about 220 MB of anonymous memory of its own (torch,
transformers and datasets imported): 1 GiB keeps "less than half the ballast" far from both.
"""

PARENT_TOKEN: str | None = None
"""Set in the test process at run time: a worker sees it only if it is a copy of that process."""


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``RssAnon``: the anonymous memory mapped by this process)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


class ProcessProbe(torch.utils.data.Dataset):
    """Each item describes the process that loads it."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "index": index,
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "rss_anon_kib": status_kib("RssAnon"),
            "token": PARENT_TOKEN,
        }


def first(items: list[Any]) -> Any:
    """``collate_fn`` for one-item batches (module level: workers unpickle it by name)."""
    return items[0]


@pytest.fixture
def default_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(START_METHOD_ENV, raising=False)


def test_start_method_is_not_fork(default_start: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert start_method() == "forkserver"
    assert worker_context().get_start_method() == "forkserver"
    loader = build_loader(ProcessProbe(2), [[0], [1]], first, num_workers=1)
    assert loader.multiprocessing_context.get_start_method() == "forkserver"
    assert build_loader(ProcessProbe(2), [[0], [1]], first).multiprocessing_context is None  # no workers
    monkeypatch.setenv(START_METHOD_ENV, "spawn")
    assert build_loader(ProcessProbe(2), [[0]], first, num_workers=1).multiprocessing_context.get_start_method() == "spawn"
    monkeypatch.setenv(START_METHOD_ENV, "vfork")
    with pytest.raises(ValueError, match=START_METHOD_ENV):
        start_method()


def _load_in_worker(monkeypatch: pytest.MonkeyPatch, method: str | None) -> dict[str, Any]:
    if method is None:
        monkeypatch.delenv(START_METHOD_ENV, raising=False)
    else:
        monkeypatch.setenv(START_METHOD_ENV, method)
    items = list(build_loader(ProcessProbe(2), [[0], [1]], first, num_workers=1))
    assert len({item["pid"] for item in items}) == 1
    return items[0]


def test_worker_does_not_inherit_the_callers_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    ballast = np.ones(BALLAST_BYTES // 8)  # written, so resident: the trainer's weights and states
    monkeypatch.setattr(f"{__name__}.PARENT_TOKEN", "set in the test process")
    assert status_kib("RssAnon") * 1024 > BALLAST_BYTES
    mine = _load_in_worker(monkeypatch, None)
    assert mine["pid"] != os.getpid() and mine["ppid"] != os.getpid()  # forked by the forkserver
    assert mine["token"] is None  # a fresh import of this module, not a copy of this process
    assert mine["rss_anon_kib"] * 1024 < BALLAST_BYTES / 2, mine
    # The control: a forked worker maps every page of the caller, the ballast included.
    forked = _load_in_worker(monkeypatch, "fork")
    assert forked["token"] == "set in the test process" and forked["ppid"] == os.getpid()
    assert forked["rss_anon_kib"] * 1024 > BALLAST_BYTES, forked
    del ballast


@pytest.fixture(scope="module")
def train_data(tiny_model: Path, corpus: Path) -> tuple[Any, Any]:
    """The tone corpus's train split and a collator, as the training loop builds them."""
    from transformers import WhisperProcessor

    from toolkit.config import DataConfig
    from toolkit.data.collator import WhisperCollator
    from toolkit.data.pipeline import load_split

    processor = WhisperProcessor.from_pretrained(tiny_model)
    split = load_split("train", DataConfig(train=str(corpus / "train"), num_workers=0), processor.tokenizer)
    start = processor.tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    return split.dataset, WhisperCollator(processor.feature_extractor, start)


def _step_batches(dataset: Any) -> Any:
    from toolkit.training.batching import BatchPlan, StepBatchSampler, StepSampler

    return StepBatchSampler(StepSampler(len(dataset), 7, 0), BatchPlan.create(8, 2, 1), 0, 3)


def test_what_a_loader_holds_pickles(train_data: tuple[Any, Any]) -> None:
    """What spawn and forkserver workers receive (dataset, collator, worker_init_fn) and the batch sampler."""
    from toolkit.distributed import ignore_stop_signals

    dataset, collator = train_data
    sampler = _step_batches(dataset)
    assert list(pickle.loads(pickle.dumps(sampler))) == list(sampler)
    assert len(pickle.dumps(dataset)) < 1_000_000  # the Arrow table goes by path, not by value
    copy = pickle.loads(pickle.dumps(dataset))
    assert np.array_equal(copy[3].pcm, dataset[3].pcm) and copy[3].scale == dataset[3].scale
    assert copy[3].labels == dataset[3].labels
    assert pickle.loads(pickle.dumps(collator)).decoder_start_token_id == collator.decoder_start_token_id
    assert pickle.loads(pickle.dumps(ignore_stop_signals)) is ignore_stop_signals


def test_workers_ignore_sigterm_and_yield_the_same_batches(default_start: None, train_data: tuple[Any, Any]) -> None:
    dataset, collator = train_data
    plain = list(build_loader(dataset, _step_batches(dataset), collator, num_workers=0))
    loader = build_loader(dataset, _step_batches(dataset), collator, num_workers=1,
                          generator=torch.Generator().manual_seed(7))
    batches = iter(loader)
    got = [next(batches)]  # the worker is up and its worker_init_fn has run
    workers = batches._workers  # type: ignore[attr-defined]
    assert workers
    for worker in workers:
        os.kill(worker.pid, signal.SIGTERM)
    time.sleep(0.5)
    assert all(worker.is_alive() for worker in workers)
    got += list(batches)
    assert len(got) == len(plain) == 12
    for a, b in zip(got, plain, strict=True):
        assert a.ids == b.ids and a.texts == b.texts
        assert torch.equal(a.input_features, b.input_features)
        assert torch.equal(a.labels, b.labels)


@pytest.fixture(scope="module")
def packed_data(tiny_model: Path, train_data: tuple[Any, Any]) -> Any:
    """The train split with a packer (short labels, so the 32 short clips make a dozen windows)."""
    import copy

    from transformers import WhisperTokenizer

    from toolkit.data.packing import Packer

    dataset = copy.copy(train_data[0])  # the module's plain dataset stays unpacked
    dataset.packer = Packer.build(dataset, WhisperTokenizer.from_pretrained(tiny_model), 120)
    return dataset


def _packed_step_batches(dataset: Any) -> Any:
    from functools import partial

    from toolkit.training.batching import BatchPlan, StepBatchSampler, StepSampler

    layout = partial(dataset.packer.layout, durations=dataset.durations)
    return StepBatchSampler(StepSampler(len(dataset), 7, 0, layout), BatchPlan.create(4, 2, 1), 0, 5)


def test_packed_dataset_pickles_with_its_packer(packed_data: Any) -> None:
    batches = [[item.unit for item in batch] for batch in _packed_step_batches(packed_data)]
    assert len(batches) == 10 and all(isinstance(unit, tuple) for batch in batches for unit in batch)
    assert any(len(unit) > 1 for batch in batches for unit in batch)
    unit = batches[0][0]
    copy = pickle.loads(pickle.dumps(packed_data))
    assert copy.packer.targets.spaced == packed_data.packer.targets.spaced
    window, again = packed_data[unit], copy[unit]
    assert np.array_equal(window.pcm, again.pcm) and window.labels == again.labels
    assert window.segments == again.segments and len(window.segments) == len(unit)


@pytest.mark.parametrize("features_on", ["device", "workers"])
def test_workers_yield_the_same_packed_batches(
    default_start: None, tiny_model: Path, packed_data: Any, features_on: str
) -> None:
    from transformers import WhisperProcessor

    from toolkit.data.collator import WhisperCollator

    processor = WhisperProcessor.from_pretrained(tiny_model)
    start = processor.tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    collator = WhisperCollator(processor.feature_extractor, start, features_on)
    plain = list(build_loader(packed_data, _packed_step_batches(packed_data), collator, num_workers=0))
    got = list(build_loader(packed_data, _packed_step_batches(packed_data), collator, num_workers=1,
                            generator=torch.Generator().manual_seed(7)))
    assert len(got) == len(plain) == 10
    for a, b in zip(got, plain, strict=True):
        assert a.ids == b.ids and a.texts == b.texts and a.segments == b.segments
        assert all(len(segments) == len(i.split("+")) for i, segments in zip(a.ids, a.segments, strict=True))
        assert torch.equal(a.labels, b.labels)
        if features_on == "device":
            assert torch.equal(a.pcm, b.pcm) and torch.equal(a.scales, b.scales)
        assert torch.equal(a.to("cpu").input_features, b.to("cpu").input_features)
