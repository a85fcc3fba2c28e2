"""The training run an estimate is for: one :class:`Scenario` (model, GPUs, batch, LoRA settings).

Every estimate, recommendation and report takes a scenario instead of a row of loose arguments;
a scenario checks its settings when it is made, so an invalid one cannot reach the formulas.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from toolkit.config import WHISPER_MAX_TARGET_POSITIONS
from toolkit.memory.params import LINEAR_NAMES, LORA_DROPOUT, LORA_RANK, LORA_TARGETS, ModelStats, model_stats
from toolkit.memory.sizes import PlanError

Attention = Literal["sdpa", "eager"]
"""``sdpa``: transformers' default, whose kernels keep no score matrix; ``eager`` keeps it."""


@dataclass(frozen=True)
class Scenario:
    """A model and the settings of one training run, per GPU; validated on creation (:class:`PlanError`)."""

    stats: ModelStats
    gpus: int = 1
    """GPUs in all (one node)."""
    micro_batch: int = 16
    """Samples (30 s windows) per forward pass per GPU."""
    label_tokens: int = WHISPER_MAX_TARGET_POSITIONS
    """Label tokens per sample; the decoder's length, the worst case, by default."""
    gradient_checkpointing: bool = True
    attention: Attention = "sdpa"
    lora_rank: int = LORA_RANK
    lora_targets: tuple[str, ...] = LORA_TARGETS
    lora_dropout: float = LORA_DROPOUT

    def __post_init__(self) -> None:
        # The messages name the command line's options: that is where bad values come from.
        if self.lora_rank < 1:
            raise PlanError(f"--lora-rank must be >= 1, got {self.lora_rank}")
        if self.gpus < 1:
            raise PlanError(f"--gpus must be >= 1, got {self.gpus}")
        if self.micro_batch < 1:
            raise PlanError(f"--micro-batch must be >= 1, got {self.micro_batch}")
        if not 1 <= self.label_tokens <= self.stats.max_label_tokens:
            raise PlanError(f"--label-tokens must be in [1, {self.stats.max_label_tokens}], got {self.label_tokens}")
        if self.attention not in ("sdpa", "eager"):
            raise PlanError(f"attention must be sdpa or eager, got {self.attention!r}")
        unknown = [t for t in self.lora_targets if t not in LINEAR_NAMES]
        if unknown or not self.lora_targets:
            raise PlanError(f"LoRA targets must be among {', '.join(LINEAR_NAMES)}, "
                            f"got {', '.join(self.lora_targets) or 'none'}")

    @classmethod
    def of(cls, model: ModelStats | str | Any, **settings: Any) -> Scenario:
        """A scenario for a model given as :class:`ModelStats`, a ``WhisperConfig`` or a name/path."""
        return cls(model_stats(model), **settings)

    def but(self, **changes: Any) -> Scenario:
        """The same scenario with some settings changed (``scenario.but(micro_batch=4)``)."""
        return dataclasses.replace(self, **changes)

    @property
    def lora_params(self) -> int:
        """Adapter parameters for this scenario's LoRA rank and targets."""
        return self.stats.lora_params(self.lora_rank, self.lora_targets)
