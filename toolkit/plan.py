"""Memory planner: peak GPU memory of each training mode for a Whisper model, from its config alone.

``python -m toolkit plan --model large-v3 --gpu-memory 16GB`` estimates, per GPU and per mode
(DDP full fine-tuning, 8-bit AdamW, DeepSpeed ZeRO-2/3 with and without CPU offload, LoRA, LoRA on
an int8 base, QLoRA), the bytes of weights, gradients, optimizer states and activations, and
recommends the fastest mode that fits. No weights are loaded: parameter counts come from the model
built on the ``meta`` device (:meth:`ModelStats.from_config`), so they cannot drift from
transformers' Whisper.

What each term assumes (P = all parameters, T = trainable ones, N = GPUs):

* **Model states.** DDP (``full``): fp32 master weights 4P, fp32 gradients 4T (plus another 4T
  when N > 1: DDP's flat gradient buckets, ``gradient_as_bucket_view`` being off), AdamW m and v
  8T. ``full-adamw8bit``: bitsandbytes' AdamW8bit, 1 byte per moment plus an fp32 absmax per block
  of 256 values, and 8 bytes for tensors under ``min_8bit_size`` (4096 values). ZeRO: DeepSpeed's
  own estimators, ``estimate_zero2_model_states_mem_needs`` and
  ``estimate_zero3_model_states_mem_needs`` (deepspeed 0.19; :func:`zero2_model_states` and
  :func:`zero3_model_states` restate them, and a test compares); ZeRO-3 adds what they leave out,
  the bf16 weights that stay gathered (up to ``stage3_max_live_parameters`` of our JSONs). LoRA:
  the frozen base (fp32 as the toolkit loads it; int8 or NF4 linears with everything else in fp32
  after ``peft.prepare_model_for_kbit_training``) plus fp32 adapters with fp32 gradients and AdamW
  states (16 bytes per adapter parameter). See :func:`model_states`.
* **Activations**, for a micro-batch of B 30 s windows (3000 mel frames, 1500 encoder positions
  after the conv stem) and L label tokens, follow Korthikanti et al. 2022, "Reducing Activation
  Recomputation in Large Transformer Models" (arXiv:2205.05198): a transformer layer keeps
  ``s*b*h*(34 + 5*a*s/h)`` bytes in 16-bit without recomputation, and with full recomputation only
  its input (2*s*b*h) plus, during the backward, one layer's full activations. Adapted to Whisper
  as trained here (see :func:`_layer_bytes`): dropout is 0 in every Whisper config, so no masks
  (34 -> 32); attention is PyTorch SDPA (transformers' default), whose flash/memory-efficient
  kernels keep a log-sum-exp per query and head instead of the a*s*s score matrix (``--attention
  eager`` restores it); decoder layers add cross-attention over the 1500 encoder positions (their
  own K and V of the encoder output); and dtypes follow each mode: under autocast (DDP modes) the
  residual stream and layer-norm outputs are fp32 and each linear saves its own bf16 cast of its
  input, under DeepSpeed the model is bf16 throughout, and a frozen linear saves no input at all.
  Plus the conv stem, the logits (12 bytes per logit: the fp32 log-softmax saved for the loss, its
  gradient and the gradient of the logits) and bf16 weight copies made by autocast. The peak is the
  larger of the end of the forward and the start of the backward (:func:`activations`).
* **Overhead**: CUDA context and library workspaces (:data:`CUDA_CONTEXT_BYTES`) plus allocator
  fragmentation (:data:`FRAGMENTATION` of the allocated peak). It is not part of
  ``torch.cuda.max_memory_allocated``; :attr:`Estimate.allocated` is the figure to compare with it.

Everything is per GPU. ``--gpu-memory`` is the card's total memory (``nvidia-smi --query-gpu=memory.total``).
The speed ranking of the modes, and why, is written next to :data:`MODES`.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = 2**30
CUDA_CONTEXT_BYTES = GIB // 2
"""CUDA context, cuBLAS/cuDNN workspaces and NCCL buffers: about 0.3-0.5 GiB on current GPUs."""
FRAGMENTATION = 0.05
"""Share of the allocated peak that the caching allocator reserves on top (reserved - allocated)."""

ENCODER_POSITIONS = 1500
"""Encoder sequence after the conv stem for a 30 s window (3000 mel frames, stride 2)."""
MAX_LABEL_TOKENS = 448
"""Decoder positions of every Whisper checkpoint; the worst case for ``--label-tokens``."""

LORA_RANK = 32
LORA_TARGETS = ("q_proj", "v_proj")
LORA_DROPOUT = 0.05
"""Defaults of :class:`toolkit.config.LoraConfig` (PEFT's int8 Whisper recipe)."""
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

LORA_BASE_BYTES = 2
"""``training.method=lora`` without quantisation loads the frozen base at the 16-bit compute dtype on a
GPU (``toolkit.modeling.load_dtype``). The activation profile below still assumes an fp32 base under
autocast (fp32 residual stream), so the ``lora`` activation estimate errs on the high side."""
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
"""4 bits per weight, plus double quantisation (``bnb_4bit_use_double_quant=True`` in
``toolkit.adapters``): an 8-bit absmax per block of 64 weights and an fp32 absmax per 256 of those.
Without double quantisation it would be 0.5 + 4/64 = 0.5625."""
INT8_ROW_SCALE_BYTES = 4
"""LLM.int8 keeps an fp32 scale per output row (``SCB``) next to the int8 weights."""
ADAM8BIT_MIN_SIZE = 4096
ADAM8BIT_BLOCK = 256
ZERO3_MAX_LIVE_PARAMETERS = 1_000_000_000
"""``stage3_max_live_parameters`` of ``launch_configs/deepspeed/zero3*.json``."""
DS_BUFFER_FACTOR = 1.5
"""DeepSpeed's ``additional_buffer_factor`` default, applied to its host-memory figures."""


class PlanError(ValueError):
    """The model cannot be resolved or an argument is out of range; the message says why."""


# -- known sizes -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WhisperSize:
    """The architecture fields of an official checkpoint's ``config.json``."""

    d_model: int
    encoder_layers: int
    decoder_layers: int
    attention_heads: int
    ffn_dim: int
    vocab_size: int = 51865
    """51865 multilingual, 51864 English-only (.en), 51866 from large-v3 on (one more language)."""
    num_mel_bins: int = 80
    """128 from large-v3 on."""

    def config(self) -> Any:
        from transformers import WhisperConfig

        return WhisperConfig(
            vocab_size=self.vocab_size,
            num_mel_bins=self.num_mel_bins,
            d_model=self.d_model,
            encoder_layers=self.encoder_layers,
            decoder_layers=self.decoder_layers,
            encoder_attention_heads=self.attention_heads,
            decoder_attention_heads=self.attention_heads,
            encoder_ffn_dim=self.ffn_dim,
            decoder_ffn_dim=self.ffn_dim,
            max_source_positions=ENCODER_POSITIONS,
            max_target_positions=MAX_LABEL_TOKENS,
        )


_LARGE = dict(d_model=1280, attention_heads=20, ffn_dim=5120)
SIZES: dict[str, WhisperSize] = {
    "tiny": WhisperSize(384, 4, 4, 6, 1536),
    "tiny.en": WhisperSize(384, 4, 4, 6, 1536, vocab_size=51864),
    "base": WhisperSize(512, 6, 6, 8, 2048),
    "base.en": WhisperSize(512, 6, 6, 8, 2048, vocab_size=51864),
    "small": WhisperSize(768, 12, 12, 12, 3072),
    "small.en": WhisperSize(768, 12, 12, 12, 3072, vocab_size=51864),
    "medium": WhisperSize(1024, 24, 24, 16, 4096),
    "medium.en": WhisperSize(1024, 24, 24, 16, 4096, vocab_size=51864),
    "large": WhisperSize(encoder_layers=32, decoder_layers=32, **_LARGE),
    "large-v2": WhisperSize(encoder_layers=32, decoder_layers=32, **_LARGE),
    "large-v3": WhisperSize(encoder_layers=32, decoder_layers=32, vocab_size=51866, num_mel_bins=128, **_LARGE),
    # large-v3-turbo: large-v3's encoder with 4 decoder layers.
    "turbo": WhisperSize(encoder_layers=32, decoder_layers=4, vocab_size=51866, num_mel_bins=128, **_LARGE),
}
ALIASES = {"large-v1": "large", "large-v3-turbo": "turbo"}


def size_name(name: str) -> str | None:
    """The :data:`SIZES` key for ``small``, ``whisper-small``, ``openai/whisper-small.en``, ...; else None."""
    key = name.strip().lower()
    for prefix in ("openai/", "whisper-"):
        key = key.removeprefix(prefix)
    key = ALIASES.get(key, key)
    return key if key in SIZES else None


def resolve_config(name: str) -> tuple[str, Any]:
    """A display name and a ``WhisperConfig`` for a size name, a local directory or a Hub id."""
    from transformers import WhisperConfig

    known = size_name(name)
    if known is not None:
        return f"whisper-{known}", SIZES[known].config()
    path = Path(name).expanduser()
    if path.is_dir() or path.suffix == ".json":
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise PlanError(f"{name}: no config.json there (a Whisper model directory has one)")
        try:
            raw = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PlanError(f"{file}: not a readable JSON config ({exc})") from exc
        if raw.get("model_type", "whisper") != "whisper":
            raise PlanError(f"{file}: model_type is {raw.get('model_type')!r}, not 'whisper'")
        return path.name or str(path), WhisperConfig.from_dict(raw)
    known_names = ", ".join(SIZES)
    if "/" not in name:
        close = difflib.get_close_matches(name.lower().removeprefix("whisper-"), list(SIZES) + list(ALIASES), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise PlanError(
            f"unknown Whisper model {name!r}{hint}: give a size ({known_names}), "
            "a local directory with a config.json, or a Hub id"
        )
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # not one "Retrying in 1s" line per attempt when offline
    try:
        config = WhisperConfig.from_pretrained(name)
    except Exception as exc:  # offline, unknown repository, not a Whisper config: all the same to the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PlanError(
            f"could not read the config of {name!r} from the Hugging Face Hub ({first}). Offline, give the "
            f"size instead ({known_names}) or a local directory with its config.json"
        ) from exc
    finally:
        hub_logger.setLevel(level)
    return name.rsplit("/", 1)[-1], config


# -- parameter counts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelStats:
    """Everything the estimates need from a Whisper config: dimensions and meta-device parameter counts."""

    name: str
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_heads: int
    decoder_heads: int
    encoder_ffn: int
    decoder_ffn: int
    vocab_size: int
    num_mel_bins: int
    encoder_positions: int
    max_label_tokens: int
    total: int
    """All parameters, tied ones once (``proj_out`` shares ``embed_tokens``)."""
    trainable: int
    """Parameters that require grad (all but the encoder's fixed sinusoidal positions)."""
    encoder: int
    """Conv stem, encoder layers and final layer norm."""
    decoder: int
    """Decoder layers and final layer norm."""
    embeddings: int
    """Token embedding (= output projection) and both positional embeddings."""
    largest_layer: int
    """DeepSpeed's ``model_to_params``: the most parameters held directly by one module (the token embedding)."""
    small_tensors: int
    """Trainable parameters in tensors under :data:`ADAM8BIT_MIN_SIZE` values (biases, norms)."""
    matmul: int
    """Trainable parameters of linear and conv modules (what autocast casts to 16-bit), output projection included."""
    layer_linears: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    """Per linear name (``q_proj``, ...): (count over all layers, in_features, out_features); cross-attention
    projections are listed as ``cross.q_proj`` etc."""

    @property
    def quantizable(self) -> int:
        """Weights of the layers' linear modules: what bitsandbytes quantises (not the embeddings, conv, norms)."""
        return sum(n * i * o for n, i, o in self.layer_linears.values())

    @property
    def quantizable_rows(self) -> int:
        return sum(n * o for n, _, o in self.layer_linears.values())

    def lora_params(self, rank: int = LORA_RANK, targets: tuple[str, ...] = LORA_TARGETS) -> int:
        """Adapter parameters: r*(in+out) per targeted linear, in every layer (self- and cross-attention)."""
        return sum(n * rank * (i + o) for key, (n, i, o) in self.layer_linears.items() if key.split(".")[-1] in targets)

    def layer_linear_params(self, kind: str) -> int:
        """Linear weights of ONE encoder (``kind='encoder'``) or decoder layer."""
        sides = ("encoder.",) if kind == "encoder" else ("decoder.", "cross.")
        return sum(i * o for key, (_, i, o) in self.layer_linears.items() if key.startswith(sides))

    @classmethod
    def from_config(cls, config: Any, name: str = "whisper") -> ModelStats:
        """Count parameters on a model built on the meta device (no memory, no weights)."""
        import torch
        from transformers import WhisperForConditionalGeneration

        with torch.device("meta"):
            model = WhisperForConditionalGeneration(config)
        params = list(model.named_parameters())  # tied weights appear once
        total = sum(p.numel() for _, p in params)
        trainable = sum(p.numel() for _, p in params if p.requires_grad)
        embeddings = sum(p.numel() for n, p in params if "embed_" in n)
        encoder = sum(p.numel() for n, p in params if n.startswith("model.encoder.") and "embed_" not in n)
        decoder = sum(p.numel() for n, p in params if n.startswith("model.decoder.") and "embed_" not in n)
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        small = sum(p.numel() for _, p in params if p.requires_grad and p.numel() < ADAM8BIT_MIN_SIZE)
        seen: set[int] = set()
        matmul = 0
        linears: dict[str, tuple[int, int, int]] = {}
        for module_name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Conv1d):
                for p in module.parameters(recurse=False):
                    if id(p) not in seen and p.requires_grad:
                        seen.add(id(p))
                        matmul += p.numel()
            if isinstance(module, torch.nn.Linear) and ".layers." in module_name:
                side = "encoder" if ".encoder." in module_name else "decoder"
                key = f"cross.{module_name.rsplit('.', 1)[-1]}" if ".encoder_attn." in module_name else (
                    f"{side}.{module_name.rsplit('.', 1)[-1]}"
                )
                count, _, _ = linears.get(key, (0, 0, 0))
                linears[key] = (count + 1, module.in_features, module.out_features)
        return cls(
            name=name, d_model=config.d_model, encoder_layers=config.encoder_layers,
            decoder_layers=config.decoder_layers, encoder_heads=config.encoder_attention_heads,
            decoder_heads=config.decoder_attention_heads, encoder_ffn=config.encoder_ffn_dim,
            decoder_ffn=config.decoder_ffn_dim, vocab_size=config.vocab_size, num_mel_bins=config.num_mel_bins,
            encoder_positions=config.max_source_positions, max_label_tokens=config.max_target_positions,
            total=total, trainable=trainable, encoder=encoder, decoder=decoder, embeddings=embeddings,
            largest_layer=largest, small_tensors=small, matmul=matmul, layer_linears=linears,
        )


