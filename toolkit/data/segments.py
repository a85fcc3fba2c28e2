"""Timed transcript pieces: where each piece of a clip's transcript is spoken, and cutting long
recordings into 30 s training windows the way Whisper's own training data was cut.

Every cached clip carries its segments (seconds from the clip's start):

* from the manifest's ``segments`` column (``[{start, end, text}]``), checked here;
* otherwise one segment holding the whole transcript, from the first to the last non-silent frame
  (:func:`toolkit.data.audio.speech_bounds`);
* none for a no-speech clip.

A recording longer than a window that has segments is cut by :func:`cut_windows`: a window ends at
the last segment that fits in it, and the next window starts there. A segment longer than a window
cannot be in any and is dropped (reported as a skip).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from toolkit.data.audio import SAMPLING_RATE, speech_bounds

WINDOW_SECONDS = 30.0
"""Whisper's input window."""
TOLERANCE_SECONDS = 0.05
"""Slack for segment times that overshoot the audio or the previous segment by rounding."""


@dataclass(frozen=True)
class Segment:
    """One timed piece of a transcript: seconds from the start of its clip or window, and its text."""

    start: float
    end: float
    text: str

    def shifted(self, seconds: float) -> Segment:
        """The segment ``seconds`` later (its place in a packed window)."""
        return Segment(self.start + seconds, self.end + seconds, self.text)


class SegmentError(ValueError):
    """A manifest's ``segments`` value cannot be used; the row is skipped with this reason."""


def parse_segments(raw: str, duration: float) -> list[Segment]:
    """The segments of a manifest row, checked against each other and the audio's ``duration``."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise SegmentError(f"segments: not valid JSON ({exc.msg})") from None
    if not isinstance(data, list) or not data:
        raise SegmentError("segments: not a non-empty list of {start, end, text}")
    segments: list[Segment] = []
    for number, entry in enumerate(data, 1):
        if not isinstance(entry, dict) or not {"start", "end", "text"} <= set(entry):
            raise SegmentError(f"segments: entry {number} is not an object with start, end and text")
        start, end, text = entry["start"], entry["end"], entry["text"]
        if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) for t in (start, end)):
            raise SegmentError(f"segments: entry {number} has a start or end that is not a finite number")
        if not isinstance(text, str) or not text.strip():
            raise SegmentError(f"segments: entry {number} has no text")
        if not 0 <= start <= end <= duration + TOLERANCE_SECONDS:
            raise SegmentError(f"segments: entry {number} ({start}-{end} s) is not inside the audio (0-{duration:.2f} s)")
        if segments and start < segments[-1].end - TOLERANCE_SECONDS:
            raise SegmentError(f"segments: entry {number} starts before entry {number - 1} ends")
        segments.append(Segment(float(start), min(float(end), duration), text.strip()))
    return segments


def clip_segments(samples: np.ndarray, text: str) -> list[Segment]:
    """One segment with the whole transcript, trimmed to the speech (all of the clip if it is silent)."""
    duration = len(samples) / SAMPLING_RATE
    bounds = speech_bounds(samples) or (0.0, duration)
    return [Segment(bounds[0], bounds[1], text)]


def to_json(segments: list[Segment]) -> str:
    """The cache's form: ``[[start, end, text], ...]``."""
    return json.dumps([[round(s.start, 3), round(s.end, 3), s.text] for s in segments], ensure_ascii=False)


def from_json(raw: str) -> list[Segment]:
    return [Segment(start, end, text) for start, end, text in json.loads(raw)]


@dataclass(frozen=True)
class Window:
    """A piece of a long recording: ``[start, end)`` seconds in it, and its segments (from ``start``)."""

    start: float
    end: float
    segments: list[Segment]

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.segments)


def cut_windows(segments: list[Segment], window: float = WINDOW_SECONDS) -> tuple[list[Window], list[Segment]]:
    """Cut a long recording into windows of at most ``window`` seconds; returns (windows, dropped).

    The first window starts at 0. A window takes the segments that end within ``window`` seconds of
    its start, and ends where the last of them ends; the next window starts there. When the next
    segment does not fit even in an empty window (a pause longer than the window before it), the
    window starts at that segment's start instead. A segment longer than ``window`` is dropped.
    """
    windows: list[Window] = []
    dropped: list[Segment] = []
    start, i = 0.0, 0
    while i < len(segments):
        first = segments[i]
        if first.end - first.start > window:
            dropped.append(first)
            start = max(start, first.end)
            i += 1
            continue
        if first.end > start + window:
            start = first.start
        j = i
        while j < len(segments) and segments[j].end <= start + window:
            j += 1
        taken = segments[i:j]
        end = taken[-1].end
        # max(): a segment may start a little before the previous one ended (TOLERANCE_SECONDS).
        windows.append(Window(start, end, [Segment(max(0.0, s.start - start), s.end - start, s.text) for s in taken]))
        start, i = end, j
    return windows, dropped
