"""What the launcher asked for (world size, DeepSpeed stage and offload), read before any process group.

``accelerate launch`` passes its configuration to the processes in ``ACCELERATE_*`` variables; the
DeepSpeed stage lives either there or in the DeepSpeed JSON the launch config points to. Recipe
validation uses this to refuse combinations that cannot work (a quantised base under ZeRO) at
load time, with a message, instead of deep inside DeepSpeed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from toolkit.recipe import ConfigError

if TYPE_CHECKING:
    from toolkit.config import RunConfig


@dataclass(frozen=True)
class LaunchInfo:
    world_size: int = 1
    deepspeed: bool = False
    zero_stage: int | None = None
    offload_optimizer: bool = False
    offload_params: bool = False

    @property
    def description(self) -> str:
        if not self.deepspeed:
            return "DDP" if self.world_size > 1 else "a single process"
        offload = [name for name, on in (("optimizer", self.offload_optimizer), ("parameters", self.offload_params)) if on]
        return f"DeepSpeed ZeRO-{self.zero_stage}" + (f" with {' and '.join(offload)} offload" if offload else "")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LaunchInfo:
        env = os.environ if env is None else env
        world_text = env.get("WORLD_SIZE", "1")
        if not world_text.isdigit() or int(world_text) < 1:
            raise ConfigError(f"WORLD_SIZE={world_text!r} (set by the launcher) must be a positive integer")
        world = int(world_text)
        if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
            return cls(world_size=world)
        ds: dict = {}
        config_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if config_file and config_file != "none" and Path(config_file).is_file():
            try:
                loaded = json.loads(Path(config_file).read_text())
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ConfigError(f"DeepSpeed config {config_file} is not valid JSON: {exc}") from exc
            if not isinstance(loaded, dict):
                raise ConfigError(f"DeepSpeed config {config_file} must be a JSON object")
            ds = loaded.get("zero_optimization") or {}
        stage = ds.get("stage", env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"))

        def offloaded(key: str, env_key: str) -> bool:
            device = (ds.get(key) or {}).get("device", env.get(env_key, "none"))
            return str(device).lower() not in ("none", "")

        return cls(
            world_size=world,
            deepspeed=True,
            zero_stage=int(stage) if stage not in (None, "", "auto") else None,
            offload_optimizer=offloaded("offload_optimizer", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"),
            offload_params=offloaded("offload_param", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"),
        )


def check_combinations(config: RunConfig, launch: LaunchInfo) -> None:
    """Refuse mode combinations of ``config`` that cannot run under ``launch``, saying what to use instead."""
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