def load_stats(model: str) -> ModelStats:
    """:class:`ModelStats` for a size name, a local directory or a Hub id."""
    name, config = resolve_config(model)
    return ModelStats.from_config(config, name)


# -- modes --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    name: str
    recipe: str
    """Recipe overrides beyond the common ones (micro-batch, bf16, gradient checkpointing)."""
    launch: str
    """Launch config; ``{ddp}`` stands for 1gpu.yaml or multi_gpu.yaml by the number of GPUs."""
    summary: str


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
    Mode("full", "training.method=full", "{ddp}", "DDP, fp32 master weights, AdamW"),
    Mode("full-adamw8bit", "training.optimizer=adamw8bit", "{ddp}", "DDP, fp32 weights, bitsandbytes 8-bit AdamW"),
    Mode("zero2", "training.method=full", "ds_zero2.yaml", "DeepSpeed ZeRO-2: states and gradients sharded"),
    Mode("zero3", "training.method=full", "ds_zero3.yaml", "DeepSpeed ZeRO-3: weights sharded too"),
    Mode("lora", "training.method=lora", "{ddp}", "LoRA adapters on a frozen 16-bit base"),
    Mode("zero2-offload", "training.method=full", "ds_zero2_offload.yaml", "ZeRO-2, optimizer states on the CPU"),
    Mode("zero3-offload", "training.method=full", "ds_zero3_offload.yaml", "ZeRO-3, weights and optimizer on the CPU"),
    Mode("lora-int8", "model.quantization=int8 training.method=lora", "{ddp}", "LoRA on an LLM.int8 base"),
    Mode("qlora-nf4", "model.quantization=nf4 training.method=lora", "{ddp}", "LoRA on an NF4 base (QLoRA)"),
)
MODE_NAMES = tuple(m.name for m in MODES)
COMMON_KEYS = "training.mixed_precision=bf16 training.gradient_checkpointing=true"


