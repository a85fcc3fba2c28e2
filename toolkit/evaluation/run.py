"""The ``evaluate`` command: load a model directory and a data spec, print one JSON line of metrics."""

from __future__ import annotations

import dataclasses
import json
import logging
import typing
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

from toolkit.adapters import DTYPES
from toolkit.config import DataConfig, EvaluationConfig, ModelConfig
from toolkit.data.collator import WhisperCollator
from toolkit.data.pipeline import load_split, open_split
from toolkit.evaluation.generate import EvalResult, GenerationSettings, evaluate_model
from toolkit.evaluation.longform import LONG_FORM_MAX_SECONDS, LongFormSettings, evaluate_long_form
from toolkit.evaluation.normalize import make_normalizer
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


def run_evaluate(
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    eval_cfg: EvaluationConfig,
    *,
    dtype: str = "auto",
    predictions_path: str | None = None,
) -> dict[str, Any]:
    """Evaluate on ``data.eval`` across all launched processes; every rank returns the same metrics.

    Besides the corpus metrics: ``batch_size``, the eval batch generation finished with (smaller than
    ``evaluation.batch_size`` after an out-of-memory back-off), and ``backoffs``, ``[{"from", "to"}]``.
    With ``evaluation.long_form`` the eval set holds whole recordings, transcribed by
    :func:`~toolkit.evaluation.longform.evaluate_long_form` (which adds the window signals).
    """
    state = PartialState()
    source = open_split("eval", data_cfg)  # a bad data spec fails before the model loads
    loaded = load_model(model_cfg, dtype=resolve_dtype(dtype, state.device), device=state.device)
    # A quantised base is placed at load time (device_map); bitsandbytes' modules must not be moved.
    model = loaded.model if model_cfg.quantization != "none" else loaded.model.to(state.device)
    install_injector(model, state.process_index)  # test-only TOOLKIT_INJECT_OOM
    tokenizer = loaded.processor.tokenizer
    normalize = make_normalizer(loaded.english, tokenizer)
    collect = predictions_path is not None
    if eval_cfg.long_form:
        # Whole recordings: no 30 s limit, and no tokenizer, so no label-length filter either (the
        # transcript of a few minutes is longer than the decoder; it is scored, never decoded as one).
        long_data = dataclasses.replace(data_cfg, max_duration_s=LONG_FORM_MAX_SECONDS)
        split = load_split("eval", long_data, None, source)
        result: EvalResult = evaluate_long_form(
            model, split.dataset, loaded.processor.feature_extractor, tokenizer, normalize,
            LongFormSettings.from_config(eval_cfg, num_workers=data_cfg.num_workers, collect_predictions=collect),
        )
    else:
        split = load_split("eval", data_cfg, tokenizer, source)  # drops references too long to decode
        collator = WhisperCollator(loaded.processor.feature_extractor, model.config.decoder_start_token_id,
                                   data_cfg.features_on)
        settings = GenerationSettings.from_config(eval_cfg, num_workers=data_cfg.num_workers,
                                                  collect_predictions=collect)
        result = evaluate_model(model, split.dataset, collator, tokenizer, normalize, settings)
    metrics = {
        **result.metrics, "skipped": len(split.skips), "world_size": state.num_processes,
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
