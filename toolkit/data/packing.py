"""Utterance packing: several clips, with short silent gaps, in one 30 s window and one label.

Whisper's encoder always runs on a 30 s window (1,500 positions, most of the model's FLOPs), so a
3.8 s clip pays for 30 s of compute. Packing lays the clips of an epoch, in that epoch's seeded
random order, one after another into windows (:func:`pack`): a window is closed when the next clip
would take it past ``max_seconds`` of audio or its label past ``max_label_tokens``. The layout is a
pure function of (seed, epoch), so the step-addressed sampler (:mod:`toolkit.training.batching`)
keeps its guarantees: exact resume with no saved loader state, and the same windows per step on 1
or N processes. The global batch then counts windows.

A window's plain label is the prompt of a single clip followed by every clip's transcript in order,
separated by a space, then end-of-text. Every clip's segments are kept, shifted to their exact place in
the window, so the timestamped layout (:mod:`toolkit.data.targets`) is built from the same window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np

from toolkit.data.audio import SAMPLING_RATE
from toolkit.data.dataset import Example, SpeechDataset, attach_targets
from toolkit.data.segments import WINDOW_SECONDS, Segment
from toolkit.data.targets import Targets

GAP_SECONDS = 0.3
"""Silence between two packed clips: about a pause between sentences."""


class Windows(Sequence[tuple[int, ...]]):
    """An epoch's windows: its clip order cut at ``ends`` (window ``w`` is ``order[ends[w-1]:ends[w]]``).

    Two int arrays instead of a tuple per window: a sampler keeps a few epochs of millions of clips.
    """

    def __init__(self, order: np.ndarray, ends: np.ndarray):
        self.order, self.ends = order, ends

    def __len__(self) -> int:
        return len(self.ends)

    @overload
    def __getitem__(self, index: int) -> tuple[int, ...]: ...

    @overload
    def __getitem__(self, index: slice) -> list[tuple[int, ...]]: ...

    def __getitem__(self, index: int | slice) -> tuple[int, ...] | list[tuple[int, ...]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = int(self.ends[index - 1]) if index else 0
        return tuple(self.order[start : int(self.ends[index])].tolist())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(other) == len(self) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]


def pack(order: np.ndarray, durations: np.ndarray, tokens: np.ndarray, max_seconds: float,
         max_tokens: int, gap: float = GAP_SECONDS) -> Windows:
    """Greedy packing of ``order`` (row numbers) into windows, in that order.

    ``tokens[i]`` is what clip ``i`` adds to a label; ``max_tokens`` what a window's label may hold
    besides the prompt and end-of-text. A clip is never split, and one alone always fits (longer
    clips and labels were filtered out when the data loaded).
    """
    ends: list[int] = []
    count = 0
    seconds = 0.0
    used = 0
    # Python scalars up front: the same float and int values, without a numpy lookup per clip.
    for position, (duration, cost) in enumerate(zip(durations[order].tolist(), tokens[order].tolist(), strict=True)):
        need = duration + (gap if count else 0.0)
        if count and (seconds + need > max_seconds or used + cost > max_tokens):
            ends.append(position)
            count, seconds, used, need = 0, 0.0, 0, duration
        count += 1
        seconds += need
        used += cost
    if count:
        ends.append(len(order))
    return Windows(np.asarray(order, dtype=np.int64), np.asarray(ends, dtype=np.int64))


@dataclass
class Packer:
    """Packs clips into windows; their labels come from the dataset's :class:`~toolkit.data.targets.Targets`."""

    targets: Targets
    max_label_tokens: int
    max_seconds: float = WINDOW_SECONDS
    gap: float = GAP_SECONDS
    _costs: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def build(cls, dataset: SpeechDataset, tokenizer: Any, max_label_tokens: int) -> Packer:
        """A packer for ``dataset``, from its attached targets (plain ones are attached if it has none)."""
        if dataset.labels is None:
            raise ValueError("packing needs a dataset with labels")
        targets = dataset.targets or attach_targets(dataset, tokenizer, len(tokenizer), seed=0,
                                                    timestamp_probability=0.0, previous_probability=0.0)
        return cls(targets, max_label_tokens)

    def layout(self, order: np.ndarray, durations: np.ndarray) -> Windows:
        """The windows of one epoch, given its clip order (a seeded permutation)."""
        # What a clip costs in whichever layout and place it ends up: whatever the draw, the label fits.
        if self._costs is None:
            self._costs = self.targets.clip_costs()
        return pack(order, durations, self._costs, self.max_seconds, self.targets.text_budget(self.max_label_tokens),
                    self.gap)

    def window_labels(self, unit: tuple[int, ...]) -> list[int]:
        return self.targets.plain(unit)

    def window_tokens(self, unit: tuple[int, ...]) -> int:
        """Tokens the window's plain label contributes to the loss (its start token is not predicted)."""
        return self.targets.plain_length(unit) - 1

    def window(self, dataset: SpeechDataset, unit: tuple[int, ...]) -> Example:
        """The packed window ``unit``: the clips' audio with silent gaps, one label, every segment's span."""
        clips = [dataset.clip(i) for i in unit]
        scale = max(c.scale for c in clips)
        gap = np.zeros(round(self.gap * SAMPLING_RATE), dtype=np.int16)
        parts: list[np.ndarray] = []
        segments: list[Segment] = []
        position = 0
        for clip in clips:
            if parts:
                parts.append(gap)
                position += len(gap)
            pcm = clip.pcm if clip.scale == scale else _rescale(clip.pcm, clip.scale / scale)
            parts.append(pcm)
            segments += [s.shifted(position / SAMPLING_RATE) for s in clip.segments or ()]
            position += len(pcm)
        return Example(
            id="+".join(c.id for c in clips), pcm=np.concatenate(parts), scale=scale,
            text=" ".join(c.text for c in clips), labels=self.window_labels(unit), segments=segments,
        )


def _rescale(pcm: np.ndarray, factor: float) -> np.ndarray:
    return np.round(pcm.astype(np.float32) * factor).astype(np.int16)


