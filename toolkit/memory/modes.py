"""The training modes the planner compares, as data: one frozen :class:`Mode` per way to train.

Each mode says how the model states are held (sharding, offload, the dtype of the frozen base,
the optimizer, what is trained) and how to run it (recipe keys, launch config). The estimates
branch on these fields only, never on a mode's name. :data:`MODES` is ordered fastest first; the
reasons are written next to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from toolkit.memory.sizes import PlanError

Sharding = Literal["none", "zero2", "zero3"]
"""``none``: every GPU holds all model states (DDP); ``zero2``/``zero3``: DeepSpeed ZeRO stage 2 or 3."""
Offload = Literal["none", "optimizer", "optimizer+params"]
"""What DeepSpeed keeps in host memory instead of on the GPU."""
BaseDtype = Literal["fp32", "bf16", "int8", "nf4"]
"""How the weights are stored: the master weights for full fine-tuning, the frozen base for LoRA."""
Optimizer = Literal["adamw", "adamw8bit"]
Trainable = Literal["full", "lora"]
"""``full`` trains every weight; ``lora`` trains adapters on a frozen base."""

COMMON_KEYS = "training.mixed_precision=bf16 training.gradient_checkpointing=true"
"""Recipe keys every mode runs with (besides the micro-batch)."""


@dataclass(frozen=True)
class Mode:
    """One way to train, as the planner estimates it and as a recipe and launch config run it."""

    name: str
    """What ``plan`` calls it: the table's first column, the JSON's ``mode``."""
    sharding: Sharding
    offload: Offload
    base: BaseDtype
    optimizer: Optimizer
    trainable: Trainable
    recipe: str
    """Recipe overrides beyond the common ones (micro-batch, bf16, gradient checkpointing)."""
    launch: str
    """Launch config; ``{ddp}`` stands for 1gpu.yaml or multi_gpu.yaml by the number of GPUs."""
    summary: str
    """One line for the recommendation."""

    def __post_init__(self) -> None:
        for key, kind in (("sharding", Sharding), ("offload", Offload), ("base", BaseDtype),
                          ("optimizer", Optimizer), ("trainable", Trainable)):
            if getattr(self, key) not in get_args(kind):
                raise PlanError(f"mode {self.name}: {key} must be one of {get_args(kind)}, got {getattr(self, key)!r}")
        problem = self._unsupported()
        if problem:
            raise PlanError(f"mode {self.name}: {problem}")

    def _unsupported(self) -> str | None:
        """Why the estimates (``toolkit.memory.states``) have no formula for these fields, or None."""
        if self.deepspeed and (self.trainable, self.base, self.optimizer) != ("full", "bf16", "adamw"):
            # DeepSpeed's estimators assume full fine-tuning of a bf16 model with (CPU) Adam; the
            # toolkit refuses a quantised base under ZeRO (toolkit.config).
            return "a DeepSpeed mode is full fine-tuning of a bf16 model with adamw"
        if self.offloaded and not self.deepspeed:
            return "only DeepSpeed offloads"
        if self.offloaded and self.offload != {"zero2": "optimizer", "zero3": "optimizer+params"}[self.sharding]:
            # ZeRO-2 cannot offload parameters; ZeRO-3 offload is estimated (and launched) with both.
            return "ZeRO-2 offloads the optimizer states, ZeRO-3 the optimizer states and parameters"
        if not self.deepspeed and self.trainable == "full" and self.base != "fp32":
            return "full fine-tuning under DDP keeps fp32 master weights"
        if self.trainable == "lora" and (self.base == "fp32" or self.optimizer != "adamw"):
            return "LoRA is estimated on a bf16, int8 or nf4 base with adamw for the adapters"
        return None

    @property
    def deepspeed(self) -> bool:
        """Run by DeepSpeed (ZeRO), which casts the model to bf16, rather than DDP under autocast."""
        return self.sharding != "none"

    @property
    def offloaded(self) -> bool:
        """Some model states live in host memory."""
        return self.offload != "none"

    @property
    def quantized(self) -> bool:
        """The frozen base is a bitsandbytes format (int8 or NF4)."""
        return self.base in ("int8", "nf4")


# Fastest first. The order is a preference, not a measurement:
# 1. full: plain DDP, fused AdamW, one all-reduce per step; nothing is faster.
# 2. full-adamw8bit: the same step; the 8-bit update (dequantise, update, requantise) costs a few
#    percent of the step at most.
# 3. zero2: gradients reduce-scattered and weights all-gathered: DDP's traffic, plus DeepSpeed's
#    engine overhead; the same full fine-tuning in bf16 weights.
# 4. zero3: also gathers every layer's weights in the forward and again in the backward (1.5x the
#    traffic of ZeRO-2, per-module hooks), slower still, but it is full fine-tuning.
# 5. lora: per step LoRA is as fast as full fine-tuning or faster (no weight gradients for the
#    frozen base), but it trains 1-2% of the weights: a different result, so every full
#    fine-tuning mode that fits on the GPU comes first.
# 6./7. zero2-offload, zero3-offload: full fine-tuning whose AdamW runs on the CPU (DeepSpeedCPUAdam)
#    and whose gradients (ZeRO-3: and weights) cross PCIe every step: often 2-5x slower than on the
#    GPU, so LoRA goes before them.
# 8./9. lora-int8, qlora-nf4: LoRA whose every matmul dequantises its weights (LLM.int8 with outlier
#    decomposition is the slowest kernel of all; NF4 dequantises per call): the smallest footprint
#    and the slowest steps; int8 is kept before NF4 because it loses less precision.
MODES: tuple[Mode, ...] = (
    Mode("full", sharding="none", offload="none", base="fp32", optimizer="adamw", trainable="full",
         recipe="training.method=full", launch="{ddp}", summary="DDP, fp32 master weights, AdamW"),
    Mode("full-adamw8bit", sharding="none", offload="none", base="fp32", optimizer="adamw8bit", trainable="full",
         recipe="training.optimizer=adamw8bit", launch="{ddp}",
         summary="DDP, fp32 weights, bitsandbytes 8-bit AdamW"),
    Mode("zero2", sharding="zero2", offload="none", base="bf16", optimizer="adamw", trainable="full",
         recipe="training.method=full", launch="ds_zero2.yaml",
         summary="DeepSpeed ZeRO-2: states and gradients sharded"),
    Mode("zero3", sharding="zero3", offload="none", base="bf16", optimizer="adamw", trainable="full",
         recipe="training.method=full", launch="ds_zero3.yaml", summary="DeepSpeed ZeRO-3: weights sharded too"),
    Mode("lora", sharding="none", offload="none", base="bf16", optimizer="adamw", trainable="lora",
         recipe="training.method=lora", launch="{ddp}", summary="LoRA adapters on a frozen 16-bit base"),
    Mode("zero2-offload", sharding="zero2", offload="optimizer", base="bf16", optimizer="adamw", trainable="full",
         recipe="training.method=full", launch="ds_zero2_offload.yaml",
         summary="ZeRO-2, optimizer states on the CPU"),
    Mode("zero3-offload", sharding="zero3", offload="optimizer+params", base="bf16", optimizer="adamw",
         trainable="full", recipe="training.method=full", launch="ds_zero3_offload.yaml",
         summary="ZeRO-3, weights and optimizer on the CPU"),
    Mode("lora-int8", sharding="none", offload="none", base="int8", optimizer="adamw", trainable="lora",
         recipe="model.quantization=int8 training.method=lora", launch="{ddp}", summary="LoRA on an LLM.int8 base"),
    Mode("qlora-nf4", sharding="none", offload="none", base="nf4", optimizer="adamw", trainable="lora",
         recipe="model.quantization=nf4 training.method=lora", launch="{ddp}",
         summary="LoRA on an NF4 base (QLoRA)"),
)
MODE_NAMES = tuple(m.name for m in MODES)


def get_mode(name: str) -> Mode:
    """The mode called ``name``."""
    for m in MODES:
        if m.name == name:
            return m
    raise PlanError(f"unknown mode {name!r}; modes: {', '.join(MODE_NAMES)}")


def find_mode(**fields: object) -> Mode:
    """The fastest mode whose fields (or properties, e.g. ``offloaded=True``) have the given values."""
    for m in MODES:
        if all(getattr(m, key) == value for key, value in fields.items()):
            return m
    wanted = ", ".join(f"{key}={value}" for key, value in fields.items())
    raise PlanError(f"no mode has {wanted}; modes: {', '.join(MODE_NAMES)}")


def launch_config(m: Mode, gpus: int) -> str:
    """The ``accelerate launch --config_file`` argument that runs ``m`` on ``gpus`` GPUs."""
    ddp = "1gpu.yaml" if gpus == 1 else f"multi_gpu.yaml --num_processes {gpus}"
    file = m.launch.format(ddp=ddp)
    if m.deepspeed:  # the DeepSpeed launch configs default to 8 processes
        file += f" --num_processes {gpus}"
    return f"launch_configs/{file}"
