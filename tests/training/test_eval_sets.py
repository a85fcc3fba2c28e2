"""``data.eval`` as a list of sets: each decoded in its own language, reported per set, per language and in total."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, write_audiofolder
from toolkit.config import load_config
from toolkit.data.sources import DataError
from toolkit.training.loop import TrainingRun

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def _config(model: Path, tmp_path: Path, evals: str, *overrides: str):  # noqa: ANN202
    train = write_audiofolder(tmp_path / "train", 4)
    values = [f"model.name_or_path={model}", "model.language=en", f"data.train={train}", f"data.eval={evals}",
              "data.num_workers=0", "training.max_steps=1", "training.global_batch_size=4", "evaluation.batch_size=2",
              "evaluation.max_new_tokens=6", f"output.dir={tmp_path / 'run'}", *overrides]
    return load_config(ROOT / "recipes" / "demo.yaml", values)


class LanguageRecorder:
    """Wraps ``model.generate`` to record the language of each call's generation config."""

    def __init__(self, model: Any):
        self.generate, self.seen = model.generate, []
        model.generate = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.seen.append(kwargs["generation_config"].language)
        return self.generate(*args, **kwargs)


def _two_sets(tmp_path: Path) -> str:
    english = write_audiofolder(tmp_path / "en-dev", 3, start_seed=20)
    french = write_audiofolder(tmp_path / "fr" / "dev", 2, start_seed=40)
    return f"[{{path: {english}, language: en}}, {{path: {french}, language: fr, name: fr-dev}}]"


def test_each_set_is_decoded_in_its_language_and_the_total_sums_counts(tiny_multilingual_model: Path,
                                                                         tmp_path: Path) -> None:
    run = TrainingRun(_config(tiny_multilingual_model, tmp_path, _two_sets(tmp_path)))
    run.setup()
    assert [s.name for s in run.data.evals] == ["en-dev", "fr-dev"]
    model = run.accelerator.unwrap_model(run.step.model)
    languages = LanguageRecorder(model)
    metrics = run.evaluate()
    # 3 English clips in 2 batches, then 2 French clips in 1.
    assert languages.seen == ["english", "english", "french"]
    assert metrics["en-dev/num_samples"] == 3 and metrics["fr-dev/num_samples"] == 2 and metrics["num_samples"] == 5
    assert metrics["lang/en/num_samples"] == 3 and metrics["lang/fr/num_samples"] == 2
    words = {name: metrics[f"{name}/reference_words"] for name in ("en-dev", "fr-dev")}
    errors = sum(metrics[f"{name}/wer"] * words[name] for name in words)
    assert metrics["wer"] == pytest.approx(errors / sum(words.values()), abs=1e-3)
    assert metrics["lang/fr/wer"] == metrics["fr-dev/wer"]
    assert model.generation_config.language == "english"  # each set's language lives in a copy


def test_long_form_sets_are_each_decoded_in_their_language(tiny_multilingual_model: Path, tmp_path: Path) -> None:
    run = TrainingRun(_config(tiny_multilingual_model, tmp_path, _two_sets(tmp_path), "evaluation.long_form=true"))
    run.setup()
    model = run.accelerator.unwrap_model(run.step.model)
    languages = LanguageRecorder(model)
    metrics = run.evaluate()
    assert languages.seen == ["english", "english", "french"]
    assert (metrics["num_samples"], metrics["lang/en/num_samples"], metrics["lang/fr/num_samples"]) == (5, 3, 2)
    assert metrics["fr-dev/windows"] == 2 and "repetition_rate" not in metrics  # long-form counts windows


def test_an_english_only_checkpoint_refuses_a_french_eval_set(tiny_model: Path, tmp_path: Path) -> None:
    config = _config(tiny_model, tmp_path, _two_sets(tmp_path), "model.language=null")
    with pytest.raises(DataError, match=r"data.eval\[1\]: .* is English-only; a corpus in 'fr'"):
        TrainingRun(config).setup()
