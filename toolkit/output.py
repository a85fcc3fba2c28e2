"""What a run leaves behind: ``final/`` (model, processor, model card), ``results.json``, ``skipped.jsonl``.

``final/`` is what gets published (``output.push_to_hub``), so it is written whole or not at all,
with the permissions the umask gives, and names local paths (the base checkpoint, the data) by
their last component only.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from toolkit.adapters import ADAPTER_DIR, export_merged, is_peft
from toolkit.config import RunConfig, dump_config
from toolkit.data.preprocess import Skip
from toolkit.modeling import is_local_reference

logger = logging.getLogger(__name__)


def write_skipped(path: Path, skips: Iterable[Skip]) -> int:
    """Rewrite ``skipped.jsonl`` with the data's skips (a pure function of the data: a resume rewrites it)."""
    return _write_jsonl(path, (asdict(skip) for skip in skips), "w")


def append_skipped(path: Path, records: Iterable[dict[str, Any]]) -> int:
    """Add training-time skips (a step's samples, with the step and reason) to ``skipped.jsonl``."""
    return _write_jsonl(path, records, "a")


def _write_jsonl(path: Path, records: Iterable[dict[str, Any]], mode: str) -> int:
    count = 0
    with path.open(mode) as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def export_model(
    model: Any,
    processor: Any,
    target: Path,
    config: RunConfig,
    results: dict[str, Any],
    state_dict: dict[str, Any] | None = None,
) -> None:
    """Save a plain transformers model + processor that ``pipeline("automatic-speech-recognition")`` loads.

    A LoRA model is saved as its adapter in ``target/adapter`` (with the processor, so the
    directory evaluates on its own) and, with ``output.merge_lora``, merged into ``target``.
    ``state_dict`` is the full state gathered from all ranks (ZeRO-3), when the model's own is partitioned.

    Everything is written into ``.NAME.tmp`` beside ``target`` and renamed into place only when
    complete: a failure (a full disk) removes the partial copy and leaves an older ``target`` as it was.
    """
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while exporting
    staging.mkdir(parents=True)
    try:
        _write_final(model, processor, staging, config, results, state_dict)
        follow_umask(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_dir(staging, target)


def replace_dir(new: Path, target: Path) -> None:
    """Put the directory ``new`` at ``target``, replacing what is there: the old one is renamed away
    first and deleted last, so ``target`` is never a mix of the two (at worst, after a crash between
    the renames, absent, with both copies complete beside it)."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def current_umask() -> int:
    """The process umask. Read from /proc where it can be: setting it to read it back, the only
    portable way, would briefly change it for every thread (TensorBoard's writer creates files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(directory: Path) -> None:
    """Give ``directory`` and everything in it the modes a plain ``open``/``mkdir`` would:
    transformers leaves ``model.safetensors`` at 0600 whatever the umask, the rest follows it."""
    mask = current_umask()
    for path in [directory, *directory.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _write_final(
    model: Any, processor: Any, target: Path, config: RunConfig, results: dict[str, Any], state_dict: dict[str, Any] | None
) -> None:
    if is_peft(model):
        adapter_dir = target / ADAPTER_DIR
        model.save_pretrained(str(adapter_dir))
        processor.save_pretrained(str(adapter_dir))
        _save_spelling_map(processor, adapter_dir)
        # What the run trained with (language, task), which the base's own generation config lacks:
        # `evaluate` takes them from here when the command line does not give them.
        model.generation_config.save_pretrained(str(adapter_dir))
        if config.output.merge_lora:
            export_merged(adapter_dir, config.model.name_or_path, target)
            model.generation_config.save_pretrained(str(target))
    else:
        model.config.use_cache = True
        if getattr(model, "is_activation_checkpointing", False):
            model.activation_checkpointing_disable()
        model.save_pretrained(str(target), safe_serialization=True, state_dict=state_dict)
    processor.save_pretrained(str(target))
    _save_spelling_map(processor, target)
    (target / "README.md").write_text(model_card(config, results))


def _save_spelling_map(processor: Any, target: Path) -> None:
    # transformers 5 does not save the English spelling map; without it the reloaded model's
    # normalised WER differs from the one measured during training.
    spelling = getattr(processor.tokenizer, "english_spelling_normalizer", None)
    if spelling:
        (target / "normalizer.json").write_text(json.dumps(spelling, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


PATH_KEYS = (("model", "name_or_path"), ("data", "train"), ("data", "eval"), ("data", "cache_dir"), ("output", "dir"))
"""The recipe keys that can hold a local path."""


def public_name(value: str | None) -> str | None:
    """How ``final/`` names a model or data source: a Hub id as it is, a local path by its last
    component (the full path means nothing on the Hub, and tells about this machine)."""
    if not value or not is_local_reference(value):
        return value
    return Path(value).expanduser().resolve().name or value


def public_config(config: RunConfig) -> RunConfig:
    """A copy of ``config`` with :func:`public_name` applied to the keys that can hold a local path."""
    public = copy.deepcopy(config)
    for section, key in PATH_KEYS:
        part = getattr(public, section)
        value = getattr(part, key)
        if isinstance(value, list):  # several corpora
            for corpus in value:
                corpus.path = public_name(corpus.path)
        else:
            setattr(part, key, public_name(value))
    return public


def _data_names(config: RunConfig) -> str:
    train = config.data.train
    if isinstance(train, list):
        return " + ".join(f"`{c.path}` (weight {c.weight:g}{', ' + c.language if c.language else ''})" for c in train)
    return f"`{train}`"


def _eval_names(config: RunConfig) -> str:
    sets = config.data.eval
    if isinstance(sets, list):
        return " + ".join(f"`{c.path}` ({c.label}{', ' + c.language if c.language else ''})" for c in sets)
    return f"`{sets}`"


def model_card(config: RunConfig, results: dict[str, Any]) -> str:
    """``final/README.md``: metadata, results and the recipe, with local paths reduced to their names."""
    # The card's base_model metadata names a Hub repository: a local base gets none.
    base_model = "" if is_local_reference(config.model.name_or_path) else f"base_model: {config.model.name_or_path}\n"
    config = public_config(config)
    lang = config.model.language or "English (English-only checkpoint)"
    if config.model.stand_in_for:
        lang = f"{config.model.stand_in_for} (decoded with Whisper's {config.model.language} token as a stand-in)"
    final = results.get("eval") or {}
    # Several eval sets add each set's and each language's WER (``NAME/wer``, ``lang/fr/wer``).
    keys = [*(k for k in ("wer", "wer_ortho", "cer", "num_samples") if k in final), *(k for k in final if k.endswith("/wer"))]
    rows = "\n".join(f"| {key} | {final[key]} |" for key in keys)
    return f"""---
library_name: transformers
pipeline_tag: automatic-speech-recognition
{base_model}tags: [whisper, whisper-toolkit]
---

# Fine-tuned {Path(config.model.name_or_path).name}

Fine-tuned with whisper-toolkit from `{config.model.name_or_path}` on {_data_names(config)}.

- Language: {lang}; task: {config.model.task}
- Steps: {results.get("steps")}; global batch: {results.get("global_batch_size")}
  (micro-batch {results.get("micro_batch_size")} x accumulation {results.get("gradient_accumulation_steps")}
  x {results.get("world_size")} processes)
- Training throughput: {results.get("train_samples_per_second")} clips/s, {results.get("train_audio_hours_per_hour")}
  audio-hours/hour{" (packed into 30 s windows)" if results.get("packing") else ""}

## Evaluation on {_eval_names(config)}

WER and CER in percent; `wer` is on normalised text, `wer_ortho` on the raw text.

| metric | value |
|---|---|
{rows or "| (no evaluation set) | |"}

## Recipe

```yaml
{dump_config(config)}```
"""


def push_to_hub(folder: Path, repo_id: str, private: bool) -> str | None:
    """Upload ``folder``; on any failure, say why and keep the local copy. Returns the URL or None."""
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="whisper-toolkit fine-tune")
        return str(getattr(info, "commit_url", info))
    except Exception as exc:  # network, auth, permissions: the run's result must survive all of them
        logger.error(
            "push to the Hub (%s) failed: %s: %s. The model is safe in %s; push it later with "
            "`huggingface-cli upload %s %s`.",
            repo_id, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "", folder, repo_id, folder,
        )
        return None
