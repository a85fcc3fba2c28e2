"""What a run leaves behind: ``final/`` (model, processor, model card), ``results.json``, ``skipped.jsonl``."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from toolkit.adapters import ADAPTER_DIR, export_merged, is_peft
from toolkit.config import RunConfig, dump_config
from toolkit.data.preprocess import Skip

logger = logging.getLogger(__name__)


def write_skipped(path: Path, skips: Iterable[Skip]) -> int:
    """Rewrite ``skipped.jsonl`` (its content is a pure function of the data, so a resume rewrites it)."""
    count = 0
    with path.open("w") as handle:
        for skip in skips:
            handle.write(json.dumps(asdict(skip), ensure_ascii=False) + "\n")
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
    """
    target.mkdir(parents=True, exist_ok=True)
    if is_peft(model):
        adapter_dir = target / ADAPTER_DIR
        model.save_pretrained(str(adapter_dir))
        processor.save_pretrained(str(adapter_dir))
        _save_spelling_map(processor, adapter_dir)
        if config.output.merge_lora:
            export_merged(adapter_dir, config.model.name_or_path, target)
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


def model_card(config: RunConfig, results: dict[str, Any]) -> str:
    lang = config.model.language or "English (English-only checkpoint)"
    if config.model.stand_in_for:
        lang = f"{config.model.stand_in_for} (decoded with Whisper's {config.model.language} token as a stand-in)"
    final = results.get("eval") or {}
    rows = "\n".join(
        f"| {key} | {final[key]} |" for key in ("wer", "wer_ortho", "cer", "num_samples") if key in final
    )
    return f"""---
library_name: transformers
pipeline_tag: automatic-speech-recognition
base_model: {config.model.name_or_path}
tags: [whisper, whisper-toolkit]
---

# Fine-tuned {Path(config.model.name_or_path).name}

Fine-tuned with whisper-toolkit from `{config.model.name_or_path}` on `{config.data.train}`.

- Language: {lang}; task: {config.model.task}
- Steps: {results.get("steps")}; global batch: {results.get("global_batch_size")}
  (micro-batch {results.get("micro_batch_size")} x accumulation {results.get("gradient_accumulation_steps")}
  x {results.get("world_size")} processes)
- Training throughput: {results.get("train_samples_per_second")} samples/s

## Evaluation on `{config.data.eval}`

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
