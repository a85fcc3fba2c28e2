"""The training run's evaluations: the main eval set and the regression guard (``evaluation.guard``).

At every evaluation the main set (``data.eval``, short- or long-form) is transcribed, then each guard
set. ``data.eval`` as a list of sets is decoded set by set, each in its own language and with its own
normaliser, and reported in total, per set and per language (:mod:`toolkit.evaluation.sets`).
A guard set reports, under ``guard/NAME/``:

* ``general`` (held-out speech: forgetting): ``wer``, ``insertion_rate``, ``repetition_rate``;
* ``no_speech`` (silence and noise: hallucination): ``hallucination_rate`` (share of clips with any
  output word), ``insertion_rate`` (output words per clip), ``repetition_rate``;
* ``long_form`` (whole recordings): ``wer``, ``insertion_rate``, ``repetition_rate`` (per window),
  ``windows``, ``windows_without_timestamps`` and ``windows_with_timestamps`` (its complement).

``score`` = main WER + sum of weight x the guard set's metric (:data:`GUARD_METRIC`) is what
``output.final_model: best`` ranks checkpoints by. :func:`guard_breach` is the optional stop: a guard
metric that rose more than its ``max_rise`` above the run's first evaluation.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from toolkit.config import GuardSet, RunConfig
from toolkit.data.collator import WhisperCollator
from toolkit.data.corpora import Prompt, corpus_prompt, prompting
from toolkit.data.dataset import SpeechDataset
from toolkit.data.pipeline import LoadedSplit, load_split
from toolkit.data.sources import Source
from toolkit.evaluation.generate import EvalResult, GenerationSettings, evaluate_model
from toolkit.evaluation.longform import LONG_FORM_MAX_SECONDS, LongFormSettings, evaluate_long_form
from toolkit.evaluation.sets import evaluate_sets
from toolkit.evaluation.signals import NoSpeechCounts

logger = logging.getLogger(__name__)

GUARD_METRIC = {"general": "wer", "long_form": "wer", "no_speech": "hallucination_rate"}
"""The metric of each kind of guard set that the score weighs and ``max_rise`` watches."""
REPORTED = {
    "general": ("wer", "insertion_rate", "repetition_rate", "num_samples"),
    "no_speech": ("hallucination_rate", "insertion_rate", "repetition_rate", "num_samples"),
    "long_form": ("wer", "insertion_rate", "repetition_rate", "windows", "windows_without_timestamps",
                  "windows_with_timestamps", "num_samples"),
}


@dataclass(frozen=True)
class EvalSet:
    """One ``data.eval`` set: its name (empty for a single ``data.eval``), its prompt and its data."""

    name: str
    prompt: Prompt | None
    """How it is decoded; None: as the model's generation config says (a single ``data.eval``)."""
    split: LoadedSplit


def load_eval_sets(config: RunConfig, tokenizer: Any, english_only: bool, sources: Source | list[Source]) -> list[EvalSet]:
    """``data.eval``: clips (references too long to decode dropped), or whole recordings
    (``evaluation.long_form``); a list of sets each with its language and task tokens."""
    if not isinstance(config.data.eval, list):
        return [EvalSet("", None, _load_eval(config, tokenizer, config.data.eval, sources))]  # type: ignore[arg-type]
    sets = []
    for i, (corpus, source) in enumerate(zip(config.data.eval, sources, strict=True)):  # type: ignore[arg-type]
        prompt = corpus_prompt(corpus, config.model, english_only, f"data.eval[{i}]")
        with prompting(tokenizer, prompt):
            sets.append(EvalSet(corpus.label, prompt, _load_eval(config, tokenizer, corpus.path, source)))
    return sets


def _load_eval(config: RunConfig, tokenizer: Any, path: str, source: Source) -> LoadedSplit:
    data = dataclasses.replace(config.data, eval=path)
    if config.evaluation.long_form:
        return load_split("eval", dataclasses.replace(data, max_duration_s=LONG_FORM_MAX_SECONDS), None, source)
    return load_split("eval", data, tokenizer, source)


def load_guard_split(config: RunConfig, guard: GuardSet, tokenizer: Any) -> LoadedSplit:
    """A guard set's data, as the main eval set's is loaded (long-form: whole recordings, no label filter)."""
    data = dataclasses.replace(config.data, eval=guard.data)
    if guard.kind == "long_form":
        return load_split("eval", dataclasses.replace(data, max_duration_s=LONG_FORM_MAX_SECONDS), None)
    return load_split("eval", data, tokenizer)


