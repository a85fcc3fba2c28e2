"""The command line's own behaviour (the commands themselves are tested where they live)."""

from __future__ import annotations

import pytest

from toolkit.cli import build_parser
from toolkit.config import DataConfig, EvaluationConfig, ModelConfig


def test_evaluate_defaults_are_the_configs() -> None:
    """A recipe and ``evaluate`` cannot drift apart: the options default to the dataclasses' values."""
    args = build_parser().parse_args(["evaluate", "--model", "m", "--data", "d"])
    model, data, evaluation = ModelConfig(), DataConfig(), EvaluationConfig()
    assert (args.batch_size, args.max_new_tokens, args.num_beams) == (
        evaluation.batch_size, evaluation.max_new_tokens, evaluation.num_beams
    )
    assert (args.split, args.text_column, args.audio_column, args.num_workers, args.cache_dir) == (
        data.eval_split, data.text_column, data.audio_column, data.num_workers, data.cache_dir
    )
    assert (args.task, args.quantization, args.language) == (model.task, model.quantization, model.language)


def test_evaluate_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    evaluation = EvaluationConfig()
    assert f"(default: {evaluation.batch_size})" in text
    assert f"(default: {evaluation.max_new_tokens})" in text
    assert "{transcribe,translate}" in text and "{none,int8,nf4}" in text
