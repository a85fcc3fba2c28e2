"""Recipe entries that each name one data set: a corpus of ``data.train``/``data.eval`` given as a
list, and a regression-guard set of ``evaluation.guard``. :mod:`toolkit.config` holds the sections
that list them; these are the list entries, each validated with the dotted key of its place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from toolkit.languages import check_whisper_language
from toolkit.recipe import ConfigError


def check_name(key: str, name: str) -> None:
    """A metric key's part: letters, digits, - and _ (it becomes ``eval/NAME/...`` or ``guard/NAME/...``)."""
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"{key} must be a non-empty name of letters, digits, - and _, got {name!r}")


@dataclass
class Corpus:
    """One of several corpora (``data.train`` or ``data.eval`` given as a list)."""

    path: str = ""
    """Any ``data.train`` form: an audiofolder, a manifest, a Hub id or a prepared directory."""
    weight: float = 1.0
    """Training: its share of the samples each step draws (the weights are normalised). Unused in ``data.eval``."""
    language: str | None = None
    """Its Whisper language (default ``model.language``): the language token of its labels, and the one
    its eval set is decoded with."""
    task: Literal["transcribe", "translate"] | None = None
    """Its Whisper task (default ``model.task``)."""
    name: str = ""
    """Its key in the eval metrics (``eval/NAME/wer``); default: the last part of ``path`` without its extension."""

    @property
    def label(self) -> str:
        """``name``, or one made from ``path`` (``data/cv-fr/`` -> ``cv-fr``, ``org/set.csv`` -> ``set``)."""
        if self.name:
            return self.name
        last = self.path.rstrip("/").rsplit("/", 1)[-1].split(":", 1)[-1]
        stem = last.rsplit(".", 1)[0] if "." in last[1:] else last
        return "".join(c if c.isalnum() or c in "-_" else "_" for c in stem) or "corpus"

    def validate(self, key: str) -> None:
        if not self.path or self.weight <= 0:
            raise ConfigError(f"{key} needs a path and a weight > 0, got {self.path!r} and {self.weight}")
        if self.language is not None:
            check_whisper_language(self.language, None, key=f"{key}.language")
        if self.name:
            check_name(f"{key}.name", self.name)


def check_corpora(key: str, corpora: list[Corpus], *, named: bool) -> None:
    """Each entry of ``key``'s list; ``named``: their names must differ too (they key the eval metrics)."""
    if not corpora:
        raise ConfigError(f"{key} is an empty list; give at least one {{path: ...}} entry")
    for i, corpus in enumerate(corpora):
        corpus.validate(f"{key}[{i}]")
    labels = [c.label for c in corpora]
    if named and len(set(labels)) != len(labels):
        raise ConfigError(f"{key}: corpus names must differ, got {', '.join(labels)}; set each entry's name")


@dataclass
class GuardSet:
    """An extra eval set run at every evaluation beside ``data.eval`` (``evaluation.guard``): it
    measures what fine-tuning breaks."""

    name: str = ""
    """Its key in metrics.jsonl, TensorBoard and results.json (``guard/NAME/...``)."""
    data: str = ""
    """An audiofolder, manifest or Hub dataset id."""
    kind: Literal["general", "no_speech", "long_form"] = "general"
    """``general``: held-out speech, where a WER rise measures forgetting; ``no_speech``: silence and
    noise, where any output word is a hallucination; ``long_form``: recordings of any length,
    transcribed with sequential long-form decoding."""
    weight: float = 0.0
    """Weight of its metric in the score that ``output.final_model: best`` ranks checkpoints by: the
    main WER plus the sum of weight x metric over the guard sets."""
    max_rise: float | None = None
    """Stop training (with a final checkpoint) when its metric rises more than this above the first
    evaluation (the starting model's with ``evaluation.at_start``): in WER points for ``general`` and
    ``long_form`` sets, in the hallucination rate (the share of clips with any output word, 0 to 1)
    for ``no_speech`` sets."""

    def validate(self, key: str) -> None:
        check_name(f"{key}.name", self.name)
        if not self.data:
            raise ConfigError(f"{key}.data is required (an audiofolder, manifest or Hub dataset id)")
        if self.weight < 0:
            raise ConfigError(f"{key}.weight must be >= 0, got {self.weight}")
        if self.max_rise is not None and self.max_rise < 0:
            raise ConfigError(f"{key}.max_rise must be >= 0, got {self.max_rise}")