def get_mode(name: str) -> Mode:
    for m in MODES:
        if m.name == name:
            return m
    raise PlanError(f"unknown mode {name!r}; modes: {', '.join(MODE_NAMES)}")


def launch_config(m: Mode, gpus: int) -> str:
    ddp = "1gpu.yaml" if gpus == 1 else f"multi_gpu.yaml --num_processes {gpus}"
    file = m.launch.format(ddp=ddp)
    if file.startswith("ds_"):  # the DeepSpeed launch configs default to 8 processes
        file += f" --num_processes {gpus}"
    return f"launch_configs/{file}"


# -- model states -------------------------------------------------------------------------------------


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


def model_states(name: str, stats: ModelStats, gpus: int, lora_rank: int = LORA_RANK,
                 lora_targets: tuple[str, ...] = LORA_TARGETS) -> tuple[dict[str, int], int, dict[str, int]]:
    """({weights, grads, optimizer} bytes on each GPU, host bytes of offloaded states, detail)."""
    P, T = stats.total, stats.trainable
    ddp_buckets = 4 if gpus > 1 else 0  # DDP's flat fp32 gradient buckets, a second copy of the gradients
    detail: dict[str, int] = {}
    cpu = 0
    if name in ("full", "full-adamw8bit"):
        weights, grads = 4 * P, (4 + ddp_buckets) * T
        if name == "full":
            optimizer = 8 * T
        else:
            big = T - stats.small_tensors
            optimizer = int(big * (2 + 2 * 4 / ADAM8BIT_BLOCK)) + 8 * stats.small_tensors
        detail["ddp_grad_buckets"] = ddp_buckets * T
    elif name in ("zero2", "zero2-offload"):
        offload = name.endswith("offload")
        cpu_bytes, gpu = zero2_model_states(P, gpus, offload)
        # DeepSpeed's total, split: bf16 weights 2P | gradients 6P/N (bf16 + fp32) | fp32 master + m + v 12P/N.
        weights = 2 * P
        grads = 0 if offload else int(6 * P / gpus)
        optimizer = gpu - weights - grads
        cpu = cpu_bytes if offload else 0
    elif name in ("zero3", "zero3-offload"):
        offload = name.endswith("offload")
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
        detail["zero3_largest_layer"] = 4 * stats.largest_layer
        detail["zero3_live_parameters"] = live
        weights += live
        cpu = cpu_bytes if offload else 0
    elif name in ("lora", "lora-int8", "qlora-nf4"):
        R = stats.lora_params(lora_rank, lora_targets)
        Q = stats.quantizable
        if name == "lora":
            base = LORA_BASE_BYTES * P
        elif name == "lora-int8":
            # int8 weights + fp32 row scales; everything else (embeddings, conv, norms, biases) fp32
            # after peft.prepare_model_for_kbit_training.
            base = Q + INT8_ROW_SCALE_BYTES * stats.quantizable_rows + 4 * (P - Q)
        else:
            base = int(NF4_BYTES_PER_PARAM * Q) + 4 * (P - Q)
        detail["base"] = base
        detail["lora_params"] = R
        weights = base + 4 * R
        grads = (4 + ddp_buckets) * R
        optimizer = 8 * R
    else:
        raise PlanError(f"unknown mode {name!r}; modes: {', '.join(MODE_NAMES)}")
    return {"weights": int(weights), "grads": int(grads), "optimizer": int(optimizer)}, int(cpu), detail


