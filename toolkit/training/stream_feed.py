"""``data.streaming``: each step's samples read from this rank's share of a streamed dataset.

Where :class:`~toolkit.training.feeds.IndexedFeed` knows every step's samples in advance, a stream is
read as the steps come. At each step this rank takes its share of the global batch from its
:class:`~toolkit.data.stream.RankStream`, decodes it by preprocessing's rules (a row that fails them
is counted as a skip and replaced by the next one), and builds the labels as for indexed data (the
same timestamp draws, keyed by stream position). The loss is normalised by the step's label tokens
summed over the ranks (one all-reduce), since no rank knows the others' samples. While a step
trains, a background thread reads and decodes the next step's rows; the position a checkpoint
saves is the one taken after the current step's rows, before that read began.

Resume is exact at the same world size only: the checkpoint holds every rank's stream position
(:meth:`StreamFeed.collect`), and each rank continues from its own. Streaming trains on single clips
(no packing: packing plans windows over the whole clip list), without previous-text prompts.
"""

from __future__ import annotations

import copy
import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import datasets
import torch
from accelerate import PartialState
from accelerate.utils import gather_object, reduce

from toolkit.config import ConfigError, RunConfig
from toolkit.data.audio import SAMPLING_RATE
from toolkit.data.collator import Batch, WhisperCollator
from toolkit.data.dataset import ArrowClips, Item, SpeechDataset, attach_targets, build_dataset
from toolkit.data.preprocess import Skip, features, process_chunk
from toolkit.data.sources import DataError
from toolkit.data.stream import STREAM_ID, RankStream, StreamSource
from toolkit.flops import training_flops
from toolkit.training.batching import BatchPlan
from toolkit.training.feeds import StepSamples


