"""Model states per GPU: the bytes of weights, gradients and optimizer states of each mode.

What each term assumes (P = all parameters, T = trainable ones, N = GPUs):

* DDP full fine-tuning (``sharding="none"``, ``trainable="full"``): fp32 master weights 4P, fp32
  gradients 4T (plus another 4T when N > 1: DDP's flat gradient buckets, ``gradient_as_bucket_view``
  being off), AdamW m and v 8T. ``optimizer="adamw8bit"``: bitsandbytes' AdamW8bit, 1 byte per
  moment plus an fp32 absmax per block of 256 values, and 8 bytes for tensors under
  ``min_8bit_size`` (4096 values).
* ZeRO: DeepSpeed's own estimators, ``estimate_zero2_model_states_mem_needs`` and
  ``estimate_zero3_model_states_mem_needs`` (deepspeed 0.19; :func:`zero2_model_states` and
  :func:`zero3_model_states` restate them, and a test compares); ZeRO-3 adds what they leave out,
  the bf16 weights that stay gathered (up to ``stage3_max_live_parameters`` of our JSONs).
* LoRA: the frozen base (16-bit as the toolkit loads it; int8 or NF4 linears with everything else
  in fp32 after ``peft.prepare_model_for_kbit_training``) plus fp32 adapters with fp32 gradients
  and AdamW states (16 bytes per adapter parameter).

See :func:`model_states`.
"""

from __future__ import annotations

from toolkit.memory.modes import Mode
from toolkit.memory.scenario import Scenario

LORA_BASE_BYTES = 2
"""``training.method=lora`` without quantisation loads the frozen base at the 16-bit compute dtype on a
GPU (``toolkit.modeling.load_dtype``). The activation profile still assumes an fp32 base under
autocast (fp32 residual stream), so the ``lora`` activation estimate errs on the high side."""
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
"""4 bits per weight, plus double quantisation (``bnb_4bit_use_double_quant=True`` in
``toolkit.adapters``): an 8-bit absmax per block of 64 weights and an fp32 absmax per 256 of those.
Without double quantisation it would be 0.5 + 4/64 = 0.5625."""
INT8_ROW_SCALE_BYTES = 4
"""LLM.int8 keeps an fp32 scale per output row (``SCB``) next to the int8 weights."""
ADAM8BIT_BLOCK = 256
"""Values per block of bitsandbytes' 8-bit optimizer states (one fp32 absmax each)."""
ZERO3_MAX_LIVE_PARAMETERS = 1_000_000_000
"""``stage3_max_live_parameters`` of ``launch_configs/deepspeed/zero3*.json``."""
DS_BUFFER_FACTOR = 1.5
"""DeepSpeed's ``additional_buffer_factor`` default, applied to its host-memory figures."""

StatesBytes = tuple[dict[str, int], int, dict[str, int]]
"""({weights, grads, optimizer} bytes on each GPU, host bytes of offloaded states, detail)."""


def zero2_model_states(total_params: int, gpus: int, cpu_offload: bool) -> tuple[int, int]:
    """(cpu, gpu) bytes: ``deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs``.

    GPU without offload: 2*P (bf16 weights) + 18*P/N (2 bf16 grads + 4 fp32 grads + 4 fp32 master
    weights + 8 fp32 Adam m, v, sharded). With optimizer offload: 2*P on the GPU, the rest on the CPU.
    One node (``num_gpus_per_node = gpus``); the CPU figure is per node with DeepSpeed's 1.5 buffer factor.
    """
    if cpu_offload:
        gpu = 2 * total_params
        cpu = total_params * max(4 * gpus, 16) * DS_BUFFER_FACTOR
    else:
        gpu = 2 * total_params + int(18 * total_params / gpus)
        cpu = total_params * 4 * gpus * DS_BUFFER_FACTOR
    return int(cpu), int(gpu)


def zero3_model_states(total_params: int, largest_layer_params: int, gpus: int, cpu_offload: bool) -> tuple[int, int]:
    """(cpu, gpu) bytes: ``deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs``.

    ``largest_layer_memory = 4 * largest_layer_params`` (the gathered layer's 16-bit weights and
    gradients). GPU without offload: that + 18*P/N; with parameter and optimizer offload
    (``cpu_offload_params=True``): that alone. ``zero_init=False``, as our launch configs set
    ``zero3_init_flag: false`` (every process first loads the whole model); one node; the CPU
    figure with DeepSpeed's 1.5 buffer factor.
    """
    largest_layer_memory = 4 * largest_layer_params
    if cpu_offload:
        gpu = largest_layer_memory
        cpu = total_params * max(4 * gpus, 18) * DS_BUFFER_FACTOR
    else:
        gpu = largest_layer_memory + int(18 * total_params / gpus)
        cpu = total_params * 4 * gpus * DS_BUFFER_FACTOR
    return int(cpu), int(gpu)


