"""The planner's advice: which mode to run, what to change when none fits, and what to tell a run
that ran out of memory at micro-batch 1.

:func:`recommend` picks the fastest mode that fits; :func:`suggestion` and
:func:`faster_with_more_gpus` try other scenarios (a smaller micro-batch, checkpointing, more GPUs).
The training loop's last word on an out-of-memory error at micro-batch 1 is
:func:`advice_at_micro_batch_one`, for this run's mode (:func:`current_mode`) and card
(:func:`device_memory`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from toolkit.launch import LaunchInfo
from toolkit.memory.estimate import GIB, Estimate, estimate_modes
from toolkit.memory.modes import MODE_NAMES, find_mode, get_mode, launch_config
from toolkit.memory.scenario import Scenario
from toolkit.memory.sizes import PlanError

if TYPE_CHECKING:
    import torch

    from toolkit.launch import LaunchInfo


def recommend(estimates: list[Estimate], gpu_memory: int) -> Estimate | None:
    """The fastest mode that fits (:data:`MODES <toolkit.memory.modes.MODES>` order), or None."""
    rank = {name: i for i, name in enumerate(MODE_NAMES)}
    fitting = [e for e in estimates if e.fits(gpu_memory)]
    return min(fitting, key=lambda e: rank[e.mode]) if fitting else None


def _best(scenario: Scenario, gpu_memory: int) -> Estimate | None:
    """The fastest mode that fits in ``scenario``, or None."""
    return recommend(estimate_modes(scenario), gpu_memory)


def suggestion(scenario: Scenario, gpu_memory: int) -> str:
    """What to change when nothing fits: a smaller micro-batch, checkpointing, or more GPUs."""
    ideas = []
    b = scenario.micro_batch // 2
    while b >= 1:
        best = _best(scenario.but(micro_batch=b), gpu_memory)
        if best:
            ideas.append(f"--micro-batch {b} ({best.mode}, {best.total / GIB:.1f} GiB; the global batch stays, "
                         "accumulation grows)")
            break
        b //= 2
    if not scenario.gradient_checkpointing:
        best = _best(scenario.but(gradient_checkpointing=True), gpu_memory)
        if best:
            ideas.append(f"gradient checkpointing ({best.mode}, {best.total / GIB:.1f} GiB)")
    # More GPUs lower only the sharded ZeRO states; the offload and LoRA modes, which do not shard,
    # are smaller still, so this rarely helps when nothing fits (it does when it is about speed:
    # see faster_with_more_gpus).
    for more in (2 * scenario.gpus, 4 * scenario.gpus, 8 * scenario.gpus):
        best = _best(scenario.but(gpus=more), gpu_memory)
        if best:
            ideas.append(f"--gpus {more} ({best.mode}, {best.total / GIB:.1f} GiB per GPU)")
            break
    if not ideas:
        return "no smaller micro-batch or up to 8x the GPUs makes any mode fit: use GPUs with more memory"
    return "try " + ", or ".join(ideas)


def faster_with_more_gpus(scenario: Scenario, gpu_memory: int, best: Estimate) -> str | None:
    """A faster mode that fits with 2x, 4x or 8x the GPUs (ZeRO shards the states), if any."""
    rank = MODE_NAMES.index(best.mode)
    for more in (2 * scenario.gpus, 4 * scenario.gpus, 8 * scenario.gpus):
        other = _best(scenario.but(gpus=more), gpu_memory)
        if other and MODE_NAMES.index(other.mode) < rank:
            return f"with --gpus {more}, {other.mode} fits ({other.total / GIB:.2f} GiB per GPU) and is faster"
    return None


def current_mode(method: str, quantization: str, optimizer: str, launch: LaunchInfo) -> str:
    """This run's mode, in the names of ``python -m toolkit plan``: the catalogue's mode with its settings."""
    if method == "lora":
        # LoRA is estimated under DDP whatever the launcher; without quantisation the base is 16-bit.
        return find_mode(trainable="lora", base=quantization if quantization in ("int8", "nf4") else "bf16").name
    if launch.deepspeed:
        return find_mode(trainable="full", sharding="zero3" if launch.zero_stage == 3 else "zero2",
                         offloaded=launch.offload_optimizer or launch.offload_params).name
    return find_mode(trainable="full", sharding="none", optimizer="adamw8bit" if optimizer == "adamw8bit" else "adamw").name


def device_memory(device: torch.device) -> int:
    """Memory one process may use: the GPU's, or on CPU the host's share per local process."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    import psutil

    return int(psutil.virtual_memory().total // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def advice_at_micro_batch_one(
    model_config: Any, mode: str, gpus: int, label_tokens: int, gradient_checkpointing: bool, memory: int
) -> str:
    """Which modes the planner expects to fit ``memory`` at micro-batch 1, for the error that ends the run."""
    command = f"python -m toolkit plan --model MODEL --gpu-memory {memory / GIB:.0f}GiB --gpus {gpus}"
    try:
        scenario = Scenario.of(model_config, gpus=gpus, micro_batch=1, label_tokens=label_tokens,
                               gradient_checkpointing=True)
        estimates = estimate_modes(scenario)
    except PlanError as exc:  # pragma: no cover - a config the planner cannot read
        return f"the planner cannot estimate this model ({exc}); see `{command}`"
    fitting = [e for e in estimates if e.mode != mode and e.fits(memory)]
    tips = [] if gradient_checkpointing else ["turn on training.gradient_checkpointing=true"]
    if fitting:
        listed = "; ".join(
            f"{e.mode} (~{e.total / GIB:.1f} GiB: {get_mode(e.mode).recipe} with "
            f"{launch_config(get_mode(e.mode), gpus)})" for e in fitting
        )
        tips.append(f"modes that `plan` expects to fit {memory / GIB:.1f} GiB at micro-batch 1: {listed}")
    else:
        tips.append(f"`plan` finds no mode that fits {memory / GIB:.1f} GiB at micro-batch 1: "
                    + suggestion(scenario, memory))
    return "; ".join(tips) + f" (full table: `{command}`)"


def advice_for_run(config: Any, model_config: Any, world: int, label_tokens: int, device: Any) -> str:
    """:func:`advice_at_micro_batch_one` for a training run's recipe (a ``RunConfig``) on ``device``."""
    training = config.training
    mode = current_mode(training.method, config.model.quantization, training.optimizer, LaunchInfo.from_env())
    return advice_at_micro_batch_one(model_config, mode, world, label_tokens, training.gradient_checkpointing,
                                     device_memory(device))


def checkpointing_needed(config: Any, world: int, device: Any) -> bool:
    """``training.gradient_checkpointing: auto``: whether the planner expects this run's mode, at its
    largest micro-batch and the longest label, to exceed ``device``'s memory without checkpointing.

    Checkpointing recomputes the forward in the backward (about a third more compute), so it is
    turned on only when it is needed. A model the planner cannot read keeps it on (the safe side).
    """
    from toolkit.memory.estimate import estimate

    training = config.training
    mode = current_mode(training.method, config.model.quantization, training.optimizer, LaunchInfo.from_env())
    try:
        scenario = Scenario.of(config.model.name_or_path, gpus=world, micro_batch=training.micro_batch_ceiling(world),
                               label_tokens=config.data.max_label_tokens, gradient_checkpointing=False)
        return not estimate(mode, scenario).fits(device_memory(device))
    except PlanError:
        return True
