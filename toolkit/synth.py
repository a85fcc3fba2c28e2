"""Synthesise a small speech corpus (English or French) with ``espeak-ng``: no download, no Hub, fully seeded.

The corpus is written in ``audiofolder`` layout, which :mod:`toolkit.data.sources` reads directly::

    OUT/train/metadata.csv   file_name,sentence
    OUT/train/train-000000.flac ...   16 kHz mono FLAC
    OUT/dev/metadata.csv
    OUT/dev/dev-000000.flac ...

Sentences come from a built-in generator per language (word lists and templates, 5-15 words each;
see :mod:`toolkit.synth_words`, which also lists each language's espeak-ng voices). A sentence
belongs to ``train`` or ``dev`` by a hash of its normalised text, so the two splits can never share a
sentence, and the dev set for a seed does not depend on how many training sentences are asked for.
Each utterance gets a voice, a speed (130-190 words per minute) and a pitch (30-70) drawn from a
generator seeded by ``(seed, split, index)``: the corpus is the same whatever the number of jobs.
Every seed string of a language other than English also names the language, so an English and a
French corpus with the same seed do not share speeds and pitches; English keeps its original seeds.

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
from toolkit.synth_words import LANGUAGES, Language

logger = logging.getLogger(__name__)

_WORD = re.compile(r"(?:[^\W\d_]|')+")

SAMPLE_RATE = 16_000
SPLITS = ("train", "dev")
DEV_BUCKETS = 5  # one normalised sentence in DEV_BUCKETS may go to dev, the others to train
MIN_WORDS, MAX_WORDS = 5, 15
SPEED_RANGE = (130, 190)  # words per minute
PITCH_RANGE = (30, 70)  # espeak-ng's 0-99 scale

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
    """Lower-case words only: two sentences that differ in case or punctuation count as the same.

    A word is a run of letters (accented ones too) and apostrophes; on ASCII text without digits this
    is the ``[a-z']+`` of the English-only version, so English splits are unchanged.
    """
    return " ".join(_WORD.findall(sentence.lower()))


def split_of(sentence: str) -> str:
    """The split a sentence belongs to, fixed by a hash of its normalised text."""
    digest = hashlib.sha256(normalise(sentence).encode()).digest()
    return "dev" if digest[0] % DEV_BUCKETS == 0 else "train"


def get_language(code: str) -> Language:
    """The :class:`~toolkit.synth_words.Language` for a code, or a :class:`SynthError` naming the choices."""
    try:
        return LANGUAGES[code]
    except KeyError:
        raise SynthError(f"--language must be one of {', '.join(LANGUAGES)}; got {code!r}") from None


def random_sentence(rng: random.Random, language: str = "en") -> str:
    """One sentence of ``language`` from a random template; capitalised, ending in punctuation."""
    return get_language(language).sentence(rng)


def generate_sentences(count: int, *, seed: int = 0, split: str = "train", language: str = "en") -> list[str]:
    """``count`` distinct ``language`` sentences of ``split``, the same for the same ``seed`` (and any larger count)."""
    if split not in SPLITS:
        raise SynthError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    lang = get_language(language)
    rng = random.Random(f"whisper-toolkit-sentences:{lang.seed_tag}{seed}:{split}")
    sentences: list[str] = []
    seen: set[str] = set()
    attempts = 0
    max_attempts = 200 * count + 1000
    while len(sentences) < count:
        attempts += 1
        if attempts > max_attempts:
            raise SynthError(f"could only generate {len(sentences)} distinct {split} sentences of {count} asked for")
        sentence = lang.sentence(rng)
        key = normalise(sentence)
        if key in seen or split_of(sentence) != split or not MIN_WORDS <= len(key.split()) <= MAX_WORDS:
            continue
        seen.add(key)
        sentences.append(sentence)
    return sentences


def plan_split(split: str, count: int, seed: int, language: str = "en") -> list[Utterance]:
    """Sentences and voice settings for every clip of a split."""
    lang = get_language(language)
    utterances = []
    for index, sentence in enumerate(generate_sentences(count, seed=seed, split=split, language=language)):
        rng = random.Random(f"whisper-toolkit-voice:{lang.seed_tag}{seed}:{split}:{index}")
        voice = f"{rng.choice(lang.voices)}+{rng.choice(lang.variants)}"
        utterances.append(
            Utterance(split, index, sentence, voice, rng.randint(*SPEED_RANGE), rng.randint(*PITCH_RANGE))
        )
    return utterances


def speak(espeak: str, text: str, *, voice: str, speed: int, pitch: int, wav: Path) -> np.ndarray:
    """``text`` spoken by espeak-ng as 16 kHz mono float32 in [-1, 1]; ``wav`` is a scratch file."""
    cmd = [espeak, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav)]
    # The text goes through stdin so that nothing in it can be taken for an option; as UTF-8 whatever
    # the locale, which espeak-ng reads by default.
    result = subprocess.run(cmd, input=text, capture_output=True, encoding="utf-8", errors="replace", check=False)
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
    language: str = "en",
) -> dict[str, int | float | str]:
    """Write ``out/train`` and ``out/dev`` audiofolders of ``language`` speech; returns counts and durations.

    ``jobs`` espeak-ng processes run at once. An existing split (one with a ``metadata.csv``) is an
    error unless ``overwrite``, which deletes the split directories first. ``progress(done, total)``
    is called after each clip.
    """
    if train < 1 or dev < 1:
        raise SynthError(f"--train and --dev must be at least 1; got train={train}, dev={dev}")
    if jobs < 1:
        raise SynthError(f"--jobs must be at least 1; got {jobs}")
    get_language(language)
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

    plans = {split: plan_split(split, counts[split], seed, language) for split in SPLITS}
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
        "language": language,
        "seed": seed,
        "jobs": jobs,
        "elapsed_s": round(time.perf_counter() - start, 1),
    }
