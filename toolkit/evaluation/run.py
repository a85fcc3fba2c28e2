"""The ``evaluate`` command: load a model directory and a data spec, print one JSON line of metrics."""

from __future__ import annotations

import dataclasses
import json
import logging
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

from toolkit.adapters import DTYPES
from toolkit.config import DataConfig, EvaluationConfig, ModelConfig
from toolkit.data.collator import WhisperCollator
from toolkit.data.corpora import Prompt, corpus_prompt, open_sources, prompting
from toolkit.data.pipeline import LoadedSplit, load_split
from toolkit.evaluation.generate import EvalResult, GenerationSettings, evaluate_model
from toolkit.evaluation.longform import LONG_FORM_MAX_SECONDS, LongFormSettings, evaluate_long_form
from toolkit.evaluation.normalize import make_normalizer
from toolkit.evaluation.sets import evaluate_sets
from toolkit.modeling import load_model, recorded_prompt
from toolkit.oom import install_injector

logger = logging.getLogger(__name__)


def evaluation_prompt(model: str, language: str | None, task: str | None) -> tuple[str | None, str]:
    """The language and task to evaluate with: each as given on the command line, else as the
    checkpoint's generation config records it (a German fine-tune's ``final/`` records german and
    transcribe, so it evaluates as trained), else no language and ``transcribe``."""
    if language is None or task is None:
        recorded_language, recorded_task = recorded_prompt(model)
        taken = []
        if language is None and recorded_language:
            language = recorded_language
            taken.append(f"language {language}")
        if task is None and recorded_task in typing.get_args(typing.get_type_hints(ModelConfig)["task"]):
            task = recorded_task
            taken.append(f"task {task}")
        if taken:
            logger.info("evaluating with the %s recorded in the generation config of %s (--language and --task "
                        "override it)", " and ".join(taken), model)
    return language, task or ModelConfig.task


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@dataclass
class SetDecoding:
    """How the ``evaluate`` command loads and decodes an eval set (short- or long-form)."""

    model: Any
    processor: Any
    data_cfg: DataConfig
    eval_cfg: EvaluationConfig
    collect_predictions: bool = False

    def load(self, path: str, source: Any) -> LoadedSplit:
        """The set at ``path``: clips (references too long to decode dropped), or whole recordings
        (no 30 s limit and no tokenizer: a transcript of minutes is scored, never decoded as one)."""
        data = dataclasses.replace(self.data_cfg, eval=path)
        if self.eval_cfg.long_form:
            return load_split("eval", dataclasses.replace(data, max_duration_s=LONG_FORM_MAX_SECONDS), None, source)
        return load_split("eval", data, self.processor.tokenizer, source)

    def decode(self, dataset: Any, prompt: Prompt | None, normalize: Callable[[str], str]) -> EvalResult:
        """``dataset``'s result; ``prompt``: its language and task (None: the model's generation config's)."""
        run = {"num_workers": self.data_cfg.num_workers, "collect_predictions": self.collect_predictions}
        if prompt is not None:
            run.update(language=prompt.language, task=prompt.task)
        tokenizer = self.processor.tokenizer
        if self.eval_cfg.long_form:
            return evaluate_long_form(self.model, dataset, self.processor.feature_extractor, tokenizer, normalize,
                                      LongFormSettings.from_config(self.eval_cfg, **run))
        collator = WhisperCollator(self.processor.feature_extractor, self.model.config.decoder_start_token_id,
                                   self.data_cfg.features_on)
        return evaluate_model(self.model, dataset, collator, tokenizer, normalize,
                              GenerationSettings.from_config(self.eval_cfg, **run))


def run_evaluate(
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    eval_cfg: EvaluationConfig,
    *,
    dtype: str = "auto",
    predictions_path: str | None = None,
) -> dict[str, Any]:
    """Evaluate on ``data.eval`` across all launched processes; every rank returns the same metrics.
    A list of sets is decoded set by set, each in its language, and reported in total, per set and
    per language (:mod:`toolkit.evaluation.sets`).

    Besides the corpus metrics: ``batch_size``, the eval batch generation finished with (smaller than
    ``evaluation.batch_size`` after an out-of-memory back-off), and ``backoffs``, ``[{"from", "to"}]``.
    With ``evaluation.long_form`` the eval set holds whole recordings, transcribed by
    :func:`~toolkit.evaluation.longform.evaluate_long_form` (which adds the window signals).
    """
    state = PartialState()
    sources = open_sources(data_cfg)["eval"]  # a bad data spec fails before the model loads
    loaded = load_model(model_cfg, dtype=resolve_dtype(dtype, state.device), device=state.device)
    # A quantised base is placed at load time (device_map); bitsandbytes' modules must not be moved.
    model = loaded.model if model_cfg.quantization != "none" else loaded.model.to(state.device)
    install_injector(model, state.process_index)  # test-only TOOLKIT_INJECT_OOM
    tokenizer = loaded.processor.tokenizer
    decoder = SetDecoding(model, loaded.processor, data_cfg, eval_cfg, collect_predictions=predictions_path is not None)
    if not isinstance(data_cfg.eval, list):
        splits = [decoder.load(data_cfg.eval or "", sources)]
        result = decoder.decode(splits[0].dataset, None, make_normalizer(loaded.english, tokenizer))
    else:
        sets = []
        for i, (corpus, source) in enumerate(zip(data_cfg.eval, sources, strict=True)):
            prompt = corpus_prompt(corpus, model_cfg, loaded.language is None, f"--data[{i}]")
            with prompting(tokenizer, prompt):
                sets.append((corpus.label, prompt, decoder.load(corpus.path, source)))
        splits = [split for _, _, split in sets]
        result = evaluate_sets([(name, prompt, split.dataset) for name, prompt, split in sets], tokenizer, decoder.decode)
    metrics = {
        **result.metrics, "skipped": sum(len(split.skips) for split in splits), "world_size": state.num_processes,
        "batch_size": result.batch_size, "backoffs": result.backoffs,
    }
    if result.backoffs and state.is_main_process:
        logger.warning("evaluation finished at eval batch %d (asked for %d) after running out of memory",
                       result.batch_size, eval_cfg.batch_size)
    if predictions_path and state.is_main_process:
        path = Path(predictions_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as handle:
            for row in result.predictions:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return metrics