def model_states(mode: Mode, scenario: Scenario) -> StatesBytes:
    """({weights, grads, optimizer} bytes on each GPU, host bytes of offloaded states, detail)."""
    if mode.trainable == "lora":
        return _lora_states(mode, scenario)
    if mode.sharding == "zero2":
        return _zero2_states(mode, scenario)
    if mode.sharding == "zero3":
        return _zero3_states(mode, scenario)
    return _ddp_states(mode, scenario)


def _ddp_buckets(scenario: Scenario) -> int:
    """Bytes per trainable parameter of DDP's flat fp32 gradient buckets, a second copy of the gradients."""
    return 4 if scenario.gpus > 1 else 0


def _states(weights: float, grads: float, optimizer: float, cpu: float, detail: dict[str, int]) -> StatesBytes:
    """The figures as whole bytes, in :data:`StatesBytes`' shape."""
    return {"weights": int(weights), "grads": int(grads), "optimizer": int(optimizer)}, int(cpu), detail


def _ddp_states(mode: Mode, scenario: Scenario) -> StatesBytes:
    """Full fine-tuning under DDP: every GPU holds fp32 weights, gradients and the optimizer states."""
    stats = scenario.stats
    P, T = stats.total, stats.trainable
    buckets = _ddp_buckets(scenario)
    weights, grads = 4 * P, (4 + buckets) * T
    if mode.optimizer == "adamw":
        optimizer = 8 * T
    else:  # adamw8bit
        big = T - stats.small_tensors
        optimizer = int(big * (2 + 2 * 4 / ADAM8BIT_BLOCK)) + 8 * stats.small_tensors
    return _states(weights, grads, optimizer, 0, {"ddp_grad_buckets": buckets * T})


def _zero2_states(mode: Mode, scenario: Scenario) -> StatesBytes:
    """DeepSpeed ZeRO-2, optionally with the optimizer states offloaded to the CPU."""
    P, gpus, offload = scenario.stats.total, scenario.gpus, mode.offloaded
    cpu_bytes, gpu = zero2_model_states(P, gpus, offload)
    # DeepSpeed's total, split: bf16 weights 2P | gradients 6P/N (bf16 + fp32) | fp32 master + m + v 12P/N.
    weights = 2 * P
    grads = 0 if offload else int(6 * P / gpus)
    optimizer = gpu - weights - grads
    return _states(weights, grads, optimizer, cpu_bytes if offload else 0, {})


def _zero3_states(mode: Mode, scenario: Scenario) -> StatesBytes:
    """DeepSpeed ZeRO-3, optionally with weights and optimizer states offloaded to the CPU."""
    stats, gpus, offload = scenario.stats, scenario.gpus, mode.offloaded
    P = stats.total
    cpu_bytes, gpu = zero3_model_states(P, stats.largest_layer, gpus, offload)
    # DeepSpeed's total, split: 4 * largest layer + bf16 shard 2P/N | gradients 4P/N | fp32 master + m + v 12P/N.
    shard = 0 if offload else int(2 * P / gpus)
    weights = 4 * stats.largest_layer + shard
    grads = 0 if offload else int(4 * P / gpus)
    optimizer = gpu - weights - grads
    # Beyond DeepSpeed's estimate: with stage3_max_reuse_distance 1e9 (our JSONs), a gathered
    # parameter used again within 1e9 values is kept; with checkpointing every layer is used
    # again in its recompute, so up to stage3_max_live_parameters stay gathered in bf16.
    live = 2 * min(P, ZERO3_MAX_LIVE_PARAMETERS)
    detail = {"zero3_largest_layer": 4 * stats.largest_layer, "zero3_live_parameters": live}
    return _states(weights + live, grads, optimizer, cpu_bytes if offload else 0, detail)


def _lora_states(mode: Mode, scenario: Scenario) -> StatesBytes:
    """LoRA under DDP: the frozen base in ``mode.base`` plus fp32 adapters, their gradients and AdamW states."""
    stats = scenario.stats
    P, Q, R = stats.total, stats.quantizable, scenario.lora_params
    if mode.base == "int8":
        # int8 weights + fp32 row scales; everything else (embeddings, conv, norms, biases) fp32
        # after peft.prepare_model_for_kbit_training.
        base = Q + INT8_ROW_SCALE_BYTES * stats.quantizable_rows + 4 * (P - Q)
    elif mode.base == "nf4":
        base = int(NF4_BYTES_PER_PARAM * Q) + 4 * (P - Q)
    else:  # a 16-bit base (Mode checks that a LoRA base is bf16, int8 or nf4)
        base = LORA_BASE_BYTES * P
    grads = (4 + _ddp_buckets(scenario)) * R
    return _states(base + 4 * R, grads, 8 * R, 0, {"base": base, "lora_params": R})
