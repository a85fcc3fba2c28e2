"""Guard signals on hand-made hypotheses: repeated n-grams, insertion rates, no-speech hallucinations."""

from __future__ import annotations

import pytest

from toolkit.evaluation.signals import (
    NoSpeechCounts,
    count_repeated,
    repeated_ngram,
    repetition_rate,
    share,
)
from toolkit.evaluation.wer import ErrorCounts, word_errors


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("the cat sat on the mat the cat sat on the mat the cat sat on the mat", True),  # a loop of six words
        ("no no no no no no", True),  # "no no no no" at 0, 1 and 2: overlapping occurrences count
        ("no no no no no", False),  # only twice
        ("a b c d a b c d", False),  # twice
        ("a b c d x a b c d y a b c d", True),  # three times, apart
        ("a b c a b c a b c", False),  # a 3-gram three times holds no 4-gram three times
        ("", False),
        ("one two three", False),  # shorter than one n-gram
    ],
)
def test_repeated_ngram(text: str, expected: bool) -> None:
    assert repeated_ngram(text.split()) is expected


def test_repeated_ngram_takes_other_sizes_and_refuses_nonsense() -> None:
    assert repeated_ngram(["a", "b", "c", "a", "b", "c", "a", "b", "c"], n=3)
    assert repeated_ngram(["a", "b", "a", "b"], n=2, times=2)
    assert not repeated_ngram(["a", "b", "a", "c"], n=2, times=2)
    for n, times in ((0, 3), (4, 1)):
        with pytest.raises(ValueError, match="needs n >= 1 and times >= 2"):
            repeated_ngram(["a"], n=n, times=times)


def test_repetition_rate_is_the_share_of_hypotheses_that_loop() -> None:
    hypotheses = ["thank you thank you thank you thank you", "a clean sentence", "", "la la la la la la la"]
    assert count_repeated(hypotheses) == 2
    assert repetition_rate(hypotheses) == 0.5
    assert repetition_rate([]) == 0.0


def test_insertion_rate_counts_inserted_words_per_reference_word() -> None:
    counts = word_errors(["the cat sat", "on the mat"], ["the the cat sat", "on the mat mat thank you"])
    assert (counts.insertions, counts.reference_length) == (4, 6)
    assert counts.insertion_rate == round(4 / 6, 6)
    assert word_errors(["a b"], ["a"]).insertion_rate == 0.0  # a deletion is no insertion
    with pytest.raises(ValueError, match="no-speech set"):
        _ = ErrorCounts().insertion_rate


def test_on_a_no_speech_set_every_output_word_is_a_hallucination() -> None:
    first = NoSpeechCounts.of(["", "thank you", ""])
    second = NoSpeechCounts.of(["you you you you you you", ""])
    total = first + second
    assert total == NoSpeechCounts(utterances=5, output_words=8, with_output=2, repeated=1)
    assert total.metrics() == {"insertion_rate": 1.6, "hallucination_rate": 0.4, "repetition_rate": 0.2,
                               "num_samples": 5}
    assert NoSpeechCounts(*total.as_list()) == total  # what a reduce across ranks carries
    assert NoSpeechCounts().metrics()["insertion_rate"] == 0.0  # an empty set has no failures
    assert share(1, 3) == 0.333333


def test_short_form_evaluation_reports_the_repetition_rate(tiny_model, corpus) -> None:
    from toolkit.config import DataConfig, ModelConfig
    from toolkit.data.collator import WhisperCollator
    from toolkit.data.pipeline import load_split
    from toolkit.evaluation.generate import GenerationSettings, evaluate_model
    from toolkit.evaluation.normalize import make_normalizer
    from toolkit.modeling import load_model

    loaded = load_model(ModelConfig(name_or_path=str(tiny_model)), dtype=None, device="cpu")
    split = load_split("eval", DataConfig(eval=str(corpus / "dev"), num_workers=0), tokenizer=None)
    collator = WhisperCollator(loaded.processor.feature_extractor, loaded.model.config.decoder_start_token_id)
    normalize = make_normalizer(loaded.english, loaded.processor.tokenizer)
    result = evaluate_model(loaded.model, split.dataset, collator, loaded.processor.tokenizer, normalize,
                            GenerationSettings(batch_size=5, max_new_tokens=12, collect_predictions=True))
    hypotheses = [normalize(row["prediction"]) for row in result.predictions]
    assert result.metrics["repetition_rate"] == share(count_repeated(hypotheses), 10)