# -- activations --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Saved:
    """Bytes a layer keeps for the backward, per element of each tensor (see :func:`_profile`)."""

    residual: int  # residual stream = layer-norm inputs = checkpointed layer inputs
    norm_out: int  # encoder output (final layer-norm output), kept for every decoder layer
    qkv_in: int  # self-attention input (layer-norm output) as saved by q/k/v projections, all copies
    out_in: int  # attention output as saved by out_proj
    fc1_in: int
    mlp: int  # fc1 output (GELU input)
    fc2_in: int  # GELU output as saved by fc2
    cross_q_in: int
    cross_kv_in: int  # per encoder position and decoder layer, beyond the shared encoder output
    head_in: int  # proj_out input
    conv: bool  # the conv stem is trained (keeps its activations)
    score: int  # eager attention: bytes per attention score
    lora_targets: tuple[str, ...] = ()
    weight_copies: int = 0  # bytes per layer-linear parameter saved as a 16-bit copy (autocast over fp32 weights)
    head_copy: int = 0  # bytes per output-projection parameter saved as a 16-bit copy
    cast_cache: bool = False  # autocast caches bf16 copies of trainable fp32 weights during the forward


def _profile(name: str, targets: tuple[str, ...], lora_dropout: float) -> _Saved:
    """Which tensors each mode keeps, and in which dtype.

    * DDP (``full*``): fp32 weights under CUDA autocast. Layer norms run in fp32, so the residual
      stream is fp32 (4); each linear casts its fp32 input to bf16 and saves that copy (q, k and v
      make three, and every decoder layer's k/v two of the encoder output); SDPA saves bf16 q, k, v.
      Autocast caches bf16 copies of all trainable weights during the forward.
    * ZeRO: DeepSpeed casts the model to bf16, no autocast: 2 bytes everywhere, one saved tensor
      per distinct input.
    * LoRA, fp32 base: as DDP, but a frozen linear saves no input (only its bf16 weight copy); a LoRA
      target saves the bf16 cast of its dropped-out input (2) and the dropout mask (1).
    * LoRA on int8: LLM.int8 saves its input as is (fp32 after prepare_model_for_kbit_training's
      fp32 norms) and returns its input's dtype, so the MLP runs in fp32.
    * QLoRA: bitsandbytes' 4-bit matmul saves no input and returns the input's dtype (fp32).
    """
    t = {n: ((3 if lora_dropout > 0 else 2) if n in targets else 0) for n in LINEAR_NAMES}
    qkv_t = t["q_proj"] + t["k_proj"] + t["v_proj"]
    if name in ("full", "full-adamw8bit"):
        return _Saved(4, 4, 6, 2, 2, 2, 2, 2, 4, 2, True, 6, (), 2, 2, True)
    if name.startswith("zero"):
        return _Saved(2, 2, 2, 2, 2, 2, 2, 2, 0, 2, True, 2)
    if name == "lora":
        return _Saved(4, 4, qkv_t, t["out_proj"], t["fc1"], 2, t["fc2"], t["q_proj"], t["k_proj"] + t["v_proj"],
                      0, False, 6, targets, 2, 2, True)
    if name == "lora-int8":
        return _Saved(4, 4, 4 + qkv_t, 2 + t["out_proj"], 4 + t["fc1"], 4, 4 + t["fc2"], 4 + t["q_proj"],
                      t["k_proj"] + t["v_proj"], 0, False, 6, targets, 0, 2, True)
    if name == "qlora-nf4":
        return _Saved(4, 4, qkv_t, t["out_proj"], t["fc1"], 4, t["fc2"], t["q_proj"], t["k_proj"] + t["v_proj"],
                      0, False, 6, targets, 0, 2, True)
    raise PlanError(f"unknown mode {name!r}; modes: {', '.join(MODE_NAMES)}")


