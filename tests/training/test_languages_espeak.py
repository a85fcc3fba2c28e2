"""Two languages of real (espeak-ng) speech: each sample's language token and transcript follow its corpus.

The tone-clip version is :mod:`tests.training.test_corpora`; here the French corpus is French speech
with accented transcripts, so the tokenizer round trip of non-ASCII text is checked too.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT
from tests.training.test_corpora import corpus_samples
from toolkit import synth
from toolkit.config import load_config
from toolkit.data.loader import TimedBatches
from toolkit.training.loop import TrainingRun

pytestmark = [
    pytest.mark.usefixtures("fresh_accelerate"),
    pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not on PATH (apt-get install espeak-ng)"),
]

COUNTS = {"en": 8, "fr": 6}


def _transcripts(folder: Path) -> dict[str, str]:
    with (folder / "metadata.csv").open(newline="", encoding="utf-8") as handle:
        return {row["file_name"]: row["sentence"] for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An English and a French audiofolder named after their language, and their dev sets (``en-dev``, ``fr-dev``)."""
    root = tmp_path_factory.mktemp("espeak-languages")
    folders = {}
    for language, count in COUNTS.items():
        synth.synthesize_corpus(root / f"synth-{language}", train=count, dev=2, seed=2, jobs=4, language=language)
        folders[language] = (root / f"synth-{language}" / "train").rename(root / language)
        folders[f"{language}-dev"] = (root / f"synth-{language}" / "dev").rename(root / f"{language}-dev")
    return folders


def _config(model: Path, corpora: dict[str, Path], out: Path, *overrides: str):  # noqa: ANN202
    train = (f"[{{path: {corpora['en']}, weight: 0.7, language: en}}, "
             f"{{path: {corpora['fr']}, weight: 0.3, language: fr}}]")
    evals = (f"[{{path: {corpora['en-dev']}, language: en}}, {{path: {corpora['fr-dev']}, language: fr}}]")
    values = [f"model.name_or_path={model}", "model.language=en", f"data.train={train}", f"data.eval={evals}",
              "evaluation.max_new_tokens=8", "evaluation.batch_size=2",
              "data.num_workers=0", "training.max_steps=2", "training.global_batch_size=8",
              "training.micro_batch_size=4", "training.save_every=0", "evaluation.at_start=false",
              f"output.dir={out}", *overrides]
    return load_config(ROOT / "recipes" / "demo.yaml", values)


@pytest.mark.parametrize("packing", ["false", "true"])
def test_language_tokens_and_french_transcripts_follow_the_corpus(
    tiny_multilingual_model: Path, corpora: dict[str, Path], tmp_path: Path, packing: str
) -> None:
    run = TrainingRun(_config(tiny_multilingual_model, corpora, tmp_path / "run", f"data.packing={packing}"))
    run.setup()
    tokenizer = run.loaded.processor.tokenizer
    assert run.data.mix.sizes == [COUNTS["en"], COUNTS["fr"]]
    french = _transcripts(corpora["fr"])
    seen = [0, 0]
    french_single = 0
    french_texts: list[str] = []
    for corpus, example in corpus_samples(run, ("en", "fr")):
        seen[corpus] += 1
        if corpus == 1:
            # Timestamp tokens and specials are dropped; a timestamped layout starts with a space.
            text = tokenizer.decode(example.labels[example.prompt_length:], skip_special_tokens=True).strip()
            names = example.id.split("+")
            assert text == " ".join(french[name] for name in names)
            french_texts.append(text)
            french_single += len(names) == 1
    assert seen[0] > seen[1] > 0
    assert french_texts and not "".join(french_texts).isascii()  # accents survived the tokenizer
    if packing == "false":
        assert french_single > 0
    run.batches = TimedBatches(run.train_loader(0))
    run.step.model.train()
    stats = run.train_step(0)
    assert stats.tokens > 0 and np.isfinite(float(stats.loss_sum))
    # Evaluation: each dev set decoded in its language, reported per set, per language and in total.
    metrics = run.evaluate()
    assert metrics["lang/en/num_samples"] == metrics["lang/fr/num_samples"] == 2 and metrics["num_samples"] == 4
    assert {"en-dev/wer", "fr-dev/wer", "lang/fr/wer", "wer"} <= set(metrics)
