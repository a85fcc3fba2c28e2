"""From a data spec to a model-ready dataset: open the source, preprocess (cached, sharded), tokenise, filter."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from accelerate import PartialState

from toolkit.config import DataConfig
from toolkit.data.dataset import SpeechDataset, build_dataset
from toolkit.data.preprocess import Skip, prepare_split
from toolkit.data.sources import DataError, open_source

logger = logging.getLogger(__name__)


@dataclass
class LoadedSplit:
    dataset: SpeechDataset
    skips: list[Skip]
    source: str
    total_items: int

    @property
    def errors(self) -> list[Skip]:
        return [s for s in self.skips if s.kind == "error"]

    def summary(self) -> str:
        by_reason: dict[str, int] = {}
        for skip in self.skips:
            key = f"{skip.kind}: {skip.reason.split(' (')[0]}"
            by_reason[key] = by_reason.get(key, 0) + 1
        left_out = ", ".join(f"{n} {reason}" for reason, n in sorted(by_reason.items())) or "none"
        return f"{self.source}: {len(self.dataset)} of {self.total_items} samples kept; left out: {left_out}"


def load_split(role: str, data_cfg: DataConfig, tokenizer: Any | None) -> LoadedSplit:
    """Load ``data.train`` (role ``train``) or ``data.eval`` (role ``eval``) on every rank.

    With a tokenizer, labels are built and over-long ones dropped; without, only text is kept.
    Raises :class:`DataError` when nothing usable is left, or on any bad sample with ``fail_on_skip``.
    """
    spec = data_cfg.train if role == "train" else data_cfg.eval
    if not spec:
        raise DataError(f"data.{role} is not set")
    split = data_cfg.train_split if role == "train" else data_cfg.eval_split
    source = open_source(
        spec, split=split, text_column=data_cfg.text_column, audio_column=data_cfg.audio_column,
        hub_config=data_cfg.hub_config,
    )
    state = PartialState()
    max_items = data_cfg.max_train_samples if role == "train" else data_cfg.max_eval_samples
    prepared = prepare_split(
        source, role, data_cfg.resolved_cache_dir(), rank=state.process_index, world_size=state.num_processes,
        num_proc=data_cfg.num_proc, barrier=state.wait_for_everyone, max_items=max_items,
        max_duration_s=data_cfg.max_duration_s,
    )
    total = min(len(source), max_items or len(source))
    if len(prepared.dataset) == 0:
        empty = LoadedSplit(SpeechDataset(prepared.dataset, np.arange(0), None, np.zeros(0)), prepared.skips,
                            source.description, total)
        raise DataError(f"data.{role}: no usable samples. {empty.summary()}")
    dataset, label_skips = build_dataset(prepared, tokenizer, max_label_tokens=data_cfg.max_label_tokens, split=role)
    loaded = LoadedSplit(dataset, prepared.skips + label_skips, source.description, total)
    if state.is_main_process:
        logger.info(
            "%s (cache: %d chunks built, %d reused)", loaded.summary(), prepared.chunks_built, prepared.chunks_reused
        )
    if data_cfg.fail_on_skip and loaded.errors:
        first = loaded.errors[0]
        raise DataError(
            f"{len(loaded.errors)} bad sample(s) in data.{role} and data.fail_on_skip is set; "
            f"first: {first.id}: {first.reason}"
        )
    if len(dataset) == 0:
        raise DataError(f"data.{role}: no usable samples. {loaded.summary()}")
    return loaded