def _scores(p: _Saved, attention: str, b: int, heads: int, s_q: int, s_k: int) -> int:
    if attention == "eager":
        return p.score * b * heads * s_q * s_k  # softmax output (fp32 under autocast) + its bf16 copy
    return 4 * b * heads * s_q  # SDPA flash / memory-efficient: fp32 log-sum-exp per query and head


def _layer_bytes(p: _Saved, stats: ModelStats, kind: str, b: int, L: int, attention: str, rank: int) -> int:
    """One layer's activations without recomputation (Korthikanti et al. eq. 2, adapted; see module doc).

    Pure 16-bit (the ZeRO modes): an encoder layer keeps 32*s*b*h bytes, Korthikanti's 34 less the
    two dropout masks (2 layer-norm inputs 4sbh, q/k/v input 2sbh, q, k, v 6sbh, out_proj input
    2sbh, fc1 input 2sbh, GELU input and output 2*2*s*b*4h), plus 2sbh for the attention output
    that SDPA keeps (eager keeps the 2*a*s*s softmax output instead) and 16 bytes per token of
    layer-norm statistics. A decoder layer keeps 40*L*b*h (+ 4Lbh SDPA outputs) + 4*1500*b*h:
    self-attention and MLP as above, a third layer norm, cross-attention's q input, q and out_proj
    input, and its own K and V over the 1500 encoder positions. Checked on CPU against the tensors
    autograd saves for transformers' WhisperEncoderLayer/WhisperDecoderLayer in bf16 (within 1%).
    """
    h = stats.d_model
    lora_mid = 2 * rank  # the bf16 input of a lora_B (rank values per token)
    # SDPA's backward also keeps the attention output (bf16), next to the copy out_proj saves; every
    # layer norm keeps an fp32 mean and rstd per token.
    attn_out = 2 * h if attention == "sdpa" else 0
    ln_stats = 8

    def n_targets(*names: str) -> int:
        return sum(1 for n in names if n in p.lora_targets)

    if kind == "encoder":
        s, f, heads = stats.encoder_positions, stats.encoder_ffn, stats.encoder_heads
        per_token = (2 * p.residual * h + p.qkv_in * h + 6 * h + attn_out + p.out_in * h + p.fc1_in * h + p.mlp * f
                     + p.fc2_in * f + 2 * ln_stats + lora_mid * n_targets(*LINEAR_NAMES))
        return s * b * per_token + _scores(p, attention, b, heads, s, s)
    s_e, f, heads = stats.encoder_positions, stats.decoder_ffn, stats.decoder_heads
    per_token = (3 * p.residual * h + p.qkv_in * h + 6 * h + attn_out + p.out_in * h  # self-attention
                 + p.cross_q_in * h + 2 * h + attn_out + p.out_in * h  # cross-attention at the decoder positions
                 + p.fc1_in * h + p.mlp * f + p.fc2_in * f + 3 * ln_stats
                 + lora_mid * (n_targets(*LINEAR_NAMES) + n_targets("q_proj", "out_proj")))
    per_encoder_position = 4 * h + p.cross_kv_in * h + lora_mid * n_targets("k_proj", "v_proj")
    return (L * b * per_token + s_e * b * per_encoder_position
            + _scores(p, attention, b, heads, L, L) + _scores(p, attention, b, heads, L, s_e))


