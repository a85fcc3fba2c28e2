"""WER over several eval sets: per set, per language and in total, each from summed error counts.

Each set is decoded on its own (in its own language, :class:`~toolkit.evaluation.generate.GenerationSettings`),
and every figure here is computed from the sets' error counts added up, never by averaging rates:
a 50-utterance set weighs what its reference words weigh, exactly as one set of all of them would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from toolkit.data.corpora import Prompt
from toolkit.evaluation.generate import EvalResult
from toolkit.evaluation.normalize import make_normalizer
from toolkit.evaluation.signals import share
from toolkit.evaluation.wer import CorpusCounts


@dataclass(frozen=True)
class SetResult:
    """One decoded eval set: its name, its language code (``fr``) and its result."""

    name: str
    language: str
    result: EvalResult


def _sum(results: Sequence[EvalResult]) -> tuple[CorpusCounts, int | None]:
    """The summed counts, and the repeated hypotheses (None unless every set counted them: long-form counts windows)."""
    total = CorpusCounts.zero()
    for result in results:
        if result.counts is None:
            raise ValueError("an eval result without its error counts cannot be summed")
        total = total + result.counts
    repeated = sum(int(r.repeated or 0) for r in results) if all(r.repeated is not None for r in results) else None
    return total, repeated


def _metrics(counts: CorpusCounts, repeated: int | None) -> dict[str, Any]:
    extra = {} if repeated is None else {"repetition_rate": share(repeated, counts.num_samples)}
    return {**counts.metrics(), **extra}


def combined_metrics(sets: Sequence[SetResult]) -> dict[str, Any]:
    """``wer`` etc. over all sets; ``NAME/KEY`` for each set's own metrics; ``lang/LANG/KEY`` per language."""
    total, repeated = _sum([s.result for s in sets])
    seconds = sum(float(s.result.metrics.get("seconds", 0.0)) for s in sets)
    metrics: dict[str, Any] = {**_metrics(total, repeated), "seconds": round(seconds, 3)}
    metrics["utterances_per_second"] = round(total.num_samples / seconds, 3) if seconds > 0 else None
    for s in sets:
        metrics.update({f"{s.name}/{key}": value for key, value in s.result.metrics.items()})
    for language in dict.fromkeys(s.language for s in sets):
        summed = _metrics(*_sum([s.result for s in sets if s.language == language]))
        metrics.update({f"lang/{language}/{key}": value for key, value in summed.items()})
    return metrics


def combined_result(sets: Sequence[SetResult]) -> EvalResult:
    """One result for the sets: the combined metrics, every set's predictions (with its name), the
    smallest batch size generation finished with, and every back-off."""
    total, repeated = _sum([s.result for s in sets])
    predictions = [{**row, "set": s.name} for s in sets for row in s.result.predictions]
    return EvalResult(
        combined_metrics(sets), predictions, batch_size=min(s.result.batch_size for s in sets),
        backoffs=[b for s in sets for b in s.result.backoffs], counts=total, repeated=repeated,
    )


SetDecoder = Callable[[Any, Prompt, Callable[[str], str]], EvalResult]
"""Decodes one set: (dataset, its prompt, its normaliser) -> its result."""


def evaluate_sets(sets: Sequence[tuple[str, Prompt, Any]], tokenizer: Any, decode: SetDecoder) -> EvalResult:
    """Decode each ``(name, prompt, dataset)`` set in its language, normalised as its language is
    (Whisper's English normaliser for English, the basic one otherwise), and combine the results."""
    results = []
    for name, prompt, dataset in sets:
        normalize = make_normalizer(prompt.code == "en", tokenizer)
        results.append(SetResult(name, prompt.code, decode(dataset, prompt, normalize)))
    return combined_result(results)
