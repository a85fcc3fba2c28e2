"""Transcripts tokenised once per content, and held compactly.

A corpus of millions of clips cannot afford a Python list of token lists per layout, nor to tokenise
every transcript again at each start. :class:`Ragged` holds many token sequences as one int32 array
plus offsets (a ``list[list[int]]`` to its readers). :func:`encode` tokenises in blocks of
``BLOCK`` texts; each block is stored under a key hashing the tokenizer, the texts and how they are
encoded, as ``.npz`` (read with ``allow_pickle=False``), so a restart, a resume or another run over
the same data loads it instead. Ranks start at different blocks and load what another rank already
wrote, so N processes share the first tokenisation without talking to each other.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

BLOCK = 16_384


class Ragged:
    """Token sequences as one flat int32 array; ``ragged[i]`` is sequence ``i`` as a list."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat = flat
        self.offsets = offsets

    @classmethod
    def from_lists(cls, sequences: Sequence[Sequence[int]]) -> Ragged:
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter((t for s in sequences for t in s), dtype=np.int32, count=int(offsets[-1]))
        return cls(flat, offsets)

    @classmethod
    def concat(cls, parts: Sequence[Ragged]) -> Ragged:
        if not parts:
            return cls(np.zeros(0, np.int32), np.zeros(1, np.int64))
        flat = np.concatenate([p.flat for p in parts])
        shifts = np.cumsum([0] + [int(p.offsets[-1]) for p in parts[:-1]])
        offsets = np.concatenate([[0]] + [p.offsets[1:] + s for p, s in zip(parts, shifts, strict=True)])
        return cls(flat, offsets.astype(np.int64))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Ragged) and np.array_equal(self.offsets, other.offsets)
                and np.array_equal(self.flat, other.flat))

    __hash__ = None  # type: ignore[assignment]  # mutable arrays: equal, not hashable

    def __getitem__(self, index: int) -> list[int]:
        return self.flat[self.offsets[index] : self.offsets[index + 1]].tolist()

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, rows: np.ndarray) -> Ragged:
        """Sequences ``rows``, in that order (this very table when that is all of them)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == len(self) and np.array_equal(rows, np.arange(len(self))):
            return self
        starts, lengths = self.offsets[rows], self.lengths()[rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        index = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return Ragged(self.flat[index], offsets)

    def wrapped(self, before: Sequence[int], after: Sequence[int]) -> Ragged:
        """Each sequence with ``before`` prepended and ``after`` appended."""
        b, a = np.asarray(before, np.int32), np.asarray(after, np.int32)
        lengths = self.lengths() + len(b) + len(a)
        offsets = np.zeros(len(self) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.empty(int(offsets[-1]), dtype=np.int32)
        body = np.repeat(offsets[:-1] + len(b) - self.offsets[:-1], self.lengths()) + np.arange(len(self.flat))
        flat[body] = self.flat
        for k, token in enumerate(b):
            flat[offsets[:-1] + k] = token
        for k, token in enumerate(a):
            flat[offsets[1:] - len(a) + k] = token
        return Ragged(flat, offsets)


class Wrapped:
    """``inner``'s sequences each between ``before`` and ``after`` (whole labels: prompt, text,
    end-of-text), built when read instead of stored a second time."""

    def __init__(self, inner: Ragged, before: Sequence[int], after: Sequence[int]):
        self.inner, self.before, self.after = inner, list(before), list(after)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> list[int]:
        return [*self.before, *self.inner[index], *self.after]

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Wrapped) and self.inner == other.inner and self.before == other.before
                and self.after == other.after)

    __hash__ = None  # type: ignore[assignment]

    def lengths(self) -> np.ndarray:
        return self.inner.lengths() + len(self.before) + len(self.after)

    def flat_blocks(self, rows: int = BLOCK) -> Iterator[np.ndarray]:
        """Every token in order, ``rows`` sequences at a time (what one flat array would hold)."""
        for start in range(0, len(self), rows):
            part = self.inner.take(np.arange(start, min(start + rows, len(self))))
            yield part.wrapped(self.before, self.after).flat


class Stacked:
    """Several label tables (:class:`Wrapped` or :class:`Ragged`: one per corpus) one after another."""

    def __init__(self, parts: Sequence[Wrapped | Ragged]):
        self.parts = list(parts)
        self.starts = np.cumsum([0, *(len(p) for p in self.parts)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> list[int]:
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.parts[part][index - int(self.starts[part])]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stacked) and len(other.parts) == len(self.parts) and all(
            a == b for a, b in zip(self.parts, other.parts, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def lengths(self) -> np.ndarray:
        return np.concatenate([p.lengths() for p in self.parts])

    def flat_blocks(self, rows: int = BLOCK) -> Iterator[np.ndarray]:
        for part in self.parts:
            yield from (part.flat_blocks(rows) if isinstance(part, Wrapped) else [part.flat])


def tokenizer_digest(tokenizer: Any) -> str:
    """Changes whenever the tokenizer's vocabulary, merges or normalisation do."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def encode(tokenizer: Any, texts: Sequence[str] | pa.Array | pa.ChunkedArray, cache_dir: Path | None = None, *,
           rank: int = 0, world_size: int = 1, spaced: bool = False) -> Ragged:
    """``texts`` tokenised without special tokens, in blocks cached under ``cache_dir`` (if given).

    ``texts`` may be an Arrow column: it is then read a block at a time, never as one Python list.
    ``spaced``: each text is tokenised as ``" " + text.lstrip()`` (a transcript after another one).
    """
    digest = tokenizer_digest(tokenizer) if cache_dir is not None else ""
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
    count = (len(texts) + BLOCK - 1) // BLOCK
    parts: list[Ragged | None] = [None] * count
    first = count * rank // max(world_size, 1)  # each rank starts elsewhere, then wraps around
    for b in [*range(first, count), *range(first)]:
        block = texts[b * BLOCK : (b + 1) * BLOCK]
        block = block.to_pylist() if isinstance(block, pa.Array | pa.ChunkedArray) else list(block)
        if spaced:
            block = [" " + str(text).lstrip() for text in block]
        parts[b] = _block(tokenizer, block, cache_dir, digest)
    return Ragged.concat([p for p in parts if p is not None])