def activations(name: str, stats: ModelStats, micro_batch: int, label_tokens: int, gradient_checkpointing: bool,
                attention: str = "sdpa", lora_rank: int = LORA_RANK, lora_targets: tuple[str, ...] = LORA_TARGETS,
                lora_dropout: float = LORA_DROPOUT) -> tuple[int, dict[str, int]]:
    """Peak activation bytes on one GPU and their parts.

    The peak is the larger of two moments: the end of the forward (everything kept, bf16 logits,
    autocast's cache of bf16 weights) and the start of the backward (everything kept, the loss's
    12 bytes per logit, or the recompute of the largest layer, whichever is larger; the logit
    gradients are freed before the last decoder layer is recomputed).
    """
    p = _profile(name, lora_targets, lora_dropout)
    b, L, h = micro_batch, label_tokens, stats.d_model
    s_e, mel, V = stats.encoder_positions, stats.num_mel_bins, stats.vocab_size
    enc_layer = _layer_bytes(p, stats, "encoder", b, L, attention, lora_rank)
    dec_layer = _layer_bytes(p, stats, "decoder", b, L, attention, lora_rank)
    enc_copies = p.weight_copies * stats.layer_linear_params("encoder")
    dec_copies = p.weight_copies * stats.layer_linear_params("decoder")
    parts: dict[str, int] = {}
    # Conv stem: conv1 input (mel x 3000), GELU input and output (h x 3000), conv2's GELU input (h x 1500).
    parts["conv_stem"] = 2 * b * (2 * s_e * mel + 5 * s_e * h) if p.conv else 0
    if gradient_checkpointing:
        parts["encoder_checkpoints"] = stats.encoder_layers * p.residual * s_e * b * h
        parts["decoder_checkpoints"] = stats.decoder_layers * p.residual * L * b * h
        recompute = max(enc_layer - p.residual * s_e * b * h + enc_copies, dec_layer - p.residual * L * b * h + dec_copies)
        layer_copies = 0
    else:
        parts["encoder_layers"] = stats.encoder_layers * enc_layer
        parts["decoder_layers"] = stats.decoder_layers * dec_layer
        recompute = 0
        layer_copies = stats.encoder_layers * enc_copies + stats.decoder_layers * dec_copies
    parts["encoder_output"] = (p.residual + p.norm_out) * s_e * b * h  # final layer norm's input and output
    parts["decoder_output"] = (p.residual + p.head_in) * L * b * h
    parts["weight_copies"] = layer_copies + p.head_copy * V * h
    kept = sum(parts.values())
    logits = b * L * V
    if p.cast_cache:
        cached = 2 * (stats.matmul if name.startswith("full") else stats.lora_params(lora_rank, lora_targets))
        cast_cache = max(cached - parts["weight_copies"], 0)
    else:
        cast_cache = 0
    forward_end = kept + cast_cache + 2 * logits
    backward = kept + max(12 * logits, recompute)
    parts["logits_loss"] = 12 * logits
    parts["recompute_layer"] = recompute
    parts["autocast_cache"] = cast_cache
    parts["peak_phase_forward"] = int(forward_end >= backward)
    return max(forward_end, backward), parts


# -- estimates ----------------------------------------------------------------------------------------


COMPONENTS = ("weights", "grads", "optimizer", "activations")


@dataclass
class Estimate:
    """Estimated peak memory of one mode on one GPU, in bytes, by component."""

    mode: str
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
    label_tokens: int = MAX_LABEL_TOKENS
    gradient_checkpointing: bool = True

    @property
    def allocated(self) -> int:
        """What ``torch.cuda.max_memory_allocated()`` should report at the peak."""
        return self.weights + self.grads + self.optimizer + self.activations

    @property
    def total(self) -> int:
        return self.allocated + self.overhead

    def fits(self, gpu_memory: int) -> bool:
        return self.total <= gpu_memory

    def to_dict(self, gpu_memory: int | None = None) -> dict[str, Any]:
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


def _stats(config: Any) -> ModelStats:
    if isinstance(config, ModelStats):
        return config
    if isinstance(config, str):
        return load_stats(config)
    return ModelStats.from_config(config)


