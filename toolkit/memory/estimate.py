"""Peak GPU memory of a mode in a scenario: model states + activations + overhead, as an :class:`Estimate`.

The overhead is the CUDA context and library workspaces (:data:`CUDA_CONTEXT_BYTES`) plus
allocator fragmentation (:data:`FRAGMENTATION` of the allocated peak). It is not part of
``torch.cuda.max_memory_allocated``; :attr:`Estimate.allocated` is the figure to compare with it.
The terms themselves are in :mod:`toolkit.memory.states` and :mod:`toolkit.memory.activations`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from toolkit.config import WHISPER_MAX_TARGET_POSITIONS
from toolkit.memory.activations import activations
from toolkit.memory.modes import COMMON_KEYS, MODES, Mode, get_mode, launch_config
from toolkit.memory.scenario import Scenario
from toolkit.memory.states import model_states

GIB = 2**30
CUDA_CONTEXT_BYTES = GIB // 2
"""CUDA context, cuBLAS/cuDNN workspaces and NCCL buffers: about 0.3-0.5 GiB on current GPUs."""
FRAGMENTATION = 0.05
"""Share of the allocated peak that the caching allocator reserves on top (reserved - allocated)."""

COMPONENTS = ("weights", "grads", "optimizer", "activations")


@dataclass
class Estimate:
    """Estimated peak memory of one mode on one GPU, in bytes, by component."""

    mode: str
    """The mode's name (:data:`toolkit.memory.modes.MODES`)."""
    weights: int
    grads: int
    optimizer: int
    activations: int
    overhead: int
    """CUDA context + allocator slack: on the card, but not in ``torch.cuda.max_memory_allocated``."""
    cpu: int = 0
    """Host memory for offloaded states (DeepSpeed's figure, per node)."""
    detail: dict[str, int] = field(default_factory=dict)
    gpus: int = 1
    micro_batch: int = 16
    label_tokens: int = WHISPER_MAX_TARGET_POSITIONS
    gradient_checkpointing: bool = True

    @property
    def allocated(self) -> int:
        """What ``torch.cuda.max_memory_allocated()`` should report at the peak."""
        return self.weights + self.grads + self.optimizer + self.activations

    @property
    def total(self) -> int:
        """What the card must hold: the allocated peak plus the overhead."""
        return self.allocated + self.overhead

    def fits(self, gpu_memory: int) -> bool:
        """The whole estimate, overhead included, fits a card of ``gpu_memory`` bytes."""
        return self.total <= gpu_memory

    def to_dict(self, gpu_memory: int | None = None) -> dict[str, Any]:
        """The JSON object of ``python -m toolkit plan --json`` (without the model's name)."""
        out: dict[str, Any] = {"mode": self.mode, "estimated_gib": round(self.total / GIB, 2)}
        if gpu_memory is not None:
            out["fits"] = self.fits(gpu_memory)
            out["gpu_memory_gib"] = round(gpu_memory / GIB, 2)
        for key in COMPONENTS + ("overhead", "cpu"):
            out[f"{key}_gib"] = round(getattr(self, key) / GIB, 3)
        out["allocated_gib"] = round(self.allocated / GIB, 3)
        m = get_mode(self.mode)
        out["recipe"] = f"{m.recipe} training.micro_batch_size={self.micro_batch} {COMMON_KEYS}"
        out["launch_config"] = launch_config(m, self.gpus)
        out.update(gpus=self.gpus, micro_batch=self.micro_batch, label_tokens=self.label_tokens,
                   gradient_checkpointing=self.gradient_checkpointing)
        out["bytes"] = {key: getattr(self, key) for key in COMPONENTS + ("overhead", "cpu")}
        out["detail"] = dict(self.detail)
        return out


def estimate(mode: Mode | str, scenario: Scenario) -> Estimate:
    """Peak GPU memory of ``mode`` (a :class:`Mode` or its name) in ``scenario``.

    Compare :attr:`Estimate.allocated` with ``torch.cuda.max_memory_allocated()`` of a real step
    (after at least two optimizer steps, so that optimizer states exist), and
    :attr:`Estimate.total` with the card.
    """
    m = get_mode(mode) if isinstance(mode, str) else mode
    states, cpu, detail = model_states(m, scenario)
    acts, parts = activations(m, scenario)
    allocated = sum(states.values()) + acts
    overhead = CUDA_CONTEXT_BYTES + int(FRAGMENTATION * allocated)
    detail.update({f"act_{k}": v for k, v in parts.items()})
    return Estimate(
        mode=m.name, weights=states["weights"], grads=states["grads"], optimizer=states["optimizer"],
        activations=acts, overhead=overhead, cpu=cpu, detail=detail, gpus=scenario.gpus,
        micro_batch=scenario.micro_batch, label_tokens=scenario.label_tokens,
        gradient_checkpointing=scenario.gradient_checkpointing,
    )


def estimate_modes(scenario: Scenario) -> list[Estimate]:
    """An :class:`Estimate` per mode, fastest mode first."""
    return [estimate(m, scenario) for m in MODES]
