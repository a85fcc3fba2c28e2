"""Model and processor loading: any Whisper checkpoint, language/task wired into tokenizer and generation."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import GenerationConfig, WhisperForConditionalGeneration, WhisperProcessor
from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

from toolkit.adapters import DTYPES, adapter_base, apply_lora, prepare_quantized, quantization_config
from toolkit.config import ConfigError, LoraConfig, ModelConfig, TrainingConfig

logger = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The checkpoint could not be loaded (missing directory, no Hub access, not a Whisper model)."""


def is_local_reference(name_or_path: str) -> bool:
    """Whether ``name_or_path`` means a local path rather than a Hub repository id: it exists here,
    is written as a path (absolute, ``./``, ``../``, ``~``, two or more ``/``), or is no valid Hub id."""
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        return True
    if Path(name_or_path).exists():
        return True
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return True
    return False


def check_model_source(name_or_path: str) -> None:
    """Refuse a local model path that is not a directory, before anything loads. A Hub id (``a/b``)
    that is not a local directory is left to the Hub; transformers would take a missing path for a
    malformed Hub id and say only that."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise ModelLoadError(f"model {name_or_path} is a file; give the Whisper checkpoint's directory")
    if is_local_reference(name_or_path):
        raise ModelLoadError(f"no such model directory: {name_or_path}")


def _first_line(exc: BaseException) -> str:
    """transformers' and the Hub's messages run over several lines; the first one says what happened."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def recorded_prompt(name_or_path: str) -> tuple[str | None, str | None]:
    """The language and task a checkpoint's generation config records (a fine-tune's ``final/`` and
    ``final/adapter/`` do; openai's checkpoints record none): ``(None, None)`` where there is none
    (or it cannot be read: loading the model then says why)."""
    sources = [name_or_path]
    if Path(name_or_path).is_dir() and (base := adapter_base(Path(name_or_path))):
        sources.append(base)  # an adapter directory written before it held its generation config
    for source in sources:
        try:
            gen = GenerationConfig.from_pretrained(source)
        except Exception:  # missing file, no Hub, bad JSON: loading the model reports it properly
            continue
        language, task = getattr(gen, "language", None), getattr(gen, "task", None)
        if language or task:
            return language, task
    return None, None


@dataclass
class LoadedModel:
    model: WhisperForConditionalGeneration
    processor: WhisperProcessor
    language: str | None
    """Whisper language name used in the prompt (None for English-only checkpoints)."""
    english: bool
    """True when the transcripts are English (chooses Whisper's English normaliser)."""


def language_name(language: str) -> str:
    lang = language.lower().strip("<|>")
    return LANGUAGES.get(lang, lang) if lang not in TO_LANGUAGE_CODE else lang


def load_processor(model_cfg: ModelConfig, *, english_only: bool, source: str | None = None) -> WhisperProcessor:
    source = source or os.path.expanduser(model_cfg.name_or_path)
    try:
        processor = WhisperProcessor.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the processor of {source!r}: {_first_line(exc)}") from exc
    language = None if english_only else language_name(model_cfg.language or "")
    processor.tokenizer.set_prefix_tokens(language=language, task=None if english_only else model_cfg.task, predict_timestamps=False)
    return processor


def is_english_only(model: WhisperForConditionalGeneration) -> bool:
    multilingual = getattr(model.generation_config, "is_multilingual", None)
    if multilingual is not None:
        return not multilingual
    return model.config.vocab_size < 51865


def check_language(model_cfg: ModelConfig, english_only: bool) -> None:
    if english_only:
        if model_cfg.language and language_name(model_cfg.language) != "english":
            raise ConfigError(
                f"model.language: {model_cfg.name_or_path} is English-only; it cannot transcribe "
                f"{model_cfg.language!r} (use a multilingual checkpoint, or unset model.language)"
            )
        if model_cfg.task == "translate":
            raise ConfigError("model.task: English-only checkpoints cannot translate")
    elif not model_cfg.language:
        raise ConfigError(
            f"model.language is required for the multilingual checkpoint {model_cfg.name_or_path} "
            "(evaluate: --language), whose generation config records none "
            "(a Whisper language; for another language, the closest one plus model.stand_in_for)"
        )


def load_dtype(model_cfg: ModelConfig, device: torch.device | str | None, *, frozen_base: bool = False) -> torch.dtype:
    """Weights dtype at load: fp32 master weights for what trains. On a GPU, a base that does not
    train (LoRA) or is quantised loads at the compute dtype: it needs no fp32 master copy, and
    bitsandbytes' int8 kernels want 16-bit inputs. On CPU everything stays fp32."""
    on_gpu = device is not None and torch.device(device).type == "cuda"
    if on_gpu and (frozen_base or model_cfg.quantization != "none"):
        return DTYPES[model_cfg.compute_dtype]
    return torch.float32


