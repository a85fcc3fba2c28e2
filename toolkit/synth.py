"""Synthesise a small English speech corpus with ``espeak-ng``: no download, no Hub, fully seeded.

The corpus is written in ``audiofolder`` layout, which :mod:`toolkit.data.sources` reads directly::

    OUT/train/metadata.csv   file_name,sentence
    OUT/train/train-000000.flac ...   16 kHz mono FLAC
    OUT/dev/metadata.csv
    OUT/dev/dev-000000.flac ...

Sentences come from a built-in generator (word lists and templates, 5-15 words each). A sentence
belongs to ``train`` or ``dev`` by a hash of its normalised text, so the two splits can never share a
sentence, and the dev set for a seed does not depend on how many training sentences are asked for.
Each utterance gets a voice, a speed (130-190 words per minute) and a pitch (30-70) drawn from a
generator seeded by ``(seed, split, index)``: the corpus is the same whatever the number of jobs.

:mod:`toolkit.synth_long` adds two evaluation sets made from the same pieces: long-form recordings
(several dev-side sentences with pauses, and their segment times) and no-speech clips.

espeak-ng's speech is robotic; a fine-tuned model learns it quickly, which is what a demo needs, but
WER on this corpus says nothing about real speech.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import random
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from toolkit.data.sources import DataError

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
SPLITS = ("train", "dev")
DEV_BUCKETS = 5  # one normalised sentence in DEV_BUCKETS may go to dev, the others to train
MIN_WORDS, MAX_WORDS = 5, 15
SPEED_RANGE = (130, 190)  # words per minute
PITCH_RANGE = (30, 70)  # espeak-ng's 0-99 scale

# espeak-ng's own English voices (Debian's espeak-ng-data 1.51); the mbrola ones ("mb-...") need the
# separate mbrola package and are left out. A variant adds timbre: m* male, f* female formants.
VOICES = (
    "en-us",
    "en-gb",
    "en-gb-x-rp",
    "en-gb-scotland",
    "en-029",
    "en-us-nyc",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
)
VARIANTS = ("m1", "m2", "m3", "m4", "m7", "f1", "f2", "f3", "f4")

NAMES = (
    "Anna", "Peter", "Maria", "James", "Sofia", "David", "Laura", "Thomas", "Emma", "Daniel",
    "Olivia", "Samuel", "Grace", "Henry", "Lucy", "Oliver", "Hannah", "Jack", "Alice", "Robert",
)
PEOPLE = (
    "teacher", "doctor", "farmer", "driver", "baker", "student", "neighbour", "manager", "pilot", "nurse",
    "painter", "gardener", "singer", "writer", "engineer", "captain", "librarian", "old man", "young woman",
    "little boy",
)
ADJECTIVES = (
    "small", "big", "red", "green", "blue", "heavy", "quiet", "warm", "cold", "new", "broken", "wooden",
    "bright", "dusty", "strange", "lovely", "tiny", "yellow", "clean", "empty", "shiny", "soft", "old",
    "useful", "expensive", "simple",
)
THINGS = (
    "box", "letter", "bicycle", "kettle", "window", "book", "basket", "lamp", "chair", "map", "ticket",
    "jacket", "bottle", "garden", "picture", "clock", "umbrella", "blanket", "radio", "camera", "table",
    "bucket", "ladder", "envelope", "notebook", "candle", "guitar", "bridge", "boat", "key",
)
PAST_VERBS = (
    ("found", "find"), ("carried", "carry"), ("painted", "paint"), ("opened", "open"), ("cleaned", "clean"),
    ("bought", "buy"), ("sold", "sell"), ("fixed", "fix"), ("moved", "move"), ("washed", "wash"),
    ("borrowed", "borrow"), ("dropped", "drop"), ("lost", "lose"), ("brought", "bring"), ("checked", "check"),
    ("hid", "hide"), ("built", "build"), ("wrapped", "wrap"), ("returned", "return"), ("noticed", "notice"),
)
PLACES = (
    "in the kitchen", "near the river", "at the station", "behind the house", "in the garden",
    "on the bus", "at the market", "under the bridge", "in the library", "by the window",
    "at the office", "on the beach", "in the village", "at the harbour", "in the park",
    "next to the school", "on the top shelf", "in the hallway",
)
PAST_TIMES = (
    "yesterday", "last night", "this morning", "on Monday", "after lunch", "last summer",
    "a week ago", "before dinner", "early on Sunday", "late in the evening",
)
FUTURE_TIMES = (
    "tomorrow", "next week", "on Friday", "after the meeting", "before the holidays", "tonight",
    "in the spring", "later this afternoon",
)
STATES = ("warm", "wet", "open", "locked", "dirty", "missing", "cold", "full", "empty", "on the floor")
FEELINGS = ("happy", "surprised", "tired", "worried", "proud", "calm", "excited", "nervous")
WEATHER = (
    "it was raining", "the sun was shining", "the wind was strong", "it started to snow",
    "the sky was grey", "the streets were quiet",
)

TEMPLATES = (
    "{subj} {past} {obj} {place}.",
    "{Past_time}, {subj} {past} {obj}.",
    "{subj} {past} {obj} {place} {past_time}.",
    "Did {subj} really {base} {obj} {place}?",
    "{subj} will {base} {obj} {future_time}.",
    "Please {base} {obj} {future_time}.",
    "{subj} said that {subj2} {past} {obj}.",
    "Why did {subj} {base} {obj} {past_time}?",
    "{obj} was still {state} when {subj} came home.",
    "When {weather}, {subj} felt {feeling} and stayed {place}.",
    "{subj} was {feeling} because {subj2} {past} {obj}.",
    "I think {subj} left {obj} {place}.",
    "We asked {subj} to {base} {obj} {future_time}.",
    "Look, {subj} just {past} {obj}!",
    "{subj} never {past} {obj} again.",
)


class SynthError(DataError):
    """The corpus cannot be synthesised (espeak-ng missing or failing, bad arguments)."""


@dataclass(frozen=True)
class Utterance:
    """One clip to synthesise and how to say it."""

    split: str
    index: int
    sentence: str
    voice: str
    speed: int
    pitch: int

    @property
    def file_name(self) -> str:
        return f"{self.split}-{self.index:06d}.flac"


def find_espeak() -> str:
    """Path of the ``espeak-ng`` executable, or a :class:`SynthError` saying how to install it."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise SynthError(
            "espeak-ng is not installed (not found on PATH); install it with "
            "`apt-get install espeak-ng` (Debian/Ubuntu) and try again"
        )
    return path


