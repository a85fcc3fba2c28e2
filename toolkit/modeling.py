"""Model and processor loading: any Whisper checkpoint, language/task wired into tokenizer and generation."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import WhisperForConditionalGeneration, WhisperProcessor
from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

from toolkit.config import ConfigError, ModelConfig, TrainingConfig

logger = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The checkpoint could not be loaded (missing directory, no Hub access, not a Whisper model)."""


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


def load_processor(model_cfg: ModelConfig, *, english_only: bool) -> WhisperProcessor:
    source = model_cfg.name_or_path
    try:
        processor = WhisperProcessor.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the processor of {source!r}: {exc}") from exc
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
            "(a Whisper language; for another language, the closest one plus model.stand_in_for)"
        )


def load_model(
    model_cfg: ModelConfig, training_cfg: TrainingConfig | None = None, *, dtype: torch.dtype = torch.float32
) -> LoadedModel:
    """Load model and processor; with ``training_cfg``, also apply the training-time options."""
    source = model_cfg.name_or_path
    try:
        model = WhisperForConditionalGeneration.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load Whisper checkpoint {source!r}: {exc}") from exc
    english_only = is_english_only(model)
    check_language(model_cfg, english_only)
    processor = load_processor(model_cfg, english_only=english_only)
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
        configure_for_training(model, model_cfg, training_cfg)
    return LoadedModel(model, processor, language, english=english_only or language == "english")


def configure_for_training(
    model: WhisperForConditionalGeneration, model_cfg: ModelConfig, training_cfg: TrainingConfig
) -> None:
    # The KV cache is useless with teacher forcing and conflicts with gradient checkpointing;
    # generation turns it back on per call (see toolkit.evaluation.generate).
    model.config.use_cache = False
    model.config.apply_spec_augment = model_cfg.spec_augment
    if model_cfg.spec_augment:
        model.config.mask_time_prob = model_cfg.mask_time_prob
        model.config.mask_feature_prob = model_cfg.mask_feature_prob
    if model_cfg.freeze_encoder:
        model.freeze_encoder()
    if training_cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def tiny_random_whisper(path: str, *, english_only: bool = True, seed: int = 0, base: str | None = None) -> Any:
    """Write a tiny randomly initialised Whisper (for tests and smoke runs) with ``base``'s processor.

    The tokenizer must be a real Whisper tokenizer: ``base`` is a local Whisper directory to take it from.
    """
    from transformers import WhisperConfig

    if base is None:
        raise ValueError("tiny_random_whisper needs base= a local Whisper directory for the processor")
    processor = WhisperProcessor.from_pretrained(base)
    base_model_cfg = WhisperConfig.from_pretrained(base)
    config = WhisperConfig(
        vocab_size=base_model_cfg.vocab_size,
        num_mel_bins=80,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=1500,
        max_target_positions=448,
        pad_token_id=base_model_cfg.pad_token_id,
        bos_token_id=base_model_cfg.bos_token_id,
        eos_token_id=base_model_cfg.eos_token_id,
        decoder_start_token_id=base_model_cfg.decoder_start_token_id,
        suppress_tokens=base_model_cfg.suppress_tokens,
        begin_suppress_tokens=base_model_cfg.begin_suppress_tokens,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig.from_pretrained(base)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model
