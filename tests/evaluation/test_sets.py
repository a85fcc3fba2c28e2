"""Several eval sets: totals, per-set and per-language figures come from summed counts, never averaged rates."""

from __future__ import annotations

import pytest

from toolkit.config_sets import Corpus
from toolkit.evaluation.generate import EvalResult
from toolkit.evaluation.sets import SetResult, combined_metrics, combined_result
from toolkit.evaluation.wer import CorpusCounts


def _result(refs: list[str], hyps: list[str], repeated: int | None = 0, batch: int = 8) -> EvalResult:
    counts = CorpusCounts.zero()
    counts.add_batch(refs, hyps, str.lower)
    return EvalResult({**counts.metrics(), "seconds": 2.0}, [{"id": r, "prediction": h} for r, h in zip(refs, hyps, strict=True)],
                      batch_size=batch, counts=counts, repeated=repeated)


def test_totals_weigh_each_set_by_its_reference_words() -> None:
    long_en = _result(["a b c d e f g h i j"], ["a b c d e f g h i j"])  # 10 words, no error
    short_en = _result(["x y"], ["x z"], repeated=1)  # 2 words, 1 error
    french = _result(["le chat noir dort"], ["le chien noir"])  # 4 words, 2 errors
    metrics = combined_metrics([SetResult("long", "en", long_en), SetResult("short", "en", short_en),
                                SetResult("fr-dev", "fr", french)])
    assert metrics["wer"] == pytest.approx(100 * 3 / 16, abs=1e-4)  # not the mean of 0, 50 and 50
    assert metrics["num_samples"] == 3 and metrics["reference_words"] == 16
    assert metrics["short/wer"] == 50.0 and metrics["long/wer"] == 0.0 and metrics["fr-dev/wer"] == 50.0
    assert metrics["lang/en/wer"] == pytest.approx(100 * 1 / 12, abs=1e-4)
    assert metrics["lang/fr/wer"] == 50.0 and metrics["lang/fr/num_samples"] == 1
    assert metrics["repetition_rate"] == pytest.approx(1 / 3, abs=1e-6)
    assert metrics["seconds"] == 6.0


def test_combined_result_keeps_every_prediction_and_the_smallest_batch() -> None:
    a, b = _result(["one"], ["one"], batch=8), _result(["two"], ["too"], repeated=None, batch=4)
    a.backoffs = [{"from": 16, "to": 8}]
    combined = combined_result([SetResult("a", "en", a), SetResult("b", "de", b)])
    assert [p["set"] for p in combined.predictions] == ["a", "b"]
    assert combined.batch_size == 4 and combined.backoffs == [{"from": 16, "to": 8}]
    assert "repetition_rate" not in combined.metrics  # long-form sets count windows, not hypotheses
    assert combined.counts is not None and combined.counts.num_samples == 2


@pytest.mark.parametrize("path, label", [
    ("data/cv-fr/", "cv-fr"), ("org/set.csv", "set"), ("mozilla/common_voice:fr", "fr"), ("/x/.hidden", "_hidden"),
])
def test_a_corpus_is_named_after_its_path_unless_named(path: str, label: str) -> None:
    assert Corpus(path=path).label == label
    assert Corpus(path=path, name="mine").label == "mine"
