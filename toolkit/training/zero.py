"""DeepSpeed ZeRO-2/3 (and CPU offload) under the toolkit's own loop.

Launched with ``launch_configs/ds_*.yaml`` (``multi_node_zero*.yaml`` across nodes), accelerate wraps
the model in a DeepSpeed engine. The loop stays the same; this module holds what differs (checked
with accelerate 1.15, DeepSpeed 0.19):

* **"auto" values.** accelerate fills ``train_micro_batch_size_per_gpu`` from a *prepared train
  DataLoader*; the loop prepares none (its sampler is step-addressed), so :func:`fill_config` writes
  micro-batch, accumulation, ``train_batch_size`` (= global batch) and ``gradient_clipping`` from the
  recipe's :class:`~toolkit.training.batching.BatchPlan` into the plugin's config before ``prepare``.
  ``fp16``/``bf16.enabled`` are filled by accelerate itself from ``Accelerator(mixed_precision=...)``,
  i.e. the recipe. A number written into the JSON that disagrees with the recipe is a ConfigError.
* **Backward and step.** ``engine.backward`` divides the loss by ``gradient_accumulation_steps``
  (our loss is already normalised over the whole global step, see ``step.py``), and accelerate's
  ``accelerator.backward`` calls ``engine.step()`` whenever ``sync_gradients`` is true, which it
  always is outside ``accelerator.accumulate``. :func:`backward` therefore passes
  ``scale_wrt_gas=False`` and marks only the step's last micro-batch as the accumulation boundary:
  DeepSpeed then reduces (ZeRO-2/3 average over ranks as DDP does), clips, steps the optimizer and
  zeroes the gradients exactly once per global step, inside that last backward. The optimizer
  wrapper's ``step``/``zero_grad`` are no-ops under DeepSpeed.
* **Clipping.** DeepSpeed clips inside ``engine.step()`` (``gradient_clipping``, 0 = off);
  ``accelerator.clip_grad_norm_`` only returns ``engine.get_global_grad_norm()``, the pre-clip norm
  of the last step, which is what :func:`grad_norm` reports.
* **Scheduler.** The toolkit's LambdaLR is never given to ``prepare``, so DeepSpeed does not own or
  step it; the loop steps it once per optimizer step, as under DDP. ZeRO wraps the torch AdamW and
  steps it, so the schedule reaches it directly. With optimizer offload accelerate swaps the AdamW
  for ``DeepSpeedCPUAdam(adamw_mode=True)`` built from the same param groups (lr, betas, eps and
  weight decay carry over); :func:`ensure_scheduler_drives` moves the schedule onto that optimizer.
* **Checkpoints.** ``save_state`` makes every rank write DeepSpeed's own shards
  (``pytorch_model/``: module states, one optimizer partition per rank) into the directory it is
  given, so the temp-dir-then-rename of ``checkpoint.py`` works unchanged; ``load_state`` reads them
  back with ``engine.load_checkpoint`` (ZeRO-3 with torch AdamW resumes bit for bit; CPU Adam
  recomputes beta^t with pow() instead of its running product, a last-bit difference). They load
  only with the same stage and number of processes: :func:`check_resumable` says so up front.
* **ZeRO-3.** The parameters of the unwrapped module are partitioned (empty locally); its forward
  hooks gather them, so ``generate`` works on it, but every rank must take part in every forward:
  evaluation uses ``synced_gpus=True``. The final export gathers the full weights with
  ``accelerator.get_state_dict`` (a collective: ``stage3_gather_16bit_weights_on_model_save`` must
  be true, as in ``launch_configs/deepspeed/zero3*.json``); only rank 0 receives them.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from toolkit.config import ConfigError, TrainingConfig
from toolkit.training.batching import BatchPlan

logger = logging.getLogger(__name__)


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator: Accelerator) -> int | None:
    """The ZeRO stage of a DeepSpeed run, None without DeepSpeed."""
    if not is_deepspeed(accelerator):
        return None
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def fill_config(accelerator: Accelerator, plan: BatchPlan, cfg: TrainingConfig) -> dict[str, Any]:
    """Replace the recipe-dependent "auto" entries of the DeepSpeed config; call before ``prepare``."""
    plugin = accelerator.state.deepspeed_plugin
    config = plugin.deepspeed_config
    values: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.accumulation,
        "train_batch_size": plan.global_batch_size,
        "gradient_clipping": float(cfg.max_grad_norm) if cfg.max_grad_norm else 0.0,
    }
    recipe_key = {
        "train_micro_batch_size_per_gpu": "training.micro_batch_size",
        "gradient_accumulation_steps": "training.global_batch_size / micro_batch_size / processes",
        "train_batch_size": "training.global_batch_size",
        "gradient_clipping": "training.max_grad_norm",
    }
    for key, value in values.items():
        current = config.get(key, "auto")
        if current == "auto":
            config[key] = value
        elif float(current) != float(value):
            raise ConfigError(
                f"the DeepSpeed config sets {key}={current} but the recipe gives {value} ({recipe_key[key]}); "
                f'write "auto" for {key} in the DeepSpeed JSON: the recipe decides'
            )
    # accelerate otherwise warns that its own accumulation (1: the loop does not use accumulate())
    # differs from DeepSpeed's; the value only matters to accelerator.accumulate().
    accelerator.gradient_accumulation_steps = plan.accumulation
    if accelerator.mixed_precision != cfg.mixed_precision:
        raise ConfigError(
            f"the DeepSpeed config enables {accelerator.mixed_precision} but training.mixed_precision is "
            f'{cfg.mixed_precision}; write "auto" for fp16/bf16 "enabled" in the DeepSpeed JSON'
        )
    return values


def resize(accelerator: Accelerator, plan: BatchPlan) -> None:
    """Re-prepare the engine for a new micro-batch after an out-of-memory back-off.

    DeepSpeed fixes ``train_micro_batch_size_per_gpu`` and ``gradient_accumulation_steps`` when the
    engine is built; its own setters (what its elasticity uses) change both in place, keeping the
    ZeRO partitions and optimizer states. The plugin's config dict, which accelerate writes into
    checkpoints, follows.
    """
    engine = accelerator.deepspeed_engine_wrapped.engine
    engine.set_train_micro_batch_size(plan.micro_batch_size)
    engine.set_train_batch_size(plan.global_batch_size)
    if (engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()) != (
        plan.micro_batch_size, plan.accumulation
    ):  # pragma: no cover - a DeepSpeed change would land here
        raise RuntimeError("DeepSpeed did not take the new micro-batch/accumulation")
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = plan.micro_batch_size
    config["gradient_accumulation_steps"] = plan.accumulation
    accelerator.gradient_accumulation_steps = plan.accumulation


@contextlib.contextmanager
def full_weights_at_load(accelerator: Accelerator) -> Iterator[None]:
    """Under ZeRO-3, load the checkpoint whole on every rank; DeepSpeed partitions it in ``prepare``.

    accelerate 1.15 registers its DeepSpeed config with transformers whatever ``zero3_init_flag``
    says, and transformers 5 then builds every model inside ``deepspeed.zero.Init`` (parameters
    partitioned while ``from_pretrained`` runs). That breaks Whisper: its ``_init_weights`` calls
    ``sinusoids(*embed_positions.weight.shape)`` on the partitioned, empty weight (TypeError). So the
    registration is lifted while loading and restored after (``generate`` and ``save_pretrained``
    look at it). A whole Whisper (1.55 B parameters at most, 6.2 GB in fp32) fits in host memory per process.
    """
    if zero_stage(accelerator) != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


CHECKPOINT_SUBDIR = "pytorch_model"
"""Where ``accelerator.save_state`` has DeepSpeed write the engine's shards inside a checkpoint."""


