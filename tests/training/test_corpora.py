"""Several corpora: language and task tokens per sample, weights, packing within a corpus, refusals."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import ROOT, write_audiofolder
from toolkit.config import ConfigError, load_config
from toolkit.data.loader import TimedBatches
from toolkit.data.sources import DataError
from toolkit.training.loop import TrainingRun

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def _config(model: Path, tmp_path: Path, *overrides: str):  # noqa: ANN202
    english = write_audiofolder(tmp_path / "en", 12)
    french = write_audiofolder(tmp_path / "fr", 6, start_seed=50)
    train = f"[{{path: {english}, weight: 0.7, language: en}}, {{path: {french}, weight: 0.3, language: fr}}]"
    values = [f"model.name_or_path={model}", "model.language=en", f"data.train={train}", "data.eval=null",
              "data.num_workers=0", "training.max_steps=2", "training.global_batch_size=8",
              "training.micro_batch_size=4", "training.save_every=0", "evaluation.at_start=false",
              f"output.dir={tmp_path / 'run'}", *overrides]
    return load_config(ROOT / "recipes" / "demo.yaml", values)


def corpus_samples(run: TrainingRun, languages: tuple[str, ...], steps: int = 30) -> Iterator[tuple[int, Any]]:
    """(corpus, example) for every sample of the first ``steps`` steps of a run on several corpora,
    checked on the way: a packed window never mixes corpora, and the label's language token (after
    any previous-text prompt) is its corpus's."""
    tokenizer = run.loaded.processor.tokenizer
    lang = [tokenizer.convert_tokens_to_ids(f"<|{code}|>") for code in languages]
    corpus_of = np.repeat(np.arange(len(languages)), run.data.mix.sizes)
    for step in range(steps):
        for item in run.sampler.step_items(step, run.plan):
            rows = item.unit if isinstance(item.unit, tuple) else (item.unit,)
            corpus = int(corpus_of[rows[0]])
            assert all(corpus_of[r] == corpus for r in rows)  # a window never mixes corpora
            example = run.data.train.dataset[item]
            assert example.labels[example.prompt_length + 1] == lang[corpus], example.labels[:6]
            yield corpus, example


@pytest.mark.parametrize("packing", ["false", "true"])
def test_each_sample_carries_its_corpus_language(tiny_multilingual_model: Path, tmp_path: Path, packing: str) -> None:
    run = TrainingRun(_config(tiny_multilingual_model, tmp_path, f"data.packing={packing}"))
    run.setup()
    assert len(run.data.train.dataset) == 18 and run.data.mix.sizes == [12, 6]
    seen = [0, 0]
    for corpus, _ in corpus_samples(run, ("en", "fr")):
        seen[corpus] += 1
    assert seen[0] > seen[1] > 0
    run.batches = TimedBatches(run.train_loader(0))
    run.step.model.train()
    stats = run.train_step(0)
    assert stats.tokens > 0 and np.isfinite(float(stats.loss_sum))


def test_an_english_only_checkpoint_refuses_a_french_corpus(tiny_model: Path, tmp_path: Path) -> None:
    config = _config(tiny_model, tmp_path, "model.language=null")
    with pytest.raises(DataError, match=r"data.train\[1\]: .* is English-only; a corpus in 'fr'"):
        TrainingRun(config).setup()


@pytest.mark.parametrize("override, message", [
    ("data.train=[{path: a, weight: 0}]", r"data.train\[0\] needs a path and a weight > 0"),
    ("data.train=[{path: a, language: klingon}]", r"data.train\[0\].language: Whisper has no language 'klingon'"),
    ("data.train=[{path: a, wieght: 1}]", r"unknown key data.train\[0\].wieght \(did you mean data.train\[0\].weight"),
    ("data.eval=[]", r"data.eval is an empty list"),
    ("data.eval=[{path: a/dev}, {path: b/dev}]", r"data.eval: corpus names must differ, got dev, dev; set each entry's name"),
    ("data.eval=[{path: a, name: 'x y'}]", r"data.eval\[0\].name must be a non-empty name"),
])
def test_corpus_entries_are_checked_on_load(tiny_model: Path, tmp_path: Path, override: str, message: str) -> None:
    """Training corpora and eval sets alike; eval set names must differ (they key the metrics)."""
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "recipes" / "demo.yaml", [f"model.name_or_path={tiny_model}", override,
                                                      f"output.dir={tmp_path}"])


def test_a_two_corpus_run_finishes_and_names_its_corpora(tiny_multilingual_model: Path, tmp_path: Path) -> None:
    from tests.conftest import launch

    english = write_audiofolder(tmp_path / "en", 8)
    german = write_audiofolder(tmp_path / "de", 4, start_seed=50)
    train = f"[{{path: {english}, weight: 0.5, language: en}}, {{path: {german}, weight: 0.5, language: de}}]"
    args = ["train", "--config", str(ROOT / "recipes" / "demo.yaml"), f"model.name_or_path={tiny_multilingual_model}",
            "model.language=en", f"data.train={train}", "data.eval=null", "data.num_workers=1", "training.max_steps=2",
            "training.global_batch_size=4", "training.micro_batch_size=2", "training.save_every=0",
            "evaluation.at_start=false", f"output.dir={tmp_path / 'run'}"]
    result = launch(args, processes=1)
    assert result.returncode == 0, result.stderr[-3000:]
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "`en` (weight 0.5, en) + `de` (weight 0.5, de)" in card