def normalise(sentence: str) -> str:
    """Lower-case words only: two sentences that differ in case or punctuation count as the same."""
    return " ".join(re.findall(r"[a-z']+", sentence.lower()))


def split_of(sentence: str) -> str:
    """The split a sentence belongs to, fixed by a hash of its normalised text."""
    digest = hashlib.sha256(normalise(sentence).encode()).digest()
    return "dev" if digest[0] % DEV_BUCKETS == 0 else "train"


def _with_article(rng: random.Random, noun_phrase: str) -> str:
    article = rng.choice(("the", "a", "my", "our", "that", "his", "her"))
    if article == "a" and (noun_phrase[0] in "aeio" or noun_phrase.startswith(("um", "un"))):
        article = "an"
    return f"{article} {noun_phrase}"


def _subject(rng: random.Random) -> str:
    if rng.random() < 0.45:
        return rng.choice(NAMES)
    return f"{rng.choice(('the', 'my', 'our', 'a'))} {rng.choice(PEOPLE)}"


def _object(rng: random.Random) -> str:
    noun = rng.choice(THINGS)
    return _with_article(rng, f"{rng.choice(ADJECTIVES)} {noun}" if rng.random() < 0.7 else noun)


def random_sentence(rng: random.Random) -> str:
    """One sentence from a random template; capitalised, ending in punctuation."""
    template = rng.choice(TEMPLATES)
    past, base = rng.choice(PAST_VERBS)
    subj = _subject(rng)
    subj2 = _subject(rng)
    while subj2 == subj:
        subj2 = _subject(rng)
    past_time = rng.choice(PAST_TIMES)
    fields = {
        "subj": subj,
        "subj2": subj2,
        "obj": _object(rng),
        "past": past,
        "base": base,
        "place": rng.choice(PLACES),
        "past_time": past_time,
        "Past_time": past_time[0].upper() + past_time[1:],
        "future_time": rng.choice(FUTURE_TIMES),
        "state": rng.choice(STATES),
        "feeling": rng.choice(FEELINGS),
        "weather": rng.choice(WEATHER),
    }
    text = template.format(**fields)
    return text[0].upper() + text[1:]


def generate_sentences(count: int, *, seed: int = 0, split: str = "train") -> list[str]:
    """``count`` distinct sentences of ``split``, the same for the same ``seed`` (and for any larger count)."""
    if split not in SPLITS:
        raise SynthError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    rng = random.Random(f"whisper-toolkit-sentences:{seed}:{split}")
    sentences: list[str] = []
    seen: set[str] = set()
    attempts = 0
    max_attempts = 200 * count + 1000
    while len(sentences) < count:
        attempts += 1
        if attempts > max_attempts:
            raise SynthError(f"could only generate {len(sentences)} distinct {split} sentences of {count} asked for")
        sentence = random_sentence(rng)
        key = normalise(sentence)
        if key in seen or split_of(sentence) != split or not MIN_WORDS <= len(key.split()) <= MAX_WORDS:
            continue
        seen.add(key)
        sentences.append(sentence)
    return sentences