class StreamFeed:
    """This rank's samples of each step, taken from its stream when the step comes."""

    def __init__(self, stream: RankStream, config: RunConfig, tokenizer: Any, vocab_size: int,
                 collator: WhisperCollator, model_config: Any):
        self.stream, self.config, self.tokenizer, self.vocab_size = stream, config, tokenizer, vocab_size
        self.collator, self.model_config = collator, model_config
        self.state = PartialState()
        self.current: SpeechDataset | None = None
        self.items: list[Item] = []
        self.cursor = 0
        """How many of the step's samples the micro-batches have handed out."""
        self.skips: list[Skip] = []
        """Rows skipped since the last :meth:`collect`."""
        self.position: dict[str, Any] = stream.state_dict()
        """The stream position after the rows of the last step taken (what a checkpoint saves)."""
        self._next: tuple[int, Future] | None = None
        """The step whose rows the background thread is reading, and its result."""
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream-reader")
        # The reader tokenises with its own copy: a fast tokenizer used from two threads at once can fail
        # ("Already borrowed"), and the main thread encodes (labels) and decodes (evaluation) meanwhile.
        self._reader_tokenizer = copy.deepcopy(tokenizer)

    @classmethod
    def open(cls, dataset: Any, config: RunConfig, tokenizer: Any, vocab_size: int, collator: WhisperCollator,
             model_config: Any) -> StreamFeed:
        state = PartialState()
        stream = RankStream(dataset, seed=config.training.seed, rank=state.process_index, world_size=state.num_processes,
                            block_size=config.data.stream_block, audio_column=config.data.audio_column or "audio")
        return cls(stream, config, tokenizer, vocab_size, collator, model_config)

    # -- a step -----------------------------------------------------------------------------------
    def step_samples(self, step: int, plan: BatchPlan) -> StepSamples:
        """Take and decode this rank's samples of ``step``; their counts summed over the ranks."""
        n, rank = plan.per_rank, self.state.process_index
        if self._next is not None and self._next[0] != step:
            raise RuntimeError(f"the stream read ahead for step {self._next[0]}, and step {step} was asked for")
        dataset, skips = self._next[1].result() if self._next is not None else self._decoded(n)
        self.skips += skips
        # Taken while the reader is idle; then it reads on, for the next step.
        self.position = self.stream.state_dict()
        self._next = None
        if step + 1 < self.config.training.max_steps:
            self._next = (step + 1, self._reader.submit(self._decoded, n))
        attach_targets(dataset, self.tokenizer, self.vocab_size, seed=self.config.training.seed,
                       timestamp_probability=self.config.data.timestamp_probability, previous_probability=0.0,
                       max_tokens=self.config.data.max_label_tokens)
        first = step * plan.global_batch_size + rank * n
        self.items = [Item(i, first + i) for i in range(n)]
        self.current, self.cursor = dataset, 0
        sizes = dataset.item_sizes(self.items)
        flops = training_flops(self.model_config, [p for _, p in sizes], bool(self.config.training.gradient_checkpointing))
        local = torch.tensor([sum(t for t, _ in sizes), n, float(dataset.durations.sum()), float(flops)],
                             dtype=torch.float64)
        tokens, clips, seconds, total_flops = reduce(local.to(self.state.device), reduction="sum").cpu().tolist()
        return StepSamples(int(tokens), int(clips), seconds, int(clips), total_flops, list(range(n)), dataset)

    def _decoded(self, n: int) -> tuple[SpeechDataset, list[Skip]]:
        """``n`` samples that pass every rule, read from the stream (skipped rows are replaced), and the skips."""
        rows: dict[str, list[Any]] = {name: [] for name in features()}
        skips: list[Skip] = []
        label_skips: list[Skip] = []
        kept = 0
        while kept < n:
            for skip, row in self._rows(self.stream.take(n - kept)):
                if skip is not None:
                    skips.append(skip)
                    continue
                for name, values in row.items():
                    rows[name] += values
            table = ArrowClips(datasets.Dataset.from_dict(rows, features=features()))
            dataset, label_skips = build_dataset(table, self._reader_tokenizer,
                                                 max_label_tokens=self.config.data.max_label_tokens)
            kept = len(dataset)
        return dataset, skips + label_skips

    def _rows(self, raw: list[dict[str, Any]]) -> list[tuple[Skip | None, dict[str, list[Any]]]]:
        """Each row decoded (preprocessing's rules), or why it is skipped."""
        data = self.config.data
        source = StreamSource(raw, data.audio_column or "audio", data.text_column, data.train or "stream")  # type: ignore[arg-type]
        out: list[tuple[Skip | None, dict[str, list[Any]]]] = []
        for i in range(len(raw)):
            item_id = str(raw[i][STREAM_ID])
            try:
                source.extras(i)  # checked here: a malformed column is one row's skip, not the run's end
                row, skips = process_chunk(source, i, i + 1, "train", target_sr=SAMPLING_RATE,
                                           max_duration_s=data.max_duration_s)
            except DataError as exc:
                out.append((Skip("train", item_id, str(exc)), {}))
                continue
            if skips:
                out.append((skips[0], {}))
            elif len(row["id"]) > 1:  # a long recording cut by its segments: several samples from one row
                out.append((Skip("train", item_id, f"a recording longer than {data.max_duration_s:g} s; streaming "
                                 "trains on clips (cut it into windows with `toolkit prepare`)", "filtered"), {}))
            else:
                out.append((None, row))
        return out

    def loader(self, start: int, plan: BatchPlan, skip_samples: int = 0) -> StreamBatches:
        """This rank's micro-batches of the current step from its ``skip_samples``-th sample (``start``
        is the step: the samples are those :meth:`step_samples` took for it)."""
        del start
        self.cursor = skip_samples
        return StreamBatches(self, plan.micro_batch_size)

    def next_batch(self, size: int) -> Batch:
        if self.current is None or self.cursor >= len(self.items):
            raise StopIteration
        items = self.items[self.cursor : self.cursor + size]
        self.cursor += len(items)
        return self.collator([self.current[item] for item in items])

    # -- what a checkpoint keeps --------------------------------------------------------------------
    def collect(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Every rank's stream position and the rows skipped since the last call (a collective)."""
        mine = [(self.position, [dataclasses.asdict(s) for s in self.skips])]
        self.skips = []
        gathered = gather_object(mine) if self.state.num_processes > 1 else mine
        return [state for state, _ in gathered], [skip for _, skips in gathered for skip in skips]

    def load_state_dict(self, states: list[dict[str, Any]] | None) -> None:
        world = self.state.num_processes
        if states is None:
            raise ConfigError("the checkpoint holds no stream position (it was not trained with data.streaming)")
        if len(states) != world:
            raise ConfigError(f"this streamed run was checkpointed on {len(states)} processes and resumes on {world}: "
                              "a stream resumes exactly only at the same world size (README, streaming)")
        self._next = None
        self.stream.load_state_dict(states[self.state.process_index])
        self.position = self.stream.state_dict()

    def epoch_of(self, step: int, plan: BatchPlan) -> float:
        """This rank's stream epoch (the share of a stream's epoch read is not known in advance)."""
        return float(self.position["epoch"])

    def worst_positions(self, packed_label_tokens: int | None) -> int:
        """Labels are filtered to ``data.max_label_tokens``; a timestamped one takes two more per segment."""
        return self.config.data.max_label_tokens + 2

    @property
    def num_samples(self) -> int | None:
        return None


class StreamBatches:
    """The current step's micro-batches, as the step object pulls them."""

    def __init__(self, feed: StreamFeed, size: int):
        self.feed, self.size = feed, size

    def __iter__(self) -> StreamBatches:
        return self

    def __next__(self) -> Batch:
        return self.feed.next_batch(self.size)
