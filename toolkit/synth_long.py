"""Long-form and no-speech evaluation sets, synthesised next to :mod:`toolkit.synth`'s train/dev corpus.

Both are audiofolders (16 kHz mono FLAC) beside ``OUT/train`` and ``OUT/dev``::

    OUT/longform/metadata.csv   file_name,sentence,segments
    OUT/nospeech/metadata.csv   file_name,sentence,no_speech

A long-form recording is one speaker (voice, speed and pitch drawn per recording) reading dev-side
sentences (``split_of(s) == "dev"``, so never a training sentence) with 0.4-2.0 s of digital silence
between them, until its drawn length (default 2-5 minutes) is reached: it ends after the sentence that
reaches it. ``sentence`` is the whole transcript (the sentences joined by single spaces) and ``segments``
a JSON list of ``{"start", "end", "text"}``, seconds from the start of the file rounded to 0.01: each
sentence's speech (:func:`toolkit.data.audio.speech_bounds` of its own clip) shifted by the clip's offset.

A no-speech clip is 2-30 s of silence, low-level white or pink noise, mains hum (50/60 Hz and
harmonics), or hum with noise under it; ``sentence`` is empty and ``no_speech`` is ``true``.

Long-form recordings are in the corpus's language (``language``, English by default; seed strings
name a language other than English, as in :mod:`toolkit.synth`); no-speech clips have none.

Everything is drawn from generators seeded by ``(seed, set, index)``, and each recording is made by
one worker, so the output is the same for any number of jobs. A set is written into a hidden
temporary directory under OUT and renamed into place when complete.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import soundfile as sf

from toolkit.data.audio import speech_bounds
from toolkit.synth import (
    MAX_WORDS,
    MIN_WORDS,
    PITCH_RANGE,
    SAMPLE_RATE,
    SPEED_RANGE,
    SynthError,
    find_espeak,
    get_language,
    normalise,
    speak,
    split_of,
    synthesize_corpus,
)

LONG_DIR = "longform"
NO_SPEECH_DIR = "nospeech"
LONG_MINUTES = (2.0, 5.0)
PAUSE_SECONDS = (0.4, 2.0)
NO_SPEECH_SECONDS = (2.0, 30.0)
NO_SPEECH_KINDS = ("silence", "white", "pink", "hum", "mix")
NOISE_DB = (-65.0, -40.0)  # RMS in dB below full scale: a quiet room or a line-level floor, not loud noise
HUM_DB = (-55.0, -35.0)
HUM_HARMONICS = 5
MAX_SENTENCE_MISSES = 10_000  # draws in a row without a new dev sentence before giving up


class Progress(Protocol):
    """``progress(done, total, unit)``; ``unit`` says what is counted (``"clips"`` by default)."""

    def __call__(self, done: int, total: int, unit: str = "clips") -> None: ...


@dataclass(frozen=True)
class Recording:
    """One long-form recording to make: its speaker, the length to reach and its language."""

    index: int
    voice: str
    speed: int
    pitch: int
    target_seconds: float
    language: str = "en"

    @property
    def file_name(self) -> str:
        return f"{LONG_DIR}-{self.index:06d}.flac"


@dataclass(frozen=True)
class LongFormRow:
    """A written recording: its transcript, its segments and its length in samples."""

    file_name: str
    sentence: str
    segments: list[dict[str, float | str]]
    samples: int


@dataclass(frozen=True)
class NoSpeechClip:
    """One no-speech clip: its length and what it holds (``noise`` none/white/pink, hum 0/50/60 Hz)."""

    index: int
    kind: str
    samples: int
    noise: str
    noise_db: float
    hum_hz: int
    hum_db: float

    @property
    def file_name(self) -> str:
        return f"{NO_SPEECH_DIR}-{self.index:06d}.flac"


def plan_recording(
    index: int, seed: int, minutes: tuple[float, float] = LONG_MINUTES, language: str = "en"
) -> Recording:
    """Speaker and target length of recording ``index``."""
    lang = get_language(language)
    rng = random.Random(f"whisper-toolkit-longform:{lang.seed_tag}{seed}:{index}")
    voice = f"{rng.choice(lang.voices)}+{rng.choice(lang.variants)}"
    speed, pitch = rng.randint(*SPEED_RANGE), rng.randint(*PITCH_RANGE)
    return Recording(index, voice, speed, pitch, rng.uniform(*minutes) * 60, language)


def dev_sentences(seed: int, index: int, language: str = "en") -> Iterator[str]:
    """An endless stream of distinct dev-side ``language`` sentences for recording ``index``."""
    lang = get_language(language)
    rng = random.Random(f"whisper-toolkit-longform-sentences:{lang.seed_tag}{seed}:{index}")
    seen: set[str] = set()
    misses = 0
    while True:
        sentence = lang.sentence(rng)
        key = normalise(sentence)
        if key in seen or split_of(sentence) != "dev" or not MIN_WORDS <= len(key.split()) <= MAX_WORDS:
            misses += 1
            if misses > MAX_SENTENCE_MISSES:
                raise SynthError(f"ran out of distinct dev sentences for long-form recording {index}")
            continue
        misses = 0
        seen.add(key)
        yield sentence


def synthesize_recording(espeak: str, recording: Recording, seed: int, out_dir: Path, tmp_dir: Path) -> LongFormRow:
    """Speak sentences with pauses into ``out_dir`` until the recording's target length is reached."""
    tag = get_language(recording.language).seed_tag
    pauses = random.Random(f"whisper-toolkit-longform-pauses:{tag}{seed}:{recording.index}")
    target = round(recording.target_seconds * SAMPLE_RATE)
    wav = tmp_dir / f"{LONG_DIR}-{recording.index:06d}.wav"
    pieces: list[np.ndarray] = []
    spans: list[tuple[int, float, float, str]] = []  # clip offset (samples), speech bounds in the clip, text
    length = 0
    for sentence in dev_sentences(seed, recording.index, recording.language):
        if pieces:
            pause = np.zeros(round(pauses.uniform(*PAUSE_SECONDS) * SAMPLE_RATE), dtype=np.float32)
            pieces.append(pause)
            length += pause.size
        clip = speak(espeak, sentence, voice=recording.voice, speed=recording.speed, pitch=recording.pitch, wav=wav)
        bounds = speech_bounds(clip, SAMPLE_RATE)
        if bounds is None:
            raise SynthError(f"espeak-ng produced silence for {sentence!r} (voice {recording.voice})")
        spans.append((length, *bounds, sentence))
        pieces.append(clip)
        length += clip.size
        if length >= target:
            break
    audio = np.concatenate(pieces)
    sf.write(out_dir / recording.file_name, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    # Rounding must not push the last end past the file's end.
    last = math.floor(length / SAMPLE_RATE * 100) / 100
    segments: list[dict[str, float | str]] = [
        {"start": round(offset / SAMPLE_RATE + start, 2), "end": min(round(offset / SAMPLE_RATE + end, 2), last),
         "text": text}
        for offset, start, end, text in spans
    ]
    return LongFormRow(recording.file_name, " ".join(text for *_, text in spans), segments, length)


def plan_no_speech(index: int, seed: int) -> NoSpeechClip:
    """Length and content of no-speech clip ``index``."""
    rng = random.Random(f"whisper-toolkit-nospeech:{seed}:{index}")
    kind = rng.choice(NO_SPEECH_KINDS)
    samples = round(rng.uniform(*NO_SPEECH_SECONDS) * SAMPLE_RATE)
    noise = {"white": "white", "pink": "pink", "mix": rng.choice(("white", "pink"))}.get(kind, "none")
    hum_hz = rng.choice((50, 60)) if kind in ("hum", "mix") else 0
    hum_db = rng.uniform(*HUM_DB)
    # Under a hum the noise sits a little lower, as a floor.
    noise_db = rng.uniform(*NOISE_DB) - (rng.uniform(3.0, 12.0) if kind == "mix" else 0.0)
    return NoSpeechClip(index, kind, samples, noise, noise_db, hum_hz, hum_db)


def _at_level(signal: np.ndarray, db: float) -> np.ndarray:
    rms = float(np.sqrt(np.mean(signal.astype(np.float64) ** 2)))
    return signal * (10 ** (db / 20) / rms) if rms > 0 else signal


def render_no_speech(clip: NoSpeechClip, seed: int) -> np.ndarray:
    """The clip's audio, float32 in [-1, 1]."""
    digest = hashlib.sha256(f"whisper-toolkit-nospeech-audio:{seed}:{clip.index}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    audio = np.zeros(clip.samples, dtype=np.float64)
    if clip.noise != "none":
        white = rng.standard_normal(clip.samples)
        if clip.noise == "pink":
            # 1/f power: scale each frequency's amplitude by 1/sqrt(f); DC is dropped.
            spectrum = np.fft.rfft(white)
            freqs = np.fft.rfftfreq(clip.samples, 1 / SAMPLE_RATE)
            spectrum[0] = 0
            spectrum[1:] /= np.sqrt(freqs[1:])
            white = np.fft.irfft(spectrum, n=clip.samples)
        audio += _at_level(white, clip.noise_db)
    if clip.hum_hz:
        t = np.arange(clip.samples) / SAMPLE_RATE
        hum = np.zeros(clip.samples)
        for harmonic in range(1, HUM_HARMONICS + 1):
            weight = 1.0 if harmonic == 1 else rng.uniform(0.1, 0.7) / harmonic
            hum += weight * np.sin(2 * np.pi * harmonic * clip.hum_hz * t + rng.uniform(0, 2 * np.pi))
        audio += _at_level(hum, clip.hum_db)
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def write_no_speech(clip: NoSpeechClip, seed: int, out_dir: Path) -> int:
    """Render one clip into ``out_dir`` as FLAC; returns its number of samples."""
    sf.write(out_dir / clip.file_name, render_no_speech(clip, seed), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return clip.samples


def _check_target(target: Path, overwrite: bool) -> None:
    """Fail before any work if ``target`` holds something that only --overwrite may replace."""
    if (target / "metadata.csv").exists() and not overwrite:
        raise SynthError(f"{target} already holds a set (metadata.csv); remove it or pass --overwrite")
    if target.exists() and not target.is_dir():
        raise SynthError(f"{target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise SynthError(f"{target} exists and is not empty; remove it or pass --overwrite")


def _write_metadata(directory: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    with (directory / "metadata.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _gather(futures: list[Future], progress: Progress | None, unit: str) -> list:
    """Results in submission order (so the output does not depend on which worker finished first)."""
    results = []
    try:
        for done, future in enumerate(futures, 1):
            results.append(future.result())
            if progress is not None:
                progress(done, len(futures), unit)
    except BaseException:
        for future in futures:
            future.cancel()
        raise
    return results


def _staging_dir(root: Path, name: str) -> Path:
    # Not tempfile.mkdtemp: its 0700 mode would stay on the published set; mkdir follows the umask.
    staging = root / f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    return staging


def _publish(staging: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)  # _check_target let it through: empty, or --overwrite
    staging.rename(target)


def synthesize_long_form(
    root: Path,
    count: int,
    *,
    minutes: tuple[float, float],
    seed: int,
    jobs: int,
    progress: Progress | None,
    language: str = "en",
) -> int:
    """Write ``root/longform``; returns its total number of samples. Arguments are already checked."""
    espeak = find_espeak()
    staging = _staging_dir(root, LONG_DIR)
    try:
        plans = [plan_recording(index, seed, minutes, language) for index in range(count)]
        with tempfile.TemporaryDirectory(prefix="espeak-") as tmp, ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(synthesize_recording, espeak, plan, seed, staging, Path(tmp)) for plan in plans]
            rows: list[LongFormRow] = _gather(futures, progress, "long-form recordings")
        _write_metadata(
            staging,
            ("file_name", "sentence", "segments"),
            [(row.file_name, row.sentence, json.dumps(row.segments)) for row in rows],
        )
        _publish(staging, root / LONG_DIR)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sum(row.samples for row in rows)


def synthesize_no_speech(root: Path, count: int, *, seed: int, jobs: int, progress: Progress | None) -> int:
    """Write ``root/nospeech``; returns its total number of samples. Arguments are already checked."""
    staging = _staging_dir(root, NO_SPEECH_DIR)
    try:
        plans = [plan_no_speech(index, seed) for index in range(count)]
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(write_no_speech, plan, seed, staging) for plan in plans]
            samples: list[int] = _gather(futures, progress, "no-speech clips")
        _write_metadata(staging, ("file_name", "sentence", "no_speech"), [(p.file_name, "", "true") for p in plans])
        _publish(staging, root / NO_SPEECH_DIR)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sum(samples)


def synthesize_sets(
    out: str | Path,
    *,
    train: int = 400,
    dev: int = 100,
    long_form: int = 0,
    long_minutes: tuple[float, float] = LONG_MINUTES,
    no_speech: int = 0,
    seed: int = 0,
    jobs: int = 2,
    overwrite: bool = False,
    progress: Progress | None = None,
    language: str = "en",
) -> dict[str, int | float | str]:
    """The train/dev corpus (unless ``train`` and ``dev`` are both 0) and the long-form and no-speech sets.

    ``language`` is that of the train/dev sentences and of the long-form recordings.

    Without ``long_form`` or ``no_speech`` this is :func:`toolkit.synth.synthesize_corpus`, summary
    included. Otherwise every argument and output directory is checked before anything is written, and
    the summary adds ``long_form``/``long_form_hours`` and ``no_speech``/``no_speech_hours``.
    """
    low, high = long_minutes
    if not (0 < low <= high and math.isfinite(high)):
        raise SynthError(f"--long-minutes needs 0 < MIN <= MAX; got {low:g} {high:g}")
    if long_form < 0 or no_speech < 0:
        raise SynthError(f"--long-form and --no-speech must not be negative; got {long_form}, {no_speech}")
    get_language(language)
    if not (long_form or no_speech):
        return synthesize_corpus(
            out, train=train, dev=dev, seed=seed, jobs=jobs, overwrite=overwrite, progress=progress,
            language=language,
        )
    if (train, dev) != (0, 0) and (train < 1 or dev < 1):
        raise SynthError(
            f"--train and --dev must both be at least 1, or both 0 to write only the long-form/no-speech sets; "
            f"got train={train}, dev={dev}"
        )
    if jobs < 1:
        raise SynthError(f"--jobs must be at least 1; got {jobs}")
    if train or long_form:
        find_espeak()
    root = Path(out).expanduser()
    for name, count in ((LONG_DIR, long_form), (NO_SPEECH_DIR, no_speech)):
        if count:
            _check_target(root / name, overwrite)

    start = time.perf_counter()
    summary: dict[str, int | float | str] = {"out": str(root)}
    if train:
        summary = synthesize_corpus(
            root, train=train, dev=dev, seed=seed, jobs=jobs, overwrite=overwrite, progress=progress,
            language=language,
        )
    root.mkdir(parents=True, exist_ok=True)
    if long_form:
        samples = synthesize_long_form(
            root, long_form, minutes=(low, high), seed=seed, jobs=jobs, progress=progress, language=language
        )
        summary |= {"long_form": long_form, "long_form_hours": round(samples / SAMPLE_RATE / 3600, 4)}
    if no_speech:
        samples = synthesize_no_speech(root, no_speech, seed=seed, jobs=jobs, progress=progress)
        summary |= {"no_speech": no_speech, "no_speech_hours": round(samples / SAMPLE_RATE / 3600, 4)}
    return summary | {
        "language": language, "seed": seed, "jobs": jobs, "elapsed_s": round(time.perf_counter() - start, 1)
    }