def plan_split(split: str, count: int, seed: int) -> list[Utterance]:
    """Sentences and voice settings for every clip of a split."""
    utterances = []
    for index, sentence in enumerate(generate_sentences(count, seed=seed, split=split)):
        rng = random.Random(f"whisper-toolkit-voice:{seed}:{split}:{index}")
        voice = f"{rng.choice(VOICES)}+{rng.choice(VARIANTS)}"
        utterances.append(
            Utterance(split, index, sentence, voice, rng.randint(*SPEED_RANGE), rng.randint(*PITCH_RANGE))
        )
    return utterances


def speak(espeak: str, text: str, *, voice: str, speed: int, pitch: int, wav: Path) -> np.ndarray:
    """``text`` spoken by espeak-ng as 16 kHz mono float32 in [-1, 1]; ``wav`` is a scratch file."""
    cmd = [espeak, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav)]
    # The text goes through stdin so that nothing in it can be taken for an option.
    result = subprocess.run(cmd, input=text, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not wav.is_file():
        raise SynthError(
            f"espeak-ng failed (exit {result.returncode}) on {text!r} with voice "
            f"{voice}: {result.stderr.strip() or 'no output file'}"
        )
    try:
        audio, rate = sf.read(wav, dtype="float32", always_2d=True)
    finally:
        wav.unlink(missing_ok=True)
    audio = audio.mean(axis=1)
    if audio.size == 0:
        raise SynthError(f"espeak-ng produced no audio for {text!r} (voice {voice})")
    if rate != SAMPLE_RATE:
        audio = soxr.resample(audio, rate, SAMPLE_RATE, quality="HQ")
    return np.clip(audio, -1.0, 1.0)


def synthesize_clip(espeak: str, utterance: Utterance, out_dir: Path, tmp_dir: Path) -> int:
    """Speak one utterance into ``out_dir`` as 16 kHz mono FLAC; returns its number of samples."""
    audio = speak(
        espeak,
        utterance.sentence,
        voice=utterance.voice,
        speed=utterance.speed,
        pitch=utterance.pitch,
        wav=tmp_dir / f"{utterance.split}-{utterance.index:06d}.wav",
    )
    sf.write(out_dir / utterance.file_name, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return int(audio.shape[0])


def _write_metadata(split_dir: Path, utterances: list[Utterance]) -> None:
    # Written last and renamed into place: a metadata.csv means the split is complete.
    tmp = split_dir / "metadata.csv.tmp"
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "sentence"])
        for utt in utterances:
            writer.writerow([utt.file_name, utt.sentence])
    tmp.replace(split_dir / "metadata.csv")


def synthesize_corpus(
    out: str | Path,
    *,
    train: int = 400,
    dev: int = 100,
    seed: int = 0,
    jobs: int = 2,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, int | float | str]:
    """Write ``out/train`` and ``out/dev`` audiofolders; returns counts and durations.

    ``jobs`` espeak-ng processes run at once. An existing split (one with a ``metadata.csv``) is an
    error unless ``overwrite``, which deletes the split directories first. ``progress(done, total)``
    is called after each clip.
    """
    if train < 1 or dev < 1:
        raise SynthError(f"--train and --dev must be at least 1; got train={train}, dev={dev}")
    if jobs < 1:
        raise SynthError(f"--jobs must be at least 1; got {jobs}")
    espeak = find_espeak()
    root = Path(out).expanduser()
    counts = {"train": train, "dev": dev}
    for split in SPLITS:
        split_dir = root / split
        if (split_dir / "metadata.csv").exists():
            if not overwrite:
                raise SynthError(f"{split_dir} already holds a corpus (metadata.csv); remove it or pass --overwrite")
            shutil.rmtree(split_dir)
        split_dir.mkdir(parents=True, exist_ok=True)

    plans = {split: plan_split(split, counts[split], seed) for split in SPLITS}
    work = [utt for split in SPLITS for utt in plans[split]]
    samples = dict.fromkeys(SPLITS, 0)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="espeak-") as tmp, ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(synthesize_clip, espeak, utt, root / utt.split, Path(tmp)) for utt in work]
        try:
            for done, (utt, future) in enumerate(zip(work, futures, strict=True), 1):
                samples[utt.split] += future.result()
                if progress is not None:
                    progress(done, len(work))
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    for split in SPLITS:
        _write_metadata(root / split, plans[split])
    seconds = {split: samples[split] / SAMPLE_RATE for split in SPLITS}
    return {
        "out": str(root),
        "train": train,
        "dev": dev,
        "train_hours": round(seconds["train"] / 3600, 4),
        "dev_hours": round(seconds["dev"] / 3600, 4),
        "hours": round(sum(seconds.values()) / 3600, 4),
        "seed": seed,
        "jobs": jobs,
        "elapsed_s": round(time.perf_counter() - start, 1),
    }
