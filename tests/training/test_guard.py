"""The regression guard: extra eval sets at every evaluation, the score that ranks checkpoints, and
the stop when a guard metric rises past its margin."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import ROOT, launch, train_args
from toolkit.config import GuardSet, load_config
from toolkit.training.evals import guard_breach, score

GUARDS = [GuardSet("gen", "x", "general", weight=0.5, max_rise=3.0),
          GuardSet("quiet", "y", "no_speech", weight=10.0, max_rise=0.2), GuardSet("long", "z", "long_form")]


def test_score_weighs_each_guard_metric() -> None:
    metrics = {"wer": 20.0, "guard/gen/wer": 30.0, "guard/quiet/hallucination_rate": 0.25, "guard/long/wer": 50.0}
    assert score(metrics, GUARDS) == pytest.approx(20 + 0.5 * 30 + 10 * 0.25)
    assert score(metrics, []) == 20.0


def test_a_guard_breach_is_a_rise_past_max_rise_over_the_first_evaluation() -> None:
    first = {"step": 0, "wer": 20.0, "guard/gen/wer": 30.0, "guard/quiet/hallucination_rate": 0.1}
    assert guard_breach([first], GUARDS) is None
    held = {**first, "step": 10, "guard/gen/wer": 33.0, "guard/quiet/hallucination_rate": 0.3}
    assert guard_breach([first, held], GUARDS) is None  # exactly the margin is still within it
    worse = {**held, "step": 20, "guard/gen/wer": 33.5}
    assert guard_breach([first, held, worse], GUARDS) == (
        "guard gen: wer rose from 30.0 to 33.5 (more than max_rise 3.0) between steps 0 and 20"
    )
    noisy = {**first, "step": 20, "guard/quiet/hallucination_rate": 0.35}
    assert guard_breach([first, noisy], GUARDS).startswith("guard quiet: hallucination_rate rose from 0.1 to 0.35")


def write_guard_sets(root: Path, corpus: Path) -> tuple[Path, Path]:
    """A no-speech set (noise and silence) and a long-form set (two recordings of the corpus' clips)."""
    rng = np.random.default_rng(0)
    quiet = root / "quiet"
    quiet.mkdir(parents=True)
    rows = []
    for i in range(3):
        sf.write(quiet / f"n{i}.flac", (0.01 * i * rng.standard_normal(16_000 * (i + 1))).astype(np.float32), 16_000)
        rows.append({"file_name": f"n{i}.flac", "sentence": "", "no_speech": "true"})
    _write(quiet, rows)
    long = root / "long"
    long.mkdir()
    with (corpus / "dev" / "metadata.csv").open() as handle:
        clips = list(csv.DictReader(handle))
    rows = []
    for i in range(2):
        part = clips[i * 5 : i * 5 + 5]
        audio = [sf.read(corpus / "dev" / c["file_name"], dtype="float32")[0] for c in part]
        pause = np.zeros(16_000 * 7, dtype=np.float32)  # 5 clips x (1 s + 7 s): past one 30 s window
        sf.write(long / f"rec{i}.flac", np.concatenate([x for a in audio for x in (a, pause)]), 16_000)
        rows.append({"file_name": f"rec{i}.flac", "sentence": " ".join(c["sentence"] for c in part)})
    _write(long, rows)
    return quiet, long


def _write(folder: Path, rows: list[dict[str, str]]) -> None:
    with (folder / "metadata.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_guard_sets_are_evaluated_logged_and_ranked(tmp_path: Path, tiny_model: Path, corpus: Path) -> None:
    quiet, long = write_guard_sets(tmp_path / "sets", corpus)
    guard = (f"evaluation.guard=[{{name: gen, data: '{corpus / 'dev'}', weight: 0.5}}, "
             f"{{name: quiet, data: '{quiet}', kind: no_speech, weight: 10}}, {{name: long, data: '{long}', kind: long_form}}]")
    out = tmp_path / "run"
    result = launch(train_args(tiny_model, corpus, out, guard, "evaluation.every_steps=2", "output.final_model=best"),
                    processes=1)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if "eval/wer" in line]
    assert [line["step"] for line in evals] == [2, 4]
    for line in evals:
        assert {"eval/guard/gen/wer", "eval/guard/gen/insertion_rate", "eval/guard/gen/repetition_rate",
                "eval/guard/quiet/hallucination_rate", "eval/guard/quiet/insertion_rate", "eval/guard/long/wer",
                "eval/guard/long/windows", "eval/guard/long/windows_with_timestamps", "eval/score"} <= set(line)
        assert line["eval/guard/quiet/num_samples"] == 3 and line["eval/guard/long/num_samples"] == 2
        assert line["eval/guard/long/windows"] >= 4  # each 40 s recording takes at least two windows
        expected = line["eval/wer"] + 0.5 * line["eval/guard/gen/wer"] + 10 * line["eval/guard/quiet/hallucination_rate"]
        assert line["eval/score"] == pytest.approx(expected, abs=1e-3)
    results = json.loads((out / "results.json").read_text())
    best = min(evals, key=lambda line: line["eval/score"])
    assert results["best"]["step"] == best["step"] and results["stopped_by_guard"] is None
    assert "guard/quiet/hallucination_rate" in results["eval"]


@pytest.mark.usefixtures("fresh_accelerate")
def test_a_guard_breach_stops_the_run_with_a_final_model(
    tmp_path: Path, tiny_model: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from toolkit.training import loop

    calls: list[int] = []

    def breach(history: list[dict], guards: list[GuardSet]) -> str | None:
        calls.append(len(history))
        return "guard gen: wer rose" if len(history) == 2 else None

    monkeypatch.setattr(loop, "guard_breach", breach)
    out = tmp_path / "run"
    args = train_args(tiny_model, corpus, out, "evaluation.every_steps=1", "training.max_steps=6")
    run = loop.TrainingRun(load_config(ROOT / "recipes" / "demo.yaml", args[3:]))
    try:
        run.setup()
        results = run.run()
    finally:
        run.close()
    assert calls == [1, 2] and results["steps"] == 2
    assert results["stopped_by_guard"] == "guard gen: wer rose"
    assert (out / "final" / "model.safetensors").is_file()
    assert json.loads((out / "results.json").read_text())["stopped_by_guard"] == "guard gen: wer rose"


def test_the_starting_model_is_the_first_evaluation_the_guard_compares_with() -> None:
    from toolkit.training.checkpoint import TrainState

    state = TrainState(baseline_eval={"wer": 10.0, "guard/gen/wer": 30.0})
    assert state.record_eval(5, {"wer": 9.0, "score": 9.5, "guard/gen/wer": 34.0})
    assert state.evals_since_start() == [{"step": 0, "wer": 10.0, "guard/gen/wer": 30.0},
                                         {"step": 5, "wer": 9.0, "score": 9.5, "guard/gen/wer": 34.0}]
    assert (state.best_step, state.best_metric) == (5, 9.5)  # ranked by the score, not the main WER alone
    assert guard_breach(state.evals_since_start(), GUARDS).startswith("guard gen: wer rose from 30.0 to 34.0")
    assert TrainState().evals_since_start() == []
