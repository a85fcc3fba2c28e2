"""What defines a run's optimisation, recorded in every checkpoint and checked on resume.

Resuming with other data, another global batch, another lr schedule, seed or model would silently
produce weights that no recipe describes. :func:`fingerprint` lists those values (the training
data as a digest of its ids, transcripts, durations and token labels); :func:`changes` compares
two of them key by key, so the refusal can say exactly what changed. Settings that only change
how the same optimisation is computed (micro-batch, workers, logging, evaluation) are left out.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from toolkit.config import ConfigError, RunConfig
from toolkit.data.dataset import SpeechDataset

if TYPE_CHECKING:
    from toolkit.training.checkpoint import TrainState

logger = logging.getLogger(__name__)

TRAINING_KEYS = (
    "method", "optimizer", "learning_rate", "lr_scheduler", "warmup_steps", "max_steps", "global_batch_size",
    "weight_decay", "adam_epsilon", "max_grad_norm", "mixed_precision", "seed",
)
MODEL_KEYS = ("name_or_path", "language", "task", "quantization")


def data_digest(dataset: SpeechDataset) -> str:
    """A digest of what the training split feeds the model: ids, transcripts, durations and labels."""
    sha = hashlib.sha256()
    sha.update(np.asarray(dataset.durations, dtype=np.float32).tobytes())
    for column in ("id", "text", "segments", "recording"):
        sha.update("\x00".join(str(v) for v in dataset.table.meta.column(column).to_pylist()).encode())
    if dataset.labels is not None:
        sha.update(dataset.labels.lengths().astype(np.int64).tobytes())
        blocks = dataset.labels.flat_blocks() if hasattr(dataset.labels, "flat_blocks") else [dataset.labels.flat]
        for block in blocks:  # the same bytes as one flat array, without holding it
            sha.update(block.astype(np.int64).tobytes())
    return sha.hexdigest()[:16]


def fingerprint(config: RunConfig, train: SpeechDataset | None) -> dict[str, Any]:
    """The values that define the optimisation, keyed by their dotted recipe names; ``train`` is None
    for a stream, which is named by its spec instead of its content (read only as the steps come)."""
    values: dict[str, Any] = {f"training.{k}": getattr(config.training, k) for k in TRAINING_KEYS}
    if config.training.lr_scheduler == "constant":
        del values["training.max_steps"]  # the schedule does not depend on it: extending the run is free
    values.update({f"model.{k}": getattr(config.model, k) for k in MODEL_KEYS})
    if config.training.method == "lora":
        values.update({f"lora.{k}": v for k, v in vars(config.lora).items()})
    if config.data.packing and train is not None:  # only when on: fingerprints of runs from before the key stay equal
        values["data.packing"] = True
    values["data.timestamp_probability"] = config.data.timestamp_probability
    values["data.condition_on_prev_probability"] = config.data.condition_on_prev_probability
    if train is None:
        data = config.data
        values["data.train (stream)"] = [data.train, data.hub_config, data.train_split, data.stream_block]
    else:
        values["data.train (content)"] = data_digest(train)
    if isinstance(config.data.train, list):  # the mixture decides which samples each step draws
        values["data.train (corpora)"] = [[c.weight, c.language, c.task] for c in config.data.train]
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def changes(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, list[Any]]:
    """``{key: [saved, now]}`` for every value that differs (a key missing on one side counts)."""
    return {k: [saved.get(k), now.get(k)] for k in sorted(saved.keys() | now.keys()) if saved.get(k) != now.get(k)}


def check_resume(config: RunConfig, out: Path, saved: TrainState | None, now: dict[str, Any]) -> str:
    """Refuse to resume ``saved`` under a fingerprint that differs, unless ``training.resume=force``.

    A forced change is recorded in ``saved.recipe_changes`` and ``saved`` takes the new fingerprint.
    Returns the name this segment's recipe is written under: ``recipe.yaml`` for a fresh run (the
    first segment's is never overwritten by a resume), ``recipe.resume-STEP.yaml`` for a resumed one.
    """
    if saved is None:
        return "recipe.yaml"
    changed = changes(saved.fingerprint, now) if saved.fingerprint else {}
    if changed and config.training.resume != "force":
        listed = "; ".join(f"{key}: {before!r} -> {after!r}" for key, (before, after) in changed.items())
        raise ConfigError(
            f"{out} holds a run whose optimisation differs from this recipe ({listed}); use a new output.dir, "
            "or training.resume=force to resume anyway (the change is recorded)"
        )
    if changed:
        logger.warning("training.resume=force: resuming at step %d with changes %s", saved.step, changed)
        saved.recipe_changes.append({"step": saved.step, "changes": changed})
    saved.fingerprint = now
    return f"recipe.resume-{saved.step}.yaml"