@dataclass
class Evaluator:
    """Runs one evaluation of the main and guard sets on a model (every rank gets the same metrics)."""

    config: RunConfig
    collator: WhisperCollator
    feature_extractor: Any
    tokenizer: Any
    normalize: Callable[[str], str]
    main: list[EvalSet]
    guards: list[tuple[GuardSet, SpeechDataset]]

    def run(self, model: Any, short: GenerationSettings) -> tuple[dict[str, Any], EvalResult | None]:
        """(metrics, the main sets' result) for ``model``; ``short`` is how short-form sets are decoded."""
        metrics: dict[str, Any] = {}
        result = self.main_result(model, short) if self.main else None
        if result is not None:
            metrics.update(result.metrics)
        for guard, dataset in self.guards:
            values = self.guard_metrics(model, guard, dataset, short)
            metrics.update({f"guard/{guard.name}/{key}": values[key] for key in REPORTED[guard.kind] if key in values})
        if "wer" in metrics:
            metrics["score"] = round(score(metrics, [g for g, _ in self.guards]), 4)
        return metrics, result

    def main_result(self, model: Any, short: GenerationSettings) -> EvalResult:
        """A single ``data.eval``'s result, or the sets' combined one (each decoded in its language)."""
        if len(self.main) == 1 and self.main[0].prompt is None:
            return self._transcribe(model, self.main[0].split.dataset, self.config.evaluation.long_form, short)
        sets = [(s.name, s.prompt, s.split.dataset) for s in self.main]
        return evaluate_sets(sets, self.tokenizer, partial(self._decode_set, model, short))  # type: ignore[arg-type]

    def _decode_set(self, model: Any, short: GenerationSettings, dataset: SpeechDataset, prompt: Prompt,
                    normalize: Callable[[str], str]) -> EvalResult:
        settings = dataclasses.replace(short, language=prompt.language, task=prompt.task)
        return self._transcribe(model, dataset, self.config.evaluation.long_form, settings, normalize)

    def guard_metrics(self, model: Any, guard: GuardSet, dataset: SpeechDataset,
                      short: GenerationSettings) -> dict[str, Any]:
        if guard.kind == "no_speech":
            result = evaluate_model(model, dataset, self.collator, self.tokenizer, self.normalize,
                                    dataclasses.replace(short, collect_predictions=True))
            hypotheses = [self.normalize(p["prediction"]) for p in result.predictions]
            return NoSpeechCounts.of(hypotheses).metrics()
        values = dict(self._transcribe(model, dataset, guard.kind == "long_form", short).metrics)
        if guard.kind == "long_form":
            values["windows_with_timestamps"] = round(1 - values["windows_without_timestamps"], 6)
        return values

    def _transcribe(self, model: Any, dataset: SpeechDataset, long_form: bool, short: GenerationSettings,
                    normalize: Callable[[str], str] | None = None) -> EvalResult:
        normalize = normalize or self.normalize
        if long_form:
            settings = LongFormSettings.from_config(
                self.config.evaluation, batch_size=short.batch_size, num_workers=short.num_workers,
                autocast=short.autocast, language=short.language, task=short.task,
            )
            return evaluate_long_form(model, dataset, self.feature_extractor, self.tokenizer, normalize, settings)
        return evaluate_model(model, dataset, self.collator, self.tokenizer, normalize, short)


def score(metrics: dict[str, Any], guards: list[GuardSet]) -> float:
    """Main WER plus each guard set's weighted metric: lower is better."""
    total = float(metrics["wer"])
    for guard in guards:
        if guard.weight:
            total += guard.weight * float(metrics[f"guard/{guard.name}/{GUARD_METRIC[guard.kind]}"])
    return total


def guard_breach(history: list[dict[str, Any]], guards: list[GuardSet]) -> str | None:
    """Why the run should stop: the first guard metric that rose more than its ``max_rise`` between
    the first evaluation in ``history`` and the last; None when every guard holds."""
    if len(history) < 2:
        return None
    first, last = history[0], history[-1]
    for guard in guards:
        key = f"guard/{guard.name}/{GUARD_METRIC[guard.kind]}"
        if guard.max_rise is None or key not in first or key not in last:
            continue
        rise = float(last[key]) - float(first[key])
        if rise > guard.max_rise:
            return (f"guard {guard.name}: {GUARD_METRIC[guard.kind]} rose from {first[key]} to {last[key]} "
                    f"(more than max_rise {guard.max_rise}) between steps {first.get('step')} and {last.get('step')}")
    return None