def checkpoint_layout(directory: Path) -> tuple[int | None, int]:
    """(ZeRO stage, processes) that wrote a checkpoint; (None, 0) for a DDP/single-process one."""
    shards = directory / CHECKPOINT_SUBDIR
    if not shards.is_dir():
        return None, 0
    ranks = len(list(shards.glob("zero_pp_rank_*_optim_states.pt")))
    stage = 3 if any(shards.glob("zero_pp_rank_*_model_states.pt")) else 2
    return stage, ranks


def check_resumable(accelerator: Accelerator, directory: Path) -> None:
    """Refuse, with the fix, a checkpoint this launch cannot load.

    A ZeRO checkpoint holds one optimizer partition per process: DeepSpeed 0.19 loads it only with
    the same number of processes (and ZeRO-2 and ZeRO-3 shards differ); DDP and DeepSpeed
    checkpoints are not interchangeable either.
    """
    stage, ranks = checkpoint_layout(directory)
    now = zero_stage(accelerator)
    fix = "rerun with the launch config and --num_processes that wrote it, or use a new output.dir"
    if stage is None and now is None:
        return
    if stage is None:
        raise ConfigError(f"{directory} was written without DeepSpeed and cannot be resumed under ZeRO-{now}; {fix}")
    if now is None:
        raise ConfigError(f"{directory} holds DeepSpeed ZeRO-{stage} shards and cannot be resumed without DeepSpeed; {fix}")
    if (stage == 3) != (now == 3) or ranks != accelerator.num_processes:
        raise ConfigError(
            f"{directory} was written by ZeRO-{stage} on {ranks} processes; this run is ZeRO-{now} on "
            f"{accelerator.num_processes}; {fix}"
        )


