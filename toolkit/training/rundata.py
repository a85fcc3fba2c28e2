"""The data a training run reads: the train split with its label layouts (and packer), the eval
split, and the regression-guard sets; their skips go to ``skipped.jsonl``."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import PartialState

from toolkit.config import RunConfig
from toolkit.data.corpora import Mix, load_corpora
from toolkit.data.dataset import attach_targets
from toolkit.data.packing import Packer
from toolkit.data.pipeline import LoadedSplit, load_split
from toolkit.data.sources import Source
from toolkit.output import write_skipped
from toolkit.training.evals import EvalSet, load_eval_sets, load_guard_split

logger = logging.getLogger(__name__)


@dataclass
class RunData:
    train: LoadedSplit | None
    """None with ``data.streaming`` (the stream is read as the steps come)."""
    evals: list[EvalSet]
    """``data.eval``'s sets: none, the one set, or each of a list."""
    guards: list[LoadedSplit] = field(default_factory=list)
    """The ``evaluation.guard`` sets' data, in their order."""
    train_seconds: float = 0.0
    """Time to load (and preprocess) the train split."""
    mix: Mix | None = None
    """Several corpora: where each lies in ``train`` and its weight."""

    def splits(self) -> list[LoadedSplit]:
        return [*([self.train] if self.train else []), *(s.split for s in self.evals), *self.guards]


def load_run_data(config: RunConfig, sources: dict[str, Source], tokenizer: Any, vocab_size: int,
                  skipped: Path | None) -> RunData:
    """Load every split on every rank; ``skipped``: where the main process writes the skips (None elsewhere)."""
    tick = time.perf_counter()
    mix, train = None, None  # a stream (data.streaming) is not loaded: it is read as the steps come
    if isinstance(config.data.train, list):  # several corpora; English-only tokenizers carry no language
        train, mix = load_corpora(config.data, config.model, tokenizer, tokenizer.language is None, sources["train"])
    elif not config.data.streaming:
        train = load_split("train", config.data, tokenizer, sources["train"])
    seconds = time.perf_counter() - tick
    english_only = tokenizer.language is None
    evaluation = load_eval_sets(config, tokenizer, english_only, sources["eval"]) if "eval" in sources else []
    guards = [load_guard_split(config, guard, tokenizer) for guard in config.evaluation.guard]
    data = RunData(train, evaluation, guards, seconds, mix)
    if skipped is not None:
        count = write_skipped(skipped, [skip for split in data.splits() for skip in split.skips])
        if count:
            logger.info("%d samples left out; see %s", count, skipped)
    if train is None:
        return data
    state = PartialState()
    attach_targets(
        train.dataset, tokenizer, vocab_size, seed=config.training.seed,
        timestamp_probability=config.data.timestamp_probability,
        previous_probability=config.data.condition_on_prev_probability,
        token_cache=config.data.resolved_cache_dir() / "tokens", rank=state.process_index, world_size=state.num_processes,
    )
    if config.data.packing:
        train.dataset.packer = Packer.build(train.dataset, tokenizer, config.data.max_label_tokens)
    return data
