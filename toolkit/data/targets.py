"""Training labels in Whisper's token layouts, drawn per sample.

``S`` is ``<|startoftranscript|>`` followed, for a multilingual model, by the language and task tokens:

* plain: ``S <|notimestamps|> text <|endoftext|>``;
* with segment timestamps: ``S <|0.00|> text <|3.42|><|3.80|> text <|7.10|><|endoftext|>``;
* with a previous-text prompt, either of these after ``<|startofprev|> previous text``. The prompt is
  context, not a target: the collator leaves its tokens (and the ``S`` that follows them) out of the loss.
* a no-speech clip: ``<|startoftranscript|><|nospeech|><|endoftext|>``, Whisper's own target for audio
  without speech (its probability after ``S`` is what decoders read as "no speech").

Which layout a training sample gets is drawn from (seed, stream position) alone
(:func:`draw`), so it is the same on 1 or N processes and after a resume, and the sample's label
length is known without touching its audio. Timestamps are quantised to Whisper's 0.02 s grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from toolkit.config import ConfigError
from toolkit.data.segments import Segment
from toolkit.data.tokens import Pieces, Ragged

TIME_PRECISION = 0.02
"""Seconds per timestamp token."""
LAST_TIMESTAMP = 1500
"""``<|30.00|>`` is the 1,501st timestamp token."""
DRAW_STREAM = 0x7A6E
"""Mixed into the draws' seed so that they never coincide with the sampler's permutations."""


@dataclass(frozen=True)
class Draw:
    """Which layout one training sample gets."""

    timestamps: bool
    previous: bool


def draw(seed: int, position: int, timestamp_probability: float, previous_probability: float) -> Draw:
    """The layout of the sample at stream ``position`` (a pure function of seed and position)."""
    u_time, u_prev = np.random.default_rng([seed, position, DRAW_STREAM]).random(2)
    return Draw(bool(u_time < timestamp_probability), bool(u_prev < previous_probability))


@dataclass(frozen=True)
class Special:
    """The special token ids the layouts use."""

    prefix: tuple[int, ...]
    """The plain layout's start: ``S`` (language, task) ``<|notimestamps|>``."""
    eot: int
    sot: int
    notimestamps: int
    startofprev: int
    nospeech: int
    timestamp_begin: int
    """``<|0.00|>``."""

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocab_size: int, timestamps: bool = True) -> Special:
        """Read the ids off ``tokenizer``; with ``timestamps``, refuse a layout whose timestamp tokens
        the model cannot emit.

        The timestamps are the 1,501 ids after ``<|notimestamps|>`` (what transformers' generation
        assumes too): openai's own tokenizer files do not always list them as tokens.
        """
        ids = {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>")
               for name in ("startoftranscript", "notimestamps", "startofprev", "nospeech", "nocaptions")}
        unknown = tokenizer.unk_token_id
        nospeech = ids["nospeech"] if ids["nospeech"] not in (None, unknown) else ids["nocaptions"]  # older vocabularies
        begin = ids["notimestamps"] + 1
        if timestamps and begin + LAST_TIMESTAMP >= vocab_size:
            raise ConfigError(f"data.timestamp_probability: the model has no timestamp tokens (<|notimestamps|> is "
                              f"{ids['notimestamps']}, vocabulary {vocab_size}); set data.timestamp_probability=0")
        prefix = tuple(tokenizer.prefix_tokens)
        if prefix[-1] != ids["notimestamps"]:
            raise ConfigError("the tokenizer's prefix does not end in <|notimestamps|> (it is set to predict timestamps); "
                              "load it with predict_timestamps off")
        return cls(prefix, int(tokenizer.eos_token_id), ids["startoftranscript"], ids["notimestamps"],
                   ids["startofprev"], nospeech, begin)

    def timestamp(self, seconds: float) -> int:
        index = round(seconds / TIME_PRECISION)
        if not 0 <= index <= LAST_TIMESTAMP:
            raise ValueError(f"a segment time of {seconds:.2f} s is outside Whisper's 0-30 s timestamp range")
        return self.timestamp_begin + index


