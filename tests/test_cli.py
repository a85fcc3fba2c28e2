"""The command line's own behaviour (the commands themselves are tested where they live)."""

from __future__ import annotations

from pathlib import Path

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
    assert (args.quantization, args.language) == (model.quantization, model.language)
    assert args.task is None  # the checkpoint's task, else ModelConfig's (toolkit.evaluation.run.evaluation_prompt)


def test_evaluate_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    evaluation = EvaluationConfig()
    assert f"(default: {evaluation.batch_size})" in text
    assert f"(default: {evaluation.max_new_tokens})" in text
    assert "{transcribe,translate}" in text and "{none,int8,nf4}" in text


def test_train_refuses_a_missing_model_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.conftest import train_args
    from toolkit.cli import EXIT_DATA, main

    out = tmp_path / "run"
    assert main(train_args(tmp_path / "no-model", tmp_path / "corpus", out)) == EXIT_DATA
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: no such model directory: {tmp_path / 'no-model'}"
    assert not out.exists()


def test_evaluate_checks_its_paths_before_loading(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from toolkit.cli import EXIT_CONFIG, EXIT_DATA, main

    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["evaluate", "--model", str(tmp_path / "none"), "--data", "d"]) == EXIT_DATA
    assert main(["evaluate", "--model", str(tiny_model), "--data", "d", "--predictions", str(a_file / "p.jsonl")]) == EXIT_CONFIG
    assert main(["evaluate", "--model", str(tiny_model), "--data", "d", "--predictions", str(tmp_path)]) == EXIT_CONFIG
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: no such model directory: {tmp_path / 'none'}",
        f"config error: --predictions: {a_file} is a file, not a directory",
        f"config error: --predictions: {tmp_path} is a directory; give a file name",
    ]


def test_synth_and_bench_check_their_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from toolkit.cli import EXIT_CONFIG, EXIT_DATA, main

    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["synth", "--out", str(a_file / "corpus"), "--train", "1", "--dev", "1"]) == EXIT_CONFIG
    assert main(["bench", "features", "--data", "d", "--model", str(tmp_path / "none")]) == EXIT_DATA
    assert capsys.readouterr().err.strip().splitlines() == [
        f"config error: --out: {a_file / 'corpus'} lies under {a_file}, which is a file",
        f"error: no such model directory: {tmp_path / 'none'}",
    ]


def test_main_returns_in_process_even_with_a_launcher_world_size(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only a rank that joined a process group of several leaves with os._exit; this must return.
    from toolkit.distributed import leave

    monkeypatch.setenv("WORLD_SIZE", "3")
    assert leave(2) == 2
