"""Memory planner: peak GPU memory of each training mode for a Whisper model, from its config alone.

``python -m toolkit plan --model large-v3 --gpu-memory 16GB`` estimates, per GPU and per mode
(DDP full fine-tuning, 8-bit AdamW, DeepSpeed ZeRO-2/3 with and without CPU offload, LoRA, LoRA on
an int8 base, QLoRA), the bytes of weights, gradients, optimizer states and activations, and
recommends the fastest mode that fits. No weights are loaded: parameter counts come from the model
built on the ``meta`` device, so they cannot drift from transformers' Whisper.

The modules, in the order they build on each other:

* :mod:`~toolkit.memory.sizes`: the official checkpoints' sizes and the config lookup (size, local
  directory or Hub id).
* :mod:`~toolkit.memory.params`: parameter counts (:class:`ModelStats`).
* :mod:`~toolkit.memory.modes`: the modes as data (:class:`Mode`: sharding, offload, base dtype,
  optimizer, what is trained), fastest first, with their recipe keys and launch configs.
* :mod:`~toolkit.memory.scenario`: the run an estimate is for (:class:`Scenario`).
* :mod:`~toolkit.memory.states` and :mod:`~toolkit.memory.activations`: the formulas, with the
  assumptions and sources (DeepSpeed's estimators, Korthikanti et al. 2022) in their docstrings.
* :mod:`~toolkit.memory.estimate`: their sum plus overhead, per mode (:class:`Estimate`).
* :mod:`~toolkit.memory.advice`: the recommendation, what to change when nothing fits, and the
  advice for a training run out of memory at micro-batch 1.
* :mod:`~toolkit.memory.report`: the ``plan`` command: options, table, JSON lines.

Everything is per GPU.
"""

from toolkit.memory.advice import (
    advice_at_micro_batch_one,
    current_mode,
    device_memory,
    recommend,
    suggestion,
)
from toolkit.memory.estimate import GIB, Estimate, estimate, estimate_modes
from toolkit.memory.modes import MODE_NAMES, MODES, Mode, find_mode, get_mode, launch_config
from toolkit.memory.params import ModelStats, load_stats
from toolkit.memory.report import add_arguments, parse_memory, run_cli
from toolkit.memory.scenario import Scenario
from toolkit.memory.sizes import SIZES, PlanError, resolve_config

__all__ = [
    "GIB", "MODES", "MODE_NAMES", "SIZES", "Estimate", "Mode", "ModelStats", "PlanError", "Scenario",
    "add_arguments", "advice_at_micro_batch_one", "current_mode", "device_memory", "estimate", "estimate_modes",
    "find_mode", "get_mode", "launch_config", "load_stats", "parse_memory", "recommend", "resolve_config",
    "run_cli", "suggestion",
]