def estimate(mode: str, config: Any, gpus: int = 1, micro_batch: int = 16, label_tokens: int = MAX_LABEL_TOKENS,
             gradient_checkpointing: bool = True, *, attention: str = "sdpa", lora_rank: int = LORA_RANK,
             lora_targets: tuple[str, ...] = LORA_TARGETS, lora_dropout: float = LORA_DROPOUT) -> Estimate:
    """Peak GPU memory of ``mode`` for a model (``ModelStats``, ``WhisperConfig`` or a name/path).

    Compare :attr:`Estimate.allocated` with ``torch.cuda.max_memory_allocated()`` of a real step
    (after at least two optimizer steps, so that optimizer states exist), and
    :attr:`Estimate.total` with the card.
    """
    stats = _stats(config)
    get_mode(mode)
    if gpus < 1:
        raise PlanError(f"--gpus must be >= 1, got {gpus}")
    if micro_batch < 1:
        raise PlanError(f"--micro-batch must be >= 1, got {micro_batch}")
    if not 1 <= label_tokens <= stats.max_label_tokens:
        raise PlanError(f"--label-tokens must be in [1, {stats.max_label_tokens}], got {label_tokens}")
    if attention not in ("sdpa", "eager"):
        raise PlanError(f"attention must be sdpa or eager, got {attention!r}")
    unknown = [t for t in lora_targets if t not in LINEAR_NAMES]
    if unknown or not lora_targets:
        raise PlanError(f"LoRA targets must be among {', '.join(LINEAR_NAMES)}, got {', '.join(lora_targets) or 'none'}")
    states, cpu, detail = model_states(mode, stats, gpus, lora_rank, lora_targets)
    acts, parts = activations(mode, stats, micro_batch, label_tokens, gradient_checkpointing, attention,
                              lora_rank, lora_targets, lora_dropout)
    allocated = sum(states.values()) + acts
    overhead = CUDA_CONTEXT_BYTES + int(FRAGMENTATION * allocated)
    detail.update({f"act_{k}": v for k, v in parts.items()})
    return Estimate(mode, states["weights"], states["grads"], states["optimizer"], acts, overhead, cpu, detail,
                    gpus, micro_batch, label_tokens, gradient_checkpointing)


def plan(config: Any, gpus: int = 1, micro_batch: int = 16, label_tokens: int = MAX_LABEL_TOKENS,
         gradient_checkpointing: bool = True, **kwargs: Any) -> list[Estimate]:
    """An :class:`Estimate` per mode, fastest mode first."""
    stats = _stats(config)
    return [estimate(m.name, stats, gpus, micro_batch, label_tokens, gradient_checkpointing, **kwargs) for m in MODES]


def recommend(estimates: list[Estimate], gpu_memory: int) -> Estimate | None:
    """The fastest mode that fits (``estimates`` are in :data:`MODES` order), or None."""
    rank = {name: i for i, name in enumerate(MODE_NAMES)}
    fitting = [e for e in estimates if e.fits(gpu_memory)]
    return min(fitting, key=lambda e: rank[e.mode]) if fitting else None


def suggestion(config: Any, gpu_memory: int, gpus: int, micro_batch: int, label_tokens: int,
               gradient_checkpointing: bool, **kwargs: Any) -> str:
    """What to change when nothing fits: a smaller micro-batch, checkpointing, or more GPUs."""
    stats = _stats(config)
    ideas = []
    b = micro_batch // 2
    while b >= 1:
        best = recommend(plan(stats, gpus, b, label_tokens, gradient_checkpointing, **kwargs), gpu_memory)
        if best:
            ideas.append(f"--micro-batch {b} ({best.mode}, {best.total / GIB:.1f} GiB; the global batch stays, "
                         "accumulation grows)")
            break
        b //= 2
    if not gradient_checkpointing:
        best = recommend(plan(stats, gpus, micro_batch, label_tokens, True, **kwargs), gpu_memory)
        if best:
            ideas.append(f"gradient checkpointing ({best.mode}, {best.total / GIB:.1f} GiB)")
    # More GPUs lower only the sharded ZeRO states; the offload and LoRA modes, which do not shard,
    # are smaller still, so this rarely helps when nothing fits (it does when it is about speed:
    # see faster_with_more_gpus).
    for more in (2 * gpus, 4 * gpus, 8 * gpus):
        best = recommend(plan(stats, more, micro_batch, label_tokens, gradient_checkpointing, **kwargs), gpu_memory)
        if best:
            ideas.append(f"--gpus {more} ({best.mode}, {best.total / GIB:.1f} GiB per GPU)")
            break
    if not ideas:
        return "no smaller micro-batch or up to 8x the GPUs makes any mode fit: use GPUs with more memory"
    return "try " + ", or ".join(ideas)


def faster_with_more_gpus(config: Any, gpu_memory: int, gpus: int, best: Estimate, micro_batch: int,
                          label_tokens: int, gradient_checkpointing: bool, **kwargs: Any) -> str | None:
    """A faster mode that fits with 2x, 4x or 8x the GPUs (ZeRO shards the states), if any."""
    stats = _stats(config)
    rank = MODE_NAMES.index(best.mode)
    for more in (2 * gpus, 4 * gpus, 8 * gpus):
        other = recommend(plan(stats, more, micro_batch, label_tokens, gradient_checkpointing, **kwargs), gpu_memory)
        if other and MODE_NAMES.index(other.mode) < rank:
            return f"with --gpus {more}, {other.mode} fits ({other.total / GIB:.2f} GiB per GPU) and is faster"
    return None


# -- command line -------------------------------------------------------------------------------------

