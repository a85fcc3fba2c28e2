"""From a data spec to a model-ready dataset: open the source, preprocess (cached, sharded), tokenise, filter."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from accelerate import PartialState

from toolkit.config import DataConfig
from toolkit.data.dataset import ArrowClips, ClipTable, SpeechDataset, build_dataset
from toolkit.data.preprocess import Skip, prepare_split
from toolkit.data.segments import WINDOW_SECONDS
from toolkit.data.shards import ShardSet, is_prepared, open_shards
from toolkit.data.sources import DataError, Source, open_source

logger = logging.getLogger(__name__)


@dataclass
class LoadedSplit:
    dataset: SpeechDataset
    skips: list[Skip]
    source: str
    total_items: int
    bytes_on_disk: int = 0
    """Size of the split's preprocessing cache."""

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


def open_split(role: str, data_cfg: DataConfig) -> Source | ShardSet:
    """List ``data.train`` (role ``train``) or ``data.eval`` (role ``eval``) without decoding anything.

    Every check of the spec and its manifest happens here and needs no model, so a caller may run it
    before loading one and hand the source to :func:`load_split`. A prepared directory
    (``toolkit prepare``) is opened as a :class:`ShardSet`: its index and shard tables are read.
    """
    spec = data_cfg.train if role == "train" else data_cfg.eval
    if not spec:
        raise DataError(f"data.{role} is not set")
    if is_prepared(spec):
        max_items = data_cfg.max_train_samples if role == "train" else data_cfg.max_eval_samples
        return open_shards(spec, data_cfg.resolved_cache_dir() / "shards", int(data_cfg.shard_cache_gb * 2**30),
                           max_items)
    split = data_cfg.train_split if role == "train" else data_cfg.eval_split
    return open_source(
        spec, split=split, text_column=data_cfg.text_column, audio_column=data_cfg.audio_column,
        hub_config=data_cfg.hub_config,
    )


def load_split(role: str, data_cfg: DataConfig, tokenizer: Any | None,
               source: Source | ShardSet | None = None) -> LoadedSplit:
    """Load ``data.train`` (role ``train``) or ``data.eval`` (role ``eval``) on every rank.

    With a tokenizer, transcripts are tokenised and those over ``data.max_label_tokens`` dropped; the
    training split keeps the labels, the eval split only its text (it is scored on generated text).
    Without a tokenizer nothing is filtered by length. ``source``: from :func:`open_split`, if listed
    already. Raises :class:`DataError` when nothing usable is left, or on any bad sample with ``fail_on_skip``.
    """
    source = source if source is not None else open_split(role, data_cfg)
    state = PartialState()
    if isinstance(source, ShardSet):
        table, skips, total, size, note = _shard_table(source, role, data_cfg)
    else:
        max_items = data_cfg.max_train_samples if role == "train" else data_cfg.max_eval_samples
        source, duplicates = _duplicates(source, role, data_cfg.dedup, max_items, state.is_main_process)
        prepared = prepare_split(
            source, role, data_cfg.resolved_cache_dir(), rank=state.process_index, world_size=state.num_processes,
            num_proc=data_cfg.num_proc, barrier=state.wait_for_everyone, max_items=max_items,
            max_duration_s=data_cfg.max_duration_s,
        )
        table, skips, size = ArrowClips(prepared.dataset), duplicates + prepared.skips, prepared.bytes_on_disk
        total = min(len(source), max_items or len(source)) + len(duplicates)
        note = f"cache: {prepared.chunks_built} chunks built, {prepared.chunks_reused} reused"
    if len(table) == 0:
        empty = LoadedSplit(SpeechDataset(table, np.arange(0), None, np.zeros(0)), skips, source.description, total)
        raise DataError(f"data.{role}: no usable samples. {empty.summary()}")
    dataset, label_skips = build_dataset(
        table, tokenizer, max_label_tokens=data_cfg.max_label_tokens, split=role, keep_labels=role == "train",
        token_cache=data_cfg.resolved_cache_dir() / "tokens", rank=state.process_index, world_size=state.num_processes,
    )
    loaded = LoadedSplit(dataset, skips + label_skips, source.description, total, size)
    if state.is_main_process:
        logger.info("%s (%s)", loaded.summary(), note)
    if data_cfg.fail_on_skip and loaded.errors:
        first = loaded.errors[0]
        raise DataError(
            f"{len(loaded.errors)} bad sample(s) in data.{role} and data.fail_on_skip is set; "
            f"first: {first.id}: {first.reason}"
        )
    if len(dataset) == 0:
        raise DataError(f"data.{role}: no usable samples. {loaded.summary()}")
    return loaded


def _shard_table(shards: ShardSet, role: str, data_cfg: DataConfig) -> tuple[ClipTable, list[Skip], int, int, str]:
    """A prepared directory's samples, less those over ``data.max_duration_s``; (table, skips, rows, bytes, note)."""
    if data_cfg.max_duration_s > WINDOW_SECONDS:
        raise DataError(f"{shards.description}: prepared shards hold clips of up to {WINDOW_SECONDS:g} s; "
                        "long-form evaluation needs the recordings (an audiofolder or manifest)")
    skips = [Skip(role, s.id, s.reason, s.kind) for s in shards.skips]
    total = len(shards) + len(skips)
    durations = shards.meta.column("duration").to_numpy()
    if (durations > data_cfg.max_duration_s).any():
        ids = shards.meta.column("id").to_pylist()
        long = np.flatnonzero(durations > data_cfg.max_duration_s)
        skips += [Skip(role, ids[i], f"longer than {data_cfg.max_duration_s:g} s ({durations[i]:.1f} s)", "filtered")
                  for i in long.tolist()]
        shards = shards.subset(np.flatnonzero(durations <= data_cfg.max_duration_s))
    return shards, skips, total, int(shards.index["bytes"]), f"{len(shards.shards)} prepared shards"


def _duplicates(
    source: Source, role: str, dedup: bool, max_items: int | None, main: bool
) -> tuple[Source, list[Skip]]:
    """Drop repeated rows (``dedup``) as skips, or keep them and warn with their count.

    Only the repeats among the rows that are used count: with ``max_items``, those before the
    ``max_items``-th row that is kept (deduplicated) or used (not).
    """
    repeats = source.duplicates()
    if not repeats:
        return source, []
    repeated = set(repeats)
    kept = [i for i in range(len(source)) if i not in repeated] if dedup else list(range(len(source)))
    if max_items is not None and len(kept) > max_items:
        repeats = [i for i in repeats if i <= kept[max_items - 1]]
    if not repeats:
        return source, []
    if not dedup:
        if main:
            logger.warning(
                "data.%s: %d duplicate row(s) in %s (the same audio file and transcript as an earlier row, "
                "e.g. %s); kept: set data.dedup=true to drop them",
                role, len(repeats), source.description, source.get(repeats[0])[0],
            )
        return source, []
    skips = [Skip(role, source.get(i)[0], "duplicate (same audio file and transcript as an earlier row)", "filtered")
             for i in repeats]
    return source.without(sorted(repeated)), skips
