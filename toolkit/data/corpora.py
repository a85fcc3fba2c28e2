"""Several training corpora as one split (``data.train`` as a list of ``{path, weight, language, task}``).

Each corpus is opened and loaded as a split of its own (cache or prepared shards, skips and label
filter included), its labels tokenised with its own language and task tokens. The splits are then
joined: corpus ``c`` holds the dataset indices ``offsets[c]`` up to ``offsets[c] + sizes[c]``. Which
corpus each sample comes from is drawn at sampling time, by weight
(:class:`~toolkit.training.mixture.MixtureSampler`); a packed window never mixes corpora.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from toolkit.config import Corpus, DataConfig, ModelConfig
from toolkit.data.dataset import ClipTable, SpeechDataset
from toolkit.data.pipeline import LoadedSplit, load_split, open_split
from toolkit.data.shards import ShardSet
from toolkit.data.sources import DataError, Source
from toolkit.data.tokens import Ragged, Stacked

META_COLUMNS = {"id": pa.string(), "text": pa.string(), "duration": pa.float32(), "scale": pa.float32(),
                "segments": pa.string(), "recording": pa.string(), "no_speech": pa.bool_()}


@dataclass(frozen=True)
class Mix:
    """Where each corpus lies in the joined split, and its weight."""

    offsets: list[int]
    sizes: list[int]
    weights: list[float]
    names: list[str]


class ConcatClips:
    """Several :class:`ClipTable` s as one: their rows one after the other."""

    def __init__(self, tables: list[ClipTable]):
        self.tables = tables
        schema = pa.schema(META_COLUMNS)
        self.meta = pa.concat_tables([t.meta.select(list(META_COLUMNS)).cast(schema) for t in tables])
        self.starts = np.cumsum([0, *(len(t) for t in tables)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _find(self, row: int) -> tuple[ClipTable, int]:
        table = int(np.searchsorted(self.starts, row, side="right")) - 1
        return self.tables[table], row - int(self.starts[table])

    def audio(self, row: int) -> bytes:
        table, local = self._find(row)
        return table.audio(local)

    def will_need(self, rows: np.ndarray) -> None:
        for t, table in enumerate(self.tables):
            hint = getattr(table, "will_need", None)
            mine = rows[(rows >= self.starts[t]) & (rows < self.starts[t + 1])] - self.starts[t]
            if hint is not None and len(mine):
                hint(mine)


def corpora(data_cfg: DataConfig) -> list[Corpus]:
    """``data.train`` as a list (one corpus of weight 1 when it is a single spec)."""
    if isinstance(data_cfg.train, list):
        return data_cfg.train
    return [Corpus(path=data_cfg.train or "")]


def open_corpora(data_cfg: DataConfig) -> list[Source | ShardSet]:
    """Every corpus listed (checked without loading anything), in order."""
    return [open_split("train", dataclasses.replace(data_cfg, train=c.path)) for c in corpora(data_cfg)]


def open_sources(data_cfg: DataConfig) -> dict[str, Any]:
    """``train`` and ``eval``, as set: each a source, or a list of them for several corpora."""
    sources: dict[str, Any] = {}
    if data_cfg.streaming:
        from toolkit.data.stream import open_stream

        sources["train"] = open_stream(data_cfg.train, data_cfg.train_split, data_cfg.hub_config,  # type: ignore[arg-type]
                                       data_cfg.audio_column, data_cfg.text_column)
    elif data_cfg.train:
        sources["train"] = open_corpora(data_cfg) if isinstance(data_cfg.train, list) else open_split("train", data_cfg)
    if isinstance(data_cfg.eval, list):
        sources["eval"] = [open_split("eval", dataclasses.replace(data_cfg, eval=c.path)) for c in data_cfg.eval]
    elif data_cfg.eval:
        sources["eval"] = open_split("eval", data_cfg)
    return sources


@dataclass(frozen=True)
class Prompt:
    """The language and task tokens of one corpus's labels (and of its decoding, for an eval set)."""

    language: str | None
    """Whisper language name (``french``); None for an English-only checkpoint, which has no language token."""
    task: str | None
    """None for an English-only checkpoint."""

    @property
    def code(self) -> str:
        """The language's code (``fr``) that keys per-language metrics; ``en`` for an English-only checkpoint."""
        from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

        return TO_LANGUAGE_CODE.get(self.language or "english", self.language or "en")


def corpus_prompt(corpus: Corpus, model_cfg: ModelConfig, english_only: bool, key: str) -> Prompt:
    """``corpus``'s language and task (the model's where it sets none); English-only checkpoints refuse others."""
    from toolkit.modeling import language_name

    language, task = corpus.language or model_cfg.language, corpus.task or model_cfg.task
    if english_only:
        if (language and language_name(language) != "english") or task == "translate":
            raise DataError(f"{key}: {model_cfg.name_or_path} is English-only; a corpus in "
                            f"{language!r} (task {task}) needs a multilingual checkpoint")
        return Prompt(None, None)
    return Prompt(language_name(language or ""), task)


@contextlib.contextmanager
def prompting(tokenizer: Any, prompt: Prompt) -> Iterator[tuple[int, ...]]:
    """The tokenizer set to ``prompt``'s prefix tokens (yielded) for the block, then back to its own."""
    saved = (tokenizer.language, tokenizer.task)
    tokenizer.set_prefix_tokens(language=prompt.language, task=prompt.task, predict_timestamps=False)
    try:
        yield tuple(tokenizer.prefix_tokens)
    finally:
        tokenizer.set_prefix_tokens(language=saved[0], task=saved[1], predict_timestamps=False)


def load_corpora(data_cfg: DataConfig, model_cfg: ModelConfig, tokenizer: Any, english_only: bool,
                 sources: list[Source | ShardSet]) -> tuple[LoadedSplit, Mix]:
    """Load each corpus with its own language and task tokens, and join them."""
    parts, prefixes = [], []
    for i, (corpus, source) in enumerate(zip(corpora(data_cfg), sources, strict=True)):
        with prompting(tokenizer, corpus_prompt(corpus, model_cfg, english_only, f"data.train[{i}]")) as prefix:
            prefixes.append(prefix)
            parts.append(load_split("train", dataclasses.replace(data_cfg, train=corpus.path), tokenizer, source))
    return join(parts, prefixes), Mix(
        offsets=np.cumsum([0, *(len(p.dataset) for p in parts[:-1])]).tolist(), sizes=[len(p.dataset) for p in parts],
        weights=[c.weight for c in corpora(data_cfg)], names=[p.source for p in parts])


def join(parts: list[LoadedSplit], prefixes: list[tuple[int, ...]]) -> LoadedSplit:
    """One split of ``parts``' samples in order, each remembering its corpus's prefix."""
    datasets = [p.dataset for p in parts]
    table = ConcatClips([d.table for d in datasets])
    rows = np.concatenate([d.rows + int(start) for d, start in zip(datasets, table.starts, strict=False)])
    dataset = SpeechDataset(table, rows, Stacked([d.labels for d in datasets]),
                            np.concatenate([d.durations for d in datasets]))
    dataset.text_tokens = Ragged.concat([d.text_tokens for d in datasets])
    dataset.prefixes = prefixes
    dataset.prefix_of = np.repeat(np.arange(len(datasets)), [len(d) for d in datasets])
    dataset.longest_reference = max(d.longest_reference or 0 for d in datasets)
    skips = [skip for p in parts for skip in p.skips]
    return LoadedSplit(dataset, skips, " + ".join(p.source for p in parts), sum(p.total_items for p in parts),
                       sum(p.bytes_on_disk for p in parts))
