"""The training run's evaluations: the main eval set and the regression guard (``evaluation.guard``).

At every evaluation the main set (``data.eval``, short- or long-form) is transcribed, then each guard
set. A guard set reports, under ``guard/NAME/``:

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
from typing import Any

from toolkit.config import GuardSet, RunConfig
from toolkit.data.collator import WhisperCollator
from toolkit.data.dataset import SpeechDataset
from toolkit.data.pipeline import LoadedSplit, load_split
from toolkit.data.sources import Source
from toolkit.evaluation.generate import EvalResult, GenerationSettings, evaluate_model
from toolkit.evaluation.longform import LONG_FORM_MAX_SECONDS, LongFormSettings, evaluate_long_form
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


def load_eval_split(config: RunConfig, tokenizer: Any, source: Source) -> LoadedSplit:
    """``data.eval``: clips (references too long to decode dropped), or whole recordings (``evaluation.long_form``)."""
    if config.evaluation.long_form:
        return load_split("eval", dataclasses.replace(config.data, max_duration_s=LONG_FORM_MAX_SECONDS), None, source)
    return load_split("eval", config.data, tokenizer, source)


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
    main: SpeechDataset | None
    guards: list[tuple[GuardSet, SpeechDataset]]

    def run(self, model: Any, short: GenerationSettings) -> tuple[dict[str, Any], EvalResult | None]:
        """(metrics, the main set's result) for ``model``; ``short`` is how short-form sets are decoded."""
        metrics: dict[str, Any] = {}
        result = None
        if self.main is not None:
            result = self._transcribe(model, self.main, self.config.evaluation.long_form, short)
            metrics.update(result.metrics)
        for guard, dataset in self.guards:
            values = self.guard_metrics(model, guard, dataset, short)
            metrics.update({f"guard/{guard.name}/{key}": values[key] for key in REPORTED[guard.kind] if key in values})
        if "wer" in metrics:
            metrics["score"] = round(score(metrics, [g for g, _ in self.guards]), 4)
        return metrics, result

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

    def _transcribe(self, model: Any, dataset: SpeechDataset, long_form: bool, short: GenerationSettings) -> EvalResult:
        if long_form:
            settings = LongFormSettings.from_config(
                self.config.evaluation, batch_size=short.batch_size, num_workers=short.num_workers, autocast=short.autocast,
            )
            return evaluate_long_form(model, dataset, self.feature_extractor, self.tokenizer, self.normalize, settings)
        return evaluate_model(model, dataset, self.collator, self.tokenizer, self.normalize, short)


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