def load_model(
    model_cfg: ModelConfig,
    training_cfg: TrainingConfig | None = None,
    *,
    lora_cfg: LoraConfig | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> LoadedModel:
    """Load model and processor; with ``training_cfg``, also apply the training-time options.

    ``model_cfg.name_or_path`` may also be a LoRA adapter directory (``final/adapter``): its base is
    loaded (quantised as ``model.quantization`` says) and the adapter applied on top.
    """
    source = os.path.expanduser(model_cfg.name_or_path)
    check_model_source(source)
    adapter = adapter_base(Path(source)) if Path(source).is_dir() else None
    if adapter:
        check_model_source(adapter)  # the base the adapter was trained on may have moved since
    base = adapter or source
    frozen = training_cfg is not None and training_cfg.method == "lora"
    kwargs: dict[str, Any] = {"dtype": dtype or load_dtype(model_cfg, device, frozen_base=frozen)}
    quant = quantization_config(model_cfg)
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": str(device or "cpu")})
    try:
        model = WhisperForConditionalGeneration.from_pretrained(base, **kwargs)
    except (OSError, ValueError) as exc:
        where = "" if Path(base).is_dir() else "not a local directory; from the Hub: "
        raise ModelLoadError(f"could not load Whisper checkpoint {base!r}: {where}{_first_line(exc)}") from exc
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, source)
    english_only = is_english_only(model)
    check_language(model_cfg, english_only)
    processor = load_processor(model_cfg, english_only=english_only, source=source if _has_processor(source) else base)
    language = None if english_only else language_name(model_cfg.language or "")

    gen = model.generation_config
    # Old checkpoints force the prompt through forced_decoder_ids, which generate() now rejects next
    # to language/task; the prompt comes from language and task instead.
    gen.forced_decoder_ids = None
    model.config.forced_decoder_ids = None
    if not english_only:
        gen.language = language
        gen.task = model_cfg.task
    if training_cfg is not None:
        model = configure_for_training(model, model_cfg, training_cfg, lora_cfg or LoraConfig())
    return LoadedModel(model, processor, language, english=english_only or language == "english")


def _has_processor(path: str) -> bool:
    directory = Path(path)
    return directory.is_dir() and any(
        (directory / name).is_file() for name in ("processor_config.json", "preprocessor_config.json")
    )


def configure_for_training(
    model: WhisperForConditionalGeneration, model_cfg: ModelConfig, training_cfg: TrainingConfig, lora_cfg: LoraConfig
) -> Any:
    """Apply the training options; returns the model to train (a PEFT wrapper for LoRA)."""
    # The KV cache is useless with teacher forcing and conflicts with gradient checkpointing;
    # generation turns it back on per call (see toolkit.evaluation.generate).
    model.config.use_cache = False
    model.config.apply_spec_augment = model_cfg.spec_augment
    if model_cfg.spec_augment:
        model.config.mask_time_prob = model_cfg.mask_time_prob
        model.config.mask_feature_prob = model_cfg.mask_feature_prob
    # `auto` is resolved by the training run before it loads the model; unresolved, it means off.
    checkpointing = training_cfg.gradient_checkpointing is True
    if model_cfg.quantization != "none":
        model = prepare_quantized(model, checkpointing)
    elif checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if training_cfg.method == "lora":
        return apply_lora(model, lora_cfg, freeze_encoder=model_cfg.freeze_encoder)
    if model_cfg.freeze_encoder:
        model.freeze_encoder()
    return model


def compile_layers(model: torch.nn.Module, zero_stage: int | None = None) -> int:
    """Compile every encoder and decoder layer in place (``nn.Module.compile``); returns how many.

    Regional rather than whole-model: the layers of each stack share one compiled graph, so compiling
    costs two layers' worth of time, the parameter names (and so checkpoints) stay as they are, and
    activation checkpointing keeps wrapping each layer's (now compiled) call.
    """
    if zero_stage == 3:
        raise ConfigError("training.compile does not work with DeepSpeed ZeRO-3 (its parameter hooks break the "
                          "compiled graphs); use ZeRO-2 or DDP, or set training.compile=false")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = [*base.model.encoder.layers, *base.model.decoder.layers]
    for layer in layers:
        layer.compile()
    return len(layers)


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