def _block(tokenizer: Any, texts: Sequence[str], cache_dir: Path | None, digest: str) -> Ragged:
    path = None
    if cache_dir is not None:
        key = hashlib.sha256(("\x00".join([digest, *texts])).encode()).hexdigest()[:32]
        path = cache_dir / f"{key}.npz"
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as stored:
                    return Ragged(stored["flat"], stored["offsets"])
            except (OSError, ValueError, KeyError):
                pass  # unreadable: encode again and replace it
    encodings = tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)
    ragged = Ragged.from_lists([e.ids for e in encodings])
    if path is not None:
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, flat=ragged.flat, offsets=ragged.offsets)
        os.replace(tmp, path)
    return ragged


class Pieces:
    """Every clip's segment tokens: ``pieces[i]`` is clip ``i``'s list of segment token lists.

    A clip whose one segment is its whole transcript (most single clips) shares the transcript's
    tokens (``spaced``) instead of holding a copy; the others' segments are in ``own``, clip ``i``'s
    at ``own[starts[i]:starts[i + 1]]``.
    """

    def __init__(self, spaced: Ragged, whole: np.ndarray, own: Ragged, starts: np.ndarray):
        self.spaced, self.whole, self.own, self.starts = spaced, whole, own, starts

    @classmethod
    def from_lists(cls, pieces: Sequence[Sequence[Sequence[int]]]) -> Pieces:
        starts = np.zeros(len(pieces) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in pieces], out=starts[1:])
        own = Ragged.from_lists([piece for clip in pieces for piece in clip])
        return cls(Ragged.from_lists([]), np.zeros(len(pieces), bool), own, starts)

    def __len__(self) -> int:
        return len(self.whole)

    def __getitem__(self, index: int) -> list[list[int]]:
        if self.whole[index]:
            return [self.spaced[index]]
        return [self.own[k] for k in range(self.starts[index], self.starts[index + 1])]

    def costs(self) -> np.ndarray:
        """Per clip: its segments' tokens plus two timestamps each."""
        running = np.concatenate([[0], np.cumsum(self.own.lengths() + 2)])
        own = running[self.starts[1:]] - running[self.starts[:-1]]
        if self.whole.any():
            own[self.whole] = self.spaced.lengths()[self.whole] + 2
        return own