@dataclass(eq=False)  # numpy fields: compare what matters in tests, not the whole object
class Targets:
    """Every clip's text tokens, the draw settings, and the layouts built from them.

    ``first[i]``/``spaced[i]``: clip ``i``'s transcript tokens at the start of a label, and after
    another clip (with the separating space); ``pieces[i]``: its segments' tokens (each with a
    leading space, as Whisper writes text after a timestamp; empty when timestamps are off);
    ``no_speech[i]``: a no-speech clip; ``previous[i]``: the clip spoken just before clip ``i`` in
    the same recording, -1 if none is known.
    """

    special: Special
    first: Ragged
    spaced: Ragged
    pieces: Pieces
    no_speech: np.ndarray
    previous: np.ndarray
    max_tokens: int
    """Decoder positions a label (prompt included) may use."""
    seed: int = 0
    timestamp_probability: float = 0.0
    previous_probability: float = 0.0
    prefixes: list[tuple[int, ...]] | None = None
    """Several corpora: each one's ``S <|notimestamps|>`` (its language and task); None: ``special.prefix``."""
    prefix_of: np.ndarray | None = None
    """Several corpora: each clip's index into ``prefixes``."""

    def __post_init__(self) -> None:
        # Lists are accepted (small tables, tests); the sizes below are arrays over every clip.
        self.first = self.first if isinstance(self.first, Ragged) else Ragged.from_lists(self.first)
        self.spaced = self.spaced if isinstance(self.spaced, Ragged) else Ragged.from_lists(self.spaced)
        self.pieces = self.pieces if isinstance(self.pieces, Pieces) else Pieces.from_lists(self.pieces)
        self._first_len = self.first.lengths()
        self._spaced_len = self.spaced.lengths()
        self._piece_cost = self.pieces.costs()
        if self.prefixes is None or self.prefix_of is None:
            self.prefixes, self.prefix_of = [tuple(self.special.prefix)], np.zeros(len(self.first), dtype=np.int64)
        if any(prefix[-1] != self.special.notimestamps for prefix in self.prefixes):
            raise ValueError("every prefix must end in <|notimestamps|>")
        self._prefix_len = np.asarray([len(p) for p in self.prefixes], dtype=np.int64)[self.prefix_of]

    def prefix(self, row: int) -> tuple[int, ...]:
        """Clip ``row``'s ``S <|notimestamps|>``: a sample takes its first clip's (a window holds one corpus)."""
        return self.prefixes[int(self.prefix_of[row])]

    # -- one training sample ---------------------------------------------------------------------------
    def label(self, rows: Sequence[int], position: int, previous: Sequence[int] | None,
              segments: Sequence[Segment] | None) -> tuple[list[int], int]:
        """(tokens, prompt length) of the sample at stream ``position`` made of clips ``rows``.

        ``previous``: the clips of the unit before it (a packed window's predecessor); None takes the
        recording's previous clip for a single clip. ``segments``: the unit's segment times.
        """
        chosen = self._draw(rows, position)
        if chosen.timestamps:
            if segments is None:
                raise ValueError("a timestamped label needs the unit's segment times")
            label = self.timestamped(rows, segments)
        else:
            label = self.plain(rows)
        prompt = self.prompt(self._previous(rows, previous), len(label)) if chosen.previous else []
        return [*prompt, *label], len(prompt)

    def sizes(self, rows: Sequence[int], position: int, previous: Sequence[int] | None) -> tuple[int, int]:
        """(tokens in the loss, decoder positions) of that sample, without building its label."""
        chosen = self._draw(rows, position)
        length = self.timestamped_length(rows) if chosen.timestamps else self.plain_length(rows)
        prompt = len(self.prompt(self._previous(rows, previous), length)) if chosen.previous else 0
        return length - 1, prompt + length - 1

    def _draw(self, rows: Sequence[int], position: int) -> Draw:
        chosen = draw(self.seed, position, self.timestamp_probability, self.previous_probability)
        if chosen.timestamps and self.timestamped_length(rows) > self.max_tokens:
            # Two timestamps per segment can push a label at the length limit past the decoder's 448.
            return Draw(False, chosen.previous)
        return chosen

    def _previous(self, rows: Sequence[int], previous: Sequence[int] | None) -> Sequence[int]:
        if previous is not None:
            return previous
        before = int(self.previous[rows[0]]) if len(rows) == 1 else -1
        return (before,) if before >= 0 else ()

    # -- layouts --------------------------------------------------------------------------------------
    def plain(self, rows: Sequence[int]) -> list[int]:
        """``S <|notimestamps|>`` the clips' transcripts in order ``<|endoftext|>``."""
        if len(rows) == 1 and self.no_speech[rows[0]]:
            return [self.special.sot, self.special.nospeech, self.special.eot]
        text = [token for n, row in enumerate(rows) for token in (self.spaced[row] if n else self.first[row])]
        return [*self.prefix(rows[0]), *text, self.special.eot]

    def timestamped(self, rows: Sequence[int], segments: Sequence[Segment]) -> list[int]:
        """``S`` then each segment as ``<|start|> text <|end|>``, then ``<|endoftext|>``.

        ``segments``: the clips' segments in order, timed from the start of the unit (a packed
        window shifts each clip's segments by the clip's place in it).
        """
        if len(rows) == 1 and self.no_speech[rows[0]]:
            return self.plain(rows)
        pieces = [piece for row in rows for piece in self.pieces[row]]
        if len(pieces) != len(segments):
            raise ValueError(f"{len(segments)} segment times for {len(pieces)} segments")
        out = list(self.prefix(rows[0])[:-1])
        for segment, piece in zip(segments, pieces, strict=True):
            out += [self.special.timestamp(segment.start), *piece, self.special.timestamp(segment.end)]
        return [*out, self.special.eot]

    def prompt(self, previous: Sequence[int], label_length: int) -> list[int]:
        """``<|startofprev|>`` and the end of the previous unit's transcript, capped at half the
        decoder context and at what ``label_length`` leaves of it; empty when nothing fits."""
        room = min(self.max_tokens // 2, self.max_tokens - label_length) - 1
        text = [token for row in previous for token in self.spaced[row]]
        if room <= 0 or not text:
            return []
        return [self.special.startofprev, *text[-room:]]

    # -- sizes ---------------------------------------------------------------------------------------------
    def plain_length(self, rows: Sequence[int]) -> int:
        if len(rows) == 1 and self.no_speech[rows[0]]:
            return 3
        rest = int(self._spaced_len[list(rows[1:])].sum()) if len(rows) > 1 else 0
        return int(self._prefix_len[rows[0]]) + int(self._first_len[rows[0]]) + rest + 1

    def timestamped_length(self, rows: Sequence[int]) -> int:
        """The timestamped label's length, without building it (two timestamps per segment)."""
        if len(rows) == 1 and self.no_speech[rows[0]]:
            return 3
        return int(self._prefix_len[rows[0]]) - 1 + int(self._piece_cost[list(rows)].sum()) + 1

    def clip_costs(self) -> np.ndarray:
        """The most text tokens each clip adds to a packed label, in whichever layout and place."""
        cost = np.maximum(self._first_len, self._spaced_len)
        return np.maximum(cost, self._piece_cost) if self.timestamp_probability > 0 else cost

    def worst_positions(self, packed_label_tokens: int | None = None) -> int:
        """The most decoder positions any sample takes: its longest layout, plus a prompt when they are
        drawn (it fills at most half the context). ``packed_label_tokens``: a packed window's limit."""
        if packed_label_tokens is not None:
            longest = packed_label_tokens
        else:
            speech = ~np.asarray(self.no_speech, dtype=bool)
            prefix = self._prefix_len[speech]
            longest = max(int((prefix + self._first_len[speech] + 1).max(initial=3)), 3)
            if self.timestamp_probability > 0:
                longest = max(longest, int((prefix + self._piece_cost[speech]).max(initial=3)))
        prompted = packed_label_tokens is not None or bool((self.previous >= 0).any())
        if self.previous_probability > 0 and prompted:
            longest = min(longest + self.max_tokens // 2, self.max_tokens)
        return longest - 1

    def text_budget(self, max_label_tokens: int) -> int:
        """What a packed label may hold besides its fixed start and end-of-text (the longest start)."""
        return max_label_tokens - int(self._prefix_len.max(initial=len(self.special.prefix))) - 1
