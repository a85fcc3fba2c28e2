"""Run configuration: typed dataclasses, loaded from a YAML recipe plus dotted CLI overrides.

Every recipe key lives in exactly one dataclass field below, with its docstring next to it.
Loading validates everything up front: an unknown key, a wrong type or an impossible value
raises :class:`ConfigError` with a one-line message that names the dotted key.

Values that depend on the launch (world size) are derived, never stored: see
:func:`toolkit.training.batching.BatchPlan`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from toolkit.launch import LaunchInfo


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the offending key."""


WHISPER_MAX_TARGET_POSITIONS = 448
"""Positions of Whisper's decoder (every size): the longest label sequence it can be trained on."""


@dataclass
class ModelConfig:
    name_or_path: str = ""
    """Hub id (``openai/whisper-small``) or local directory of a Whisper checkpoint."""
    language: str | None = None
    """Whisper language (name or code) for the prompt; leave unset for English-only (``.en``) checkpoints."""
    stand_in_for: str | None = None
    """The data's real language when ``language`` is a stand-in (Dhivehi data decoded as Sinhalese)."""
    task: Literal["transcribe", "translate"] = "transcribe"
    """Whisper task token."""
    freeze_encoder: bool = False
    """Train the decoder only."""
    spec_augment: bool = False
    """SpecAugment masking of the log-mel input during training."""
    mask_time_prob: float = 0.05
    """SpecAugment: fraction of time frames masked (only with ``spec_augment``)."""
    mask_feature_prob: float = 0.0
    """SpecAugment: fraction of mel bins masked (only with ``spec_augment``)."""
    quantization: Literal["none", "int8", "nf4"] = "none"
    """Load the base weights quantised with bitsandbytes (int8, or 4-bit NF4 for QLoRA); needs training.method=lora."""
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Dtype the quantised layers compute in (NF4's bnb_4bit_compute_dtype); float32 on CPU-only machines."""

    def validate(self) -> None:
        if not self.name_or_path:
            raise ConfigError("model.name_or_path is required (a Hub id or a local Whisper directory)")
        for key in ("mask_time_prob", "mask_feature_prob"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"model.{key} must be in [0, 1), got {value}")
        if self.stand_in_for and not self.language:
            raise ConfigError("model.stand_in_for is set but model.language (the Whisper stand-in) is not")
        if self.language is not None:
            _check_whisper_language(self.language, self.stand_in_for)


def _check_whisper_language(language: str, stand_in_for: str | None) -> None:
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    lang = language.lower().strip("<|>")
    if lang in TO_LANGUAGE_CODE or lang in LANGUAGES:
        return
    hint = (
        f"; for data in a language Whisper lacks, set model.language to the closest Whisper language and "
        f"model.stand_in_for: {language}"
        if not stand_in_for
        else ""
    )
    raise ConfigError(f"model.language: Whisper has no language {language!r}{hint}")


@dataclass
class DataConfig:
    train: str | None = None
    """Training data: an audiofolder directory, a .csv/.jsonl manifest, or a Hub dataset id."""
    eval: str | None = None
    """Evaluation data, same forms as ``train``."""
    train_split: str = "train"
    """Split expression for a Hub ``train`` dataset (``train+validation``)."""
    eval_split: str = "test"
    """Split expression for a Hub ``eval`` dataset."""
    hub_config: str | None = None
    """Hub dataset configuration name (``dv`` for Common Voice Dhivehi)."""
    text_column: str = "sentence"
    """Column holding the transcript."""
    audio_column: str | None = None
    """Column holding the audio; auto-detected when unset (``file_name``, ``audio``, ``path``, ``audio_filepath``)."""
    max_duration_s: float = 30.0
    """Clips longer than this are dropped (and counted); Whisper's window is 30 s."""
    max_label_tokens: int = WHISPER_MAX_TARGET_POSITIONS
    """Label sequences longer than this many tokens are dropped; Whisper's decoder has 448 positions."""
    max_train_samples: int | None = None
    """Use only the first N training samples (for quick runs)."""
    max_eval_samples: int | None = None
    """Use only the first N evaluation samples."""
    cache_dir: str | None = None
    """Preprocessing cache; defaults to $WHISPER_TOOLKIT_CACHE or ~/.cache/whisper-toolkit."""
    num_proc: int = 1
    """Decoding worker processes per rank during preprocessing."""
    num_workers: int = 1
    """DataLoader worker processes per rank (log-mel features are computed there)."""
    fail_on_skip: bool = False
    """Abort instead of skipping when a sample is unreadable, corrupt, silent-NaN or has no transcript."""

    def validate(self) -> None:
        if not self.train and not self.eval:
            raise ConfigError("data.train or data.eval must be set")
        if not 0 < self.max_duration_s <= 30.0:
            raise ConfigError(f"data.max_duration_s must be in (0, 30], got {self.max_duration_s}")
        if not 0 < self.max_label_tokens <= WHISPER_MAX_TARGET_POSITIONS:
            raise ConfigError(
                f"data.max_label_tokens must be in (0, {WHISPER_MAX_TARGET_POSITIONS}], got {self.max_label_tokens}"
            )
        for key in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"data.{key} must be positive, got {value}")
        if self.num_proc < 1:
            raise ConfigError(f"data.num_proc must be >= 1, got {self.num_proc}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if not self.text_column:
            raise ConfigError("data.text_column must not be empty")

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        env = os.environ.get("WHISPER_TOOLKIT_CACHE")
        return Path(env).expanduser() if env else Path.home() / ".cache" / "whisper-toolkit"


@dataclass
class TrainingConfig:
    max_steps: int = 0
    """Optimizer steps to train for."""
    method: Literal["full", "lora"] = "full"
    """Full fine-tuning, or LoRA adapters (PEFT) on a frozen base (see the ``lora`` section)."""
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    """torch AdamW (fused where the device has it), or bitsandbytes' 8-bit AdamW (4x smaller states)."""
    global_batch_size: int = 16
    """Samples per optimizer step, over all processes: micro x accumulation x world size."""
    micro_batch_size: int | Literal["auto"] = "auto"
    """Samples per forward pass on one process, at most: a number, or ``auto`` for the per-process
    batch (global / world size). On out-of-memory every process halves it together and accumulation
    doubles, so the global batch is unchanged (see ``toolkit/training/finder.py``)."""
    probe_micro_batch: bool | None = None
    """Before the first step, find the largest micro-batch that fits on a worst-case batch (30 s
    clips, the longest label). Default (null): on when micro_batch_size is ``auto``. Skipped on resume:
    the size found is kept in the checkpoint."""
    learning_rate: float = 1e-5
    """Peak learning rate."""
    lr_scheduler: Literal["linear", "constant"] = "linear"
    """Linear decay to zero after warm-up, or constant after warm-up."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping norm; null disables clipping."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Autocast precision; master weights stay fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    seed: int = 42
    """Seed for initialisation, data order and dropout."""
    log_every: int = 10
    """Optimizer steps between metric lines."""
    save_every: int = 0
    """Optimizer steps between checkpoints; 0 saves only at the end."""

    @property
    def probe(self) -> bool:
        """Whether to probe before training: ``probe_micro_batch``, else on exactly with ``auto``."""
        return self.micro_batch_size == "auto" if self.probe_micro_batch is None else self.probe_micro_batch

    def micro_batch_ceiling(self, world_size: int) -> int:
        """The largest micro-batch to try: the number given, or the whole per-process batch for ``auto``."""
        per_rank = self.global_batch_size // world_size
        return per_rank if self.micro_batch_size == "auto" else min(self.micro_batch_size, per_rank)

    def validate(self) -> None:
        if self.max_steps <= 0:
            raise ConfigError(f"training.max_steps must be positive, got {self.max_steps}")
        if self.global_batch_size <= 0:
            raise ConfigError(f"training.global_batch_size must be positive, got {self.global_batch_size}")
        if self.micro_batch_size == "auto":
            pass
        elif self.micro_batch_size <= 0:
            raise ConfigError(f"training.micro_batch_size must be positive or auto, got {self.micro_batch_size}")
        elif self.micro_batch_size > self.global_batch_size:
            raise ConfigError(
                f"training.micro_batch_size ({self.micro_batch_size}) exceeds "
                f"training.global_batch_size ({self.global_batch_size})"
            )
        if self.learning_rate <= 0:
            raise ConfigError(f"training.learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ConfigError(
                f"training.warmup_steps must be in [0, training.max_steps={self.max_steps}], got {self.warmup_steps}"
            )
        if self.weight_decay < 0:
            raise ConfigError(f"training.weight_decay must be >= 0, got {self.weight_decay}")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"training.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.adam_epsilon <= 0:
            raise ConfigError(f"training.adam_epsilon must be positive, got {self.adam_epsilon}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(f"training.max_grad_norm must be positive or null, got {self.max_grad_norm}")
        if self.log_every <= 0:
            raise ConfigError(f"training.log_every must be positive, got {self.log_every}")
        if self.save_every < 0:
            raise ConfigError(f"training.save_every must be >= 0, got {self.save_every}")


@dataclass
class LoraConfig:
    """LoRA adapters; the defaults are those of PEFT's int8 Whisper recipe (r=32 on q/v, alpha 64)."""

    rank: int = 32
    """Adapter rank r."""
    alpha: int = 64
    """Scaling numerator: updates are scaled by alpha / rank."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Linear layers (by name) that get adapters, in every attention block."""

    def validate(self) -> None:
        if self.rank <= 0:
            raise ConfigError(f"lora.rank must be positive, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("lora.target_modules must name at least one module (q_proj, k_proj, v_proj, out_proj, fc1, fc2)")


@dataclass
class EvaluationConfig:
    every_steps: int = 0
    """Optimizer steps between evaluations during training; 0 evaluates only at the end."""
    at_start: bool = False
    """Also evaluate the starting checkpoint before the first step (a baseline for results.json)."""
    batch_size: int = 16
    """Utterances per generate() call on one process."""
    max_new_tokens: int = 225
    """Generation length limit (tokens after the prompt)."""
    num_beams: int = 1
    """1 is greedy decoding."""

    def validate(self) -> None:
        if self.every_steps < 0:
            raise ConfigError(f"evaluation.every_steps must be >= 0, got {self.every_steps}")
        if self.batch_size <= 0:
            raise ConfigError(f"evaluation.batch_size must be positive, got {self.batch_size}")
        if not 0 < self.max_new_tokens <= 444:
            raise ConfigError(f"evaluation.max_new_tokens must be in (0, 444], got {self.max_new_tokens}")
        if self.num_beams <= 0:
            raise ConfigError(f"evaluation.num_beams must be positive, got {self.num_beams}")


@dataclass
class OutputConfig:
    dir: str = ""
    """Output directory: checkpoints/, final/, metrics.jsonl, results.json, skipped.jsonl, tensorboard/."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep (the best one by WER is kept on top of these)."""
    final_model: Literal["last", "best"] = "last"
    """What final/ holds: the last weights, or the checkpoint with the lowest eval WER."""
    merge_lora: bool = True
    """LoRA runs: final/ holds the merged plain model (pipeline() loads it); the adapter alone is in final/adapter/."""
    push_to_hub: bool = False
    """Upload final/ to the Hub at the end (a failure is reported; the local result stays)."""
    hub_model_id: str | None = None
    """Hub repository for push_to_hub."""
    hub_private: bool = True
    """Create the Hub repository as private."""

    def validate(self) -> None:
        if not self.dir:
            raise ConfigError("output.dir is required")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"output.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("output.push_to_hub needs output.hub_model_id")


@dataclass
class RunConfig:
    """A whole recipe: one section per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self, *, for_training: bool = True, launch: LaunchInfo | None = None) -> None:
        self.model.validate()
        self.data.validate()
        self.evaluation.validate()
        self.lora.validate()
        check_combinations(self, launch or LaunchInfo.from_env())
        if for_training:
            if not self.data.train:
                raise ConfigError("data.train is required for training")
            self.training.validate()
            self.output.validate()
            if self.output.final_model == "best" and not (self.data.eval and self.evaluation.every_steps):
                raise ConfigError("output.final_model=best needs data.eval and evaluation.every_steps > 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_combinations(config: RunConfig, launch: LaunchInfo) -> None:
    """Refuse mode combinations that cannot work, saying what to use instead."""
    quant, method = config.model.quantization, config.training.method
    if quant != "none" and method != "lora":
        raise ConfigError(
            f"model.quantization={quant} needs training.method=lora: a quantised base cannot be fully fine-tuned "
            "(for full fine-tuning on a small card use DeepSpeed ZeRO with offload, see `python -m toolkit plan`)"
        )
    if quant != "none" and launch.deepspeed:
        raise ConfigError(
            f"model.quantization={quant} cannot run under {launch.description}: ZeRO partitions 16/32-bit tensors, "
            "not bitsandbytes' quantised ones. Launch LoRA on a quantised base with launch_configs/1gpu.yaml or "
            "multi_gpu.yaml (it fits a 16 GB card without ZeRO), or use model.quantization=none with ZeRO"
        )
    if method == "lora" and launch.deepspeed:
        raise ConfigError(
            f"training.method=lora cannot run under {launch.description}: adapters are a few MB, there is "
            "nothing for ZeRO to shard, and adapter checkpoints assume an unpartitioned model. Launch LoRA with "
            "launch_configs/1gpu.yaml or multi_gpu.yaml"
        )
    if config.training.optimizer == "adamw8bit" and launch.deepspeed:
        raise ConfigError(
            f"training.optimizer=adamw8bit cannot run under {launch.description}: ZeRO shards (or offloads) the "
            "optimizer states itself; use training.optimizer=adamw with DeepSpeed"
        )
    if quant == "nf4" and config.model.compute_dtype == "float16" and config.training.mixed_precision == "bf16":
        raise ConfigError("model.compute_dtype=float16 with training.mixed_precision=bf16: use the same 16-bit type for both")


def load_config(path: str | Path | None, overrides: list[str] | None = None, *, for_training: bool = True) -> RunConfig:
    """Read a YAML recipe, apply ``section.key=value`` overrides, and validate the result."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"recipe {path} must be a mapping of sections, got {type(loaded).__name__}")
        raw = loaded or {}
    for item in overrides or []:
        apply_override(raw, item)
    config = build_dataclass(RunConfig, raw, prefix="")
    config.validate(for_training=for_training)
    return config


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b=value`` override in place; the value is parsed as YAML (numbers, bools, null)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override key {key!r} must be dotted, like training.learning_rate")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def build_dataclass(cls: type, raw: Any, prefix: str) -> Any:
    """Build ``cls`` from a mapping, checking every key and type; ``prefix`` names the section in errors."""
    where = prefix.rstrip(".") or "recipe"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(fields)})"
            raise ConfigError(f"unknown key {prefix}{key}{hint}")
        hint_type = hints[key]
        if dataclasses.is_dataclass(hint_type):
            kwargs[key] = build_dataclass(hint_type, value, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = coerce(value, hint_type, f"{prefix}{key}")
    return cls(**kwargs)


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a field's type hint, converting only what YAML cannot express."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if len(errors) == 1 else ConfigError(f"{key}: {value!r} is not a valid {_type_name(hint)}")
    if origin is list:
        if isinstance(value, str):  # `lora.target_modules=q_proj,v_proj` on the command line
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [coerce(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML reads "1e-5" (no dot) as a string; accept any float literal.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {_type_name(hint)}")  # pragma: no cover - programming error


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


def dump_config(config: RunConfig) -> str:
    """The recipe as YAML, as written into checkpoints and model cards."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
