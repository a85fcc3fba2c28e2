"""Run configuration: typed dataclasses, loaded from a YAML recipe plus dotted CLI overrides.

Every recipe key lives in exactly one dataclass field below, with its docstring next to it.
Loading validates everything up front, before the model or the data: an unknown key, a wrong type
or an impossible value raises :class:`ConfigError` with a one-line message that names the dotted
key. Reading the file and the overrides, and the type checks, are :mod:`toolkit.recipe`'s.

Values that depend on the launch (world size) are derived, never stored: see
:func:`toolkit.training.batching.BatchPlan`. They are checked here all the same, with the world
size the launcher asked for (:class:`toolkit.launch.LaunchInfo`), so that a global batch that does
not split over the processes is refused before anything loads.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from toolkit.config_sets import Corpus, GuardSet, check_corpora
from toolkit.languages import check_whisper_language
from toolkit.launch import LaunchInfo, check_combinations
from toolkit.recipe import ConfigError, apply_override, build_dataclass, check_writable_dir, read_recipe

logger = logging.getLogger(__name__)

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
            check_whisper_language(self.language, self.stand_in_for)


@dataclass
class DataConfig:
    train: str | list[Corpus] | None = None
    """Training data: an audiofolder directory, a .csv/.jsonl manifest, a Hub dataset id or a prepared
    directory; or a list of ``{path, weight, language, task}`` corpora, mixed by weight per step."""
    eval: str | list[Corpus] | None = None
    """Evaluation data, same forms as ``train``; a list of ``{path, language, task, name}`` sets is
    decoded set by set in each one's language and reported per set (``eval/NAME/wer``), per language
    (``eval/lang/LANG/wer``) and in total (``wer``, from the summed error counts)."""
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
    """Label sequences longer than this many tokens are dropped; Whisper's decoder has 448 positions.
    Eval references too (counted as skips): one over-long reference would dominate the WER."""
    max_train_samples: int | None = None
    """Use only the first N training samples (for quick runs)."""
    max_eval_samples: int | None = None
    """Use only the first N evaluation samples."""
    cache_dir: str | None = None
    """Preprocessing cache; defaults to $WHISPER_TOOLKIT_CACHE or ~/.cache/whisper-toolkit."""
    num_proc: int = 1
    """Decoding worker processes per rank during preprocessing."""
    num_workers: int = 1
    """DataLoader worker processes per rank (they decode the cached audio, and compute the log-mel
    features with ``features_on: workers``)."""
    features_on: Literal["device", "workers"] = "device"
    """Where log-mel features are computed: on the training device from 16-bit audio (the workers
    only decode and pad), or by the feature extractor in the DataLoader workers."""
    packing: bool = True
    """Training packs several clips, with 0.3 s silent gaps, into each 30 s window, their transcripts
    in order in one label (:mod:`toolkit.data.packing`), as Whisper itself was trained on windows of
    several segments. training.global_batch_size then counts windows; logs and results.json also
    report clips and audio hours. Evaluation is per clip. On by default: single-clip timestamp
    targets (one segment, then the end) taught tiny.en to stop closing segments in long-form
    windows (73-94% of windows kept timestamps over 3 seeds, against 100% packed; README)."""
    timestamp_probability: float = 0.5
    """Share of training samples whose label carries segment timestamps (``<|0.00|> text <|3.42|>...``)
    instead of ``<|notimestamps|>``, drawn per sample from (seed, stream position); it keeps the
    model's timestamp prediction, which long-form transcription needs. 0 trains without timestamps.
    Segment times come from packed windows, a manifest's ``segments`` column, or a clip's speech bounds."""
    condition_on_prev_probability: float = 0.2
    """Share of training samples whose label starts with the previous utterance's text as a
    ``<|startofprev|>`` prompt (capped at half the decoder context, not in the loss): the preceding
    packed window, or the preceding clip of the same recording (a manifest's ``recording`` column,
    or the windows cut from one long recording). Samples with no known predecessor get no prompt."""
    fail_on_skip: bool = False
    """Abort instead of skipping when a sample is unreadable, corrupt, NaN/absurdly loud or has no transcript."""
    dedup: bool = False
    """Drop rows of a local source that repeat an earlier row: the same audio file (resolved path) with
    the same transcript (once stripped). They become skips (``duplicate``); off, they are kept and a
    warning gives their count. Both splits; Hub datasets are not checked."""
    streaming: bool = False
    """Stream ``data.train`` (a Hub id, or a local directory that ``datasets.load_dataset`` reads) with no
    preprocessing and no prepare step: each rank reads its share (``split_dataset_by_node``), shuffled in
    blocks of ``stream_block`` rows, the file order reshuffled every epoch. Resume is exact at the same
    world size only (README, streaming). Trains on single clips (no packing), without previous-text prompts."""
    stream_block: int = 1000
    """Streaming: rows shuffled together in memory; a resume re-reads at most one block per rank."""
    shard_cache_gb: float = 100.0
    """Remote prepared shards (``toolkit prepare``) are cached under ``cache_dir``/shards up to this size."""

    def validate(self) -> None:
        if not self.train and not self.eval:
            raise ConfigError("data.train or data.eval must be set")
        for key in ("train", "eval"):
            if isinstance(getattr(self, key), list):
                check_corpora(f"data.{key}", getattr(self, key), named=key == "eval")
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
        if self.streaming and (not isinstance(self.train, str) or self.max_train_samples is not None):
            raise ConfigError("data.streaming reads one data.train (a Hub id or a local dataset directory), without "
                              "data.max_train_samples; for several corpora, `toolkit prepare` each and list them")
        if self.stream_block < 1:
            raise ConfigError(f"data.stream_block must be >= 1, got {self.stream_block}")
        if self.shard_cache_gb <= 0:
            raise ConfigError(f"data.shard_cache_gb must be > 0, got {self.shard_cache_gb}")
        if not self.text_column:
            raise ConfigError("data.text_column must not be empty")
        for key in ("timestamp_probability", "condition_on_prev_probability"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"data.{key} must be in [0, 1], got {getattr(self, key)}")

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
    batch (global / world size); a number above the per-process batch is lowered to it, with a warning.
    On out-of-memory every process halves it together and accumulation doubles, so the global batch is
    unchanged (see ``toolkit/training/finder.py``)."""
    probe_micro_batch: bool | None = None
    """Before the first step, find the largest micro-batch that fits on a worst-case batch (30 s
    clips, the longest label). Default (null): on when micro_batch_size is ``auto``. Skipped on resume:
    the size found is kept in the checkpoint."""
    learning_rate: float = 1e-5
    """Peak learning rate (positive)."""
    lr_scheduler: Literal["linear", "constant"] = "linear"
    """Linear decay to zero after warm-up, or constant after warm-up."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up; more than ``max_steps`` is lowered to ``max_steps``, with a warning."""
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
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    """Recompute activations in the backward pass to save memory (about a third more compute).
    ``auto``: only when the memory planner expects the largest micro-batch not to fit without it."""
    compile: bool = False
    """Compile each encoder and decoder layer with ``torch.compile`` (in place, so checkpoint keys do
    not change; each new micro-batch shape compiles once). Off by default: on the 2-core CPU machine
    it made steps slower (see the README's speed section). Not with DeepSpeed ZeRO-3."""
    seed: int = 42
    """Seed for initialisation, data order and dropout, in [0, 2**32) (what numpy accepts)."""
    log_every: int = 10
    """Optimizer steps between metric lines."""
    save_every: int = 0
    """Optimizer steps between checkpoints; 0 saves only at the end."""
    max_nonfinite_steps: int = 3
    """Consecutive steps with a non-finite loss or gradient norm (each skipped, its samples recorded in
    ``skipped.jsonl``) after which the run stops with exit 5; the newest checkpoint is then known good."""
    resume: Literal["auto", "force"] = "auto"
    """``auto`` resumes from the newest valid checkpoint of ``output.dir`` only if what defines the
    optimisation (data, global batch, lr schedule, seed, model) is unchanged; ``force`` resumes anyway
    and records the change."""

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
        if self.max_nonfinite_steps < 1:
            raise ConfigError(f"training.max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")
        if self.global_batch_size <= 0:
            raise ConfigError(f"training.global_batch_size must be positive, got {self.global_batch_size}")
        if self.micro_batch_size == "auto":
            pass
        elif self.micro_batch_size <= 0:
            raise ConfigError(f"training.micro_batch_size must be positive or auto, got {self.micro_batch_size}")
        # Written as `not x > 0`, not `x <= 0`: NaN fails every comparison, and must fail the check
        # (recipes cannot hold NaN, see toolkit.recipe, but a config built in code can).
        if not self.learning_rate > 0:
            raise ConfigError(f"training.learning_rate must be positive, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ConfigError(f"training.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"training.weight_decay must be >= 0, got {self.weight_decay}")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"training.{key} must be in [0, 1), got {getattr(self, key)}")
        if not self.adam_epsilon > 0:
            raise ConfigError(f"training.adam_epsilon must be positive, got {self.adam_epsilon}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"training.max_grad_norm must be positive or null, got {self.max_grad_norm}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"training.seed must be in [0, 2**32), got {self.seed}")
        if self.log_every <= 0:
            raise ConfigError(f"training.log_every must be positive, got {self.log_every}")
        if self.save_every < 0:
            raise ConfigError(f"training.save_every must be >= 0, got {self.save_every}")

    def clamp(self, world_size: int) -> list[str]:
        """Lower the values documented as ceilings to what the run can use; one message per value.

        Warm-up longer than the run becomes the whole run, so that a short trial of a long recipe
        (``training.max_steps=3``) runs. It is stored, as the lr schedule reads ``warmup_steps``
        (and ``recipe.yaml`` then shows the warm-up that ran). A micro-batch above the per-process
        batch is only reported: :meth:`micro_batch_ceiling` applies it for each world size.
        """
        notes = []
        if self.warmup_steps > self.max_steps:
            notes.append(
                f"training.warmup_steps={self.warmup_steps} is more than training.max_steps={self.max_steps}: "
                f"warming up over all {self.max_steps} steps"
            )
            self.warmup_steps = self.max_steps
        per_rank = self.global_batch_size // world_size
        if self.micro_batch_size != "auto" and self.micro_batch_size > per_rank:
            notes.append(
                f"training.micro_batch_size={self.micro_batch_size} is more than the {per_rank} samples per process "
                f"(training.global_batch_size={self.global_batch_size} over {world_size} process(es)): using {per_rank}"
            )
        return notes


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
    """Generation length limit (tokens after the prompt); lowered to 1.5x the longest reference + 8
    tokens when that is less (one looping hypothesis would run its whole batch to the limit)."""
    num_beams: int = 1
    """1 is greedy decoding."""
    static_cache: bool = False
    """Decode with a static KV cache; on CUDA, transformers then compiles the decoding step (once per
    eval batch shape). No gain on the CPU machine, where the encoder dominates (README, speed)."""
    long_form: bool = False
    """The eval set holds long recordings (any length, the whole transcript each), transcribed with
    sequential long-form decoding: 30 s windows guided by timestamps, each prompted with the previous
    text (toolkit.evaluation.longform); it also reports the windows without timestamps."""
    temperature_fallback: bool = False
    """Long-form only: Whisper's temperature fallback (a window that loops or is unlikely is decoded
    again at temperatures 0.2 to 1.0) and its no-speech skipping."""

    guard: list[GuardSet] = field(default_factory=list)
    """Regression guard: extra eval sets (``[{name, data, kind, weight, max_rise}]``) evaluated at every
    evaluation, each reporting WER, insertion and repetition rates (and for long-form sets the share of
    windows with valid timestamps)."""

    def validate(self) -> None:
        names = [g.name for g in self.guard]
        for index, guard in enumerate(self.guard):
            guard.validate(f"evaluation.guard[{index}]")
        if len(set(names)) != len(names):
            raise ConfigError(f"evaluation.guard: names must differ, got {', '.join(names)}")
        if self.temperature_fallback and not (self.long_form or any(g.kind == "long_form" for g in self.guard)):
            raise ConfigError("evaluation.temperature_fallback needs evaluation.long_form (or a long_form guard set)")
        if self.long_form and self.static_cache:
            raise ConfigError("evaluation.static_cache is for short-form decoding; long_form decodes with a dynamic cache")
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
    """Output directory: checkpoints/, final/, metrics.jsonl, results.json, skipped.jsonl, tensorboard/.
    Checked at load: a directory, or one that can be created, writable by this user."""
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
        check_writable_dir("output.dir", self.dir)
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

    def validate(self, *, for_training: bool = True, launch: LaunchInfo | None = None) -> list[str]:
        """Refuse what cannot run (:class:`ConfigError`); return one message per value lowered to its
        ceiling (:meth:`TrainingConfig.clamp`). ``launch`` defaults to what the launcher asked for."""
        launch = launch or LaunchInfo.from_env()
        self.model.validate()
        self.data.validate()
        self.evaluation.validate()
        self.lora.validate()
        check_combinations(self, launch)
        if not for_training:
            return []
        if not self.data.train:
            raise ConfigError("data.train is required for training")
        self.training.validate()
        self.output.validate()
        if self.output.final_model == "best" and not (self.data.eval and self.evaluation.every_steps):
            raise ConfigError("output.final_model=best needs data.eval and evaluation.every_steps > 0")
        # Here, not when the batch plan is made: that is after the model has loaded and the data decoded.
        world, global_batch = launch.world_size, self.training.global_batch_size
        if global_batch % world:
            raise ConfigError(
                f"training.global_batch_size={global_batch} cannot be split evenly over {world} processes; "
                f"use a multiple of {world}"
            )
        return self.training.clamp(world)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None, overrides: list[str] | None = None, *, for_training: bool = True) -> RunConfig:
    """Read a YAML recipe, apply ``section.key=value`` overrides, validate the result, and log what
    validation clamped (on the main process only: every rank loads the recipe)."""
    raw = read_recipe(path) if path is not None else {}
    for item in overrides or []:
        apply_override(raw, item)
    config: RunConfig = build_dataclass(RunConfig, raw, prefix="")
    notes = config.validate(for_training=for_training)
    if notes and int(os.environ.get("RANK", "0")) == 0:
        for note in notes:
            logger.warning(note)
    return config


def dump_config(config: RunConfig) -> str:
    """The recipe as YAML, as written into checkpoints and model cards."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