SHARD_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
"""The plain data classes DeepSpeed 0.19 pickles into its shards besides tensors and containers."""


def _shard_classes() -> list[Any]:
    found = []
    for name in SHARD_CLASSES:
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # another DeepSpeed version: the scan then names what it meets
            continue
    return found


def check_shards_are_plain(directory: Path) -> None:
    """Refuse DeepSpeed shards that hold anything but tensors, containers and :data:`SHARD_CLASSES`.

    DeepSpeed unpickles its shards unrestricted (``weights_only`` off), so a shard replaced by a crafted
    pickle would run code on resume. Each shard is first read with ``weights_only=True`` (memory-mapped:
    no tensor data is read), which executes nothing and fails on any other object.
    """
    allowed = _shard_classes()
    for shard in sorted((directory / CHECKPOINT_SUBDIR).glob("*.pt")):
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # UnpicklingError, or a torn file
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else exc.__class__.__name__
            raise ConfigError(
                f"{shard} is not a plain DeepSpeed shard ({first}); refusing to let DeepSpeed unpickle it: "
                "resume from another checkpoint or a new output.dir"
            ) from None


def compute_dtype(accelerator: Accelerator) -> torch.dtype | None:
    """DeepSpeed casts the whole model to fp16/bf16 (no autocast): inputs must be cast to match."""
    if not is_deepspeed(accelerator):
        return None
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision)


def backward(accelerator: Accelerator, loss: torch.Tensor, last: bool) -> None:
    """One micro-batch's backward; the step's ``last`` one also reduces, clips and steps (see above)."""
    accelerator.deepspeed_engine_wrapped.backward(loss, sync_gradients=last, scale_wrt_gas=False)


def grad_norm(accelerator: Accelerator) -> float | None:
    """Global gradient norm (before clipping) of the optimizer step just taken."""
    norm = accelerator.deepspeed_engine_wrapped.get_global_grad_norm()
    return None if norm is None else float(norm)


def innermost_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer that finally applies the update (under accelerate's and ZeRO's wrappers)."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def ensure_scheduler_drives(scheduler: Any, optimizer: Any, cfg: TrainingConfig, build: Any) -> Any:
    """Return a scheduler bound to the torch optimizer that DeepSpeed steps.

    Without offload that is the toolkit's own AdamW (ZeRO wraps it): nothing to do. With optimizer
    offload accelerate builds a DeepSpeedCPUAdam from the AdamW's param-group dicts; the two share
    those dicts only until ``load_state`` (torch's ``Optimizer.load_state_dict`` installs new ones), so
    a schedule left on the AdamW would stop reaching the optimizer after a resume (the lr would freeze
    at its checkpointed value). ``build(optimizer, cfg)`` makes the same schedule on the right optimizer.
    """
    inner = innermost_optimizer(optimizer)
    if scheduler.optimizer is inner:
        return scheduler
    logger.info("DeepSpeed applies the update with %s; the lr schedule follows it", type(inner).__name__)
    return build(inner, cfg)