_UNITS = {"": GIB, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": GIB, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_memory(text: str) -> int:
    """Bytes in ``16GB`` (10^9), ``15GiB`` (2^30), ``15360 MiB`` (nvidia-smi's form) or a bare number of GiB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise PlanError(f"--gpu-memory: cannot read {text!r}; write it like 16GB, 15GiB or 15360MiB")
    return int(float(match.group(1)) * _UNITS[unit])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``plan`` subcommand's options (also used by ``scripts/plan_table.py``)."""
    parser.add_argument("--model", required=True,
                        help="size (tiny ... large-v3, turbo, .en variants), local model directory, or Hub id")
    parser.add_argument("--gpu-memory", required=True, help="memory per GPU: 16GB (10^9 bytes), 15GiB, 15360MiB")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs in all (one node)")
    parser.add_argument("--micro-batch", type=int, default=16, help="samples per forward pass per GPU")
    parser.add_argument("--label-tokens", type=int, default=MAX_LABEL_TOKENS,
                        help="label tokens per sample (448, the worst case, by default)")
    parser.add_argument("--no-gradient-checkpointing", action="store_true",
                        help="estimate without activation checkpointing (on by default, as recommended)")
    parser.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa",
                        help="attention implementation (sdpa, transformers' default, keeps no score matrix)")
    parser.add_argument("--lora-rank", type=int, default=LORA_RANK, help="LoRA rank (lora.rank)")
    parser.add_argument("--lora-targets", default=",".join(LORA_TARGETS),
                        help="comma-separated LoRA target modules (lora.target_modules)")
    parser.add_argument("--json", action="store_true", help="one JSON object per mode per line")


def _gib(value: int) -> str:
    return f"{value / GIB:.2f}"


def _params(n: int) -> str:
    return f"{n / 1e6:,.1f}M"


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths,
                                                                                                             strict=True))))
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report(stats: ModelStats, estimates: list[Estimate], gpu_memory: int, gpus: int, micro_batch: int,
           label_tokens: int, gradient_checkpointing: bool, attention: str, lora_rank: int,
           lora_targets: tuple[str, ...]) -> str:
    """The human-readable plan: header, table, recommendation."""
    lora = stats.lora_params(lora_rank, lora_targets)
    lines = [
        f"{stats.name}: {_params(stats.total)} parameters (encoder {_params(stats.encoder)}, decoder "
        f"{_params(stats.decoder)}, embeddings {_params(stats.embeddings)}); LoRA r={lora_rank} on "
        f"{','.join(lora_targets)}: {_params(lora)} trainable",
        f"settings: {gpus} GPU{'s' if gpus > 1 else ''} x {_gib(gpu_memory)} GiB, micro-batch {micro_batch}, {label_tokens} label tokens, "
        f"30 s windows, gradient checkpointing {'on' if gradient_checkpointing else 'off'}, {attention} attention, "
        "bf16/fp16",
        f"every mode runs with: training.micro_batch_size={micro_batch} {COMMON_KEYS}"
        + ("" if gradient_checkpointing else " (here: training.gradient_checkpointing=false)"),
        "",
    ]
    rows = [["mode", "run with", "weights", "grads", "optimizer", "activations", "other", "total GiB", "fits"]]
    for e in estimates:
        m = get_mode(e.mode)
        run = f"{m.recipe} + {launch_config(m, gpus).removeprefix('launch_configs/')}"
        rows.append([e.mode, run, _gib(e.weights), _gib(e.grads), _gib(e.optimizer), _gib(e.activations),
                     _gib(e.overhead), _gib(e.total), "yes" if e.fits(gpu_memory) else "no"])
    lines.append(format_table(rows))
    lines.append("")
    offload = [e for e in estimates if e.cpu]
    if offload:
        lines.append("host memory for offloaded states (DeepSpeed's estimate, per node): "
                     + ", ".join(f"{e.mode} {_gib(e.cpu)} GiB" for e in offload))
    best = recommend(estimates, gpu_memory)
    if best is None:
        lines.append(f"nothing fits in {_gib(gpu_memory)} GiB per GPU; "
                     + suggestion(stats, gpu_memory, gpus, micro_batch, label_tokens, gradient_checkpointing,
                                  attention=attention, lora_rank=lora_rank, lora_targets=lora_targets))
    else:
        m = get_mode(best.mode)
        lines.append(
            f"recommended: {best.mode} ({m.summary}), the fastest mode that fits: {_gib(best.total)} of "
            f"{_gib(gpu_memory)} GiB per GPU.\n  accelerate launch --config_file {launch_config(m, gpus)} -m toolkit "
            f"train --config RECIPE {m.recipe} training.micro_batch_size={micro_batch} {COMMON_KEYS}"
        )
        more = faster_with_more_gpus(stats, gpu_memory, gpus, best, micro_batch, label_tokens, gradient_checkpointing,
                                     attention=attention, lora_rank=lora_rank, lora_targets=lora_targets)
        if more:
            lines.append(f"  ({more})")
    return "\n".join(lines)


def run_cli(args: argparse.Namespace) -> int:
    """``python -m toolkit plan``; returns the exit status (2 for a bad model or argument)."""
    try:
        gpu_memory = parse_memory(args.gpu_memory)
        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
        stats = load_stats(args.model)
        checkpointing = not args.no_gradient_checkpointing
        kwargs = dict(attention=args.attention, lora_rank=args.lora_rank, lora_targets=targets)
        if args.lora_rank < 1:
            raise PlanError(f"--lora-rank must be >= 1, got {args.lora_rank}")
        estimates = plan(stats, args.gpus, args.micro_batch, args.label_tokens, checkpointing, **kwargs)
    except PlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        for e in estimates:
            print(json.dumps({"model": stats.name, **e.to_dict(gpu_memory)}))
    else:
        print(report(stats, estimates, gpu_memory, args.gpus, args.micro_batch, args.label_tokens, checkpointing,
                     args.attention, args.lora_rank, targets))
    return 0
