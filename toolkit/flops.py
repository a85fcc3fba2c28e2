"""Analytic FLOP count of Whisper (``WhisperForConditionalGeneration``), for MFU.

A multiply-add counts as 2 FLOPs; only matrix products and convolutions are counted.

Symbols: d = d_model, f = ffn dim (f_e = encoder_ffn_dim, f_d = decoder_ffn_dim), L_e / L_d = encoder /
decoder layers, n = num_mel_bins, V = vocab_size, T = max_source_positions = 1500 encoder positions
(the encoder always sees a 30 s window: 3000 mel frames, conv stride 2 -> 1500) and t = the decoder
length of one sample (label tokens fed to the decoder). Attention heads do not appear: h * d_head = d.

Per sample (one 30 s window)::

    convs    = 2*3*(2T)*n*d            conv1, kernel 3, over 3000 frames, n -> d
             + 2*3*T*d*d               conv2, kernel 3, stride 2, 1500 positions, d -> d
    enc_layer = T * (4 * 2*d*d)        q, k, v, o projections
              + 2 * 2*T*T*d            scores Q K^T and A V, the full T x T square
              + T * (2 * 2*d*f_e)      FFN, fc1 and fc2
    encoder  = convs + L_e * enc_layer

    dec_layer = t * (4 * 2*d*d)        self-attention q, k, v, o
              + 2 * 2*t*t*d            self-attention scores (full t x t square)
              + t * (2 * 2*d*d)        cross-attention q and o
              + T * (2 * 2*d*d)        cross-attention k and v over the encoder output
              + 2 * 2*t*T*d            cross-attention scores
              + t * (2 * 2*d*f_d)      FFN
    decoder  = L_d * dec_layer + t * 2*d*V     output projection (tied to the token embedding)

    forward(batch) = sum over samples of encoder + decoder(t)

The full squares are what eager attention and SDPA compute (and what ``FlopCounterMode`` counts) even for
the causal decoder. Ignored: layer norms, softmax, GELU, scaling, biases, residual adds, embedding
lookups. With ~8 FLOPs per layer-norm/GELU element and ~7 per attention score (scale, softmax, mask)
they come to 1.3% of the total for whisper-tiny, 1.1% for base and under 1% from small up (0.8% for
small, 0.55% for large-v3), whatever t; checked in ``tests/test_flops.py``.

whisper-small (d 768, 12 + 12 layers, f 3072, V 51865) at t = 32: 397 GFLOPs forward per window, of
which the encoder is 87% (it does not depend on the transcript); at t = 448, the longest label, 543
GFLOPs with the encoder at 63%.

Training counts 3x forward (backward = 2x forward: one product for the input gradient, one for the
weight gradient) and 4x with gradient checkpointing (the forward runs again in the backward). These are
round model-level factors. What runs is a little less: the first conv needs no input gradient (2.997x for
whisper-small), and under checkpointing the convs and the output projection sit outside the checkpointed
layers while torch's non-reentrant checkpoint (the toolkit's choice) stops replaying a layer once the
tensors its backward needs are back, so each layer's fc2 is not rerun: about 3.75x, not 4x, for every
size. Fused SDPA kernels, on the other hand, recompute Q K^T in their backward (``FlopCounterMode`` counts
2.5x their forward), which the model count leaves out. Strictly, MFU in the PaLM sense counts no
recomputation (3x with or without checkpointing, so pass ``gradient_checkpointing=False`` for it); 4x is
a hardware-FLOPs (HFU) figure. The 3x assumes full fine-tuning: with a frozen encoder or LoRA the frozen
weights' gradients are skipped and less work is done, but the same 3x is counted so that MFU stays
comparable across recipes (it then over-states the work done); LoRA's own rank-r products are not counted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import WhisperConfig

# Dense (no 2:4 sparsity) peak TFLOP/s per device. Keys: "bfloat16" / "float16" (tensor cores, fp32
# accumulate), "tf32" (tensor cores, fp32 matmuls with TF32 allowed) and "float32" (plain fp32 on CUDA
# cores, TF32 off). A name matches when it appears in ``torch.cuda.get_device_name()`` (any case) not
# glued to other letters or digits ("A10" is not in "A100-SXM4-80GB"); the first match wins, so the more
# specific names come first (H100 PCIe before H100). Values are NVIDIA's datasheet numbers, sparse
# figures halved. A10G is approximate: an AWS-only part with no NVIDIA datasheet, whose tensor
# throughput is below the A10's (about 70 bf16, against 125).
_HOPPER_SXM = {"bfloat16": 989.0, "float16": 989.0, "tf32": 494.0, "float32": 67.0}
_HOPPER_NVL = {"bfloat16": 835.0, "float16": 835.0, "tf32": 418.0, "float32": 60.0}
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bfloat16": 756.0, "float16": 756.0, "tf32": 378.0, "float32": 51.0},
    "H100 NVL": _HOPPER_NVL,
    "H200 NVL": _HOPPER_NVL,
    "H100": _HOPPER_SXM,
    "H200": _HOPPER_SXM,
    "GH200": _HOPPER_SXM,
    "A100": {"bfloat16": 312.0, "float16": 312.0, "tf32": 156.0, "float32": 19.5},
    "A10G": {"bfloat16": 70.0, "float16": 70.0, "tf32": 35.0, "float32": 35.0},
    "A10": {"bfloat16": 125.0, "float16": 125.0, "tf32": 62.5, "float32": 31.2},
    "L40S": {"bfloat16": 362.0, "float16": 362.0, "tf32": 183.0, "float32": 91.6},
    "L40": {"bfloat16": 181.0, "float16": 181.0, "tf32": 90.5, "float32": 90.5},
    "L4": {"bfloat16": 121.0, "float16": 121.0, "tf32": 60.0, "float32": 30.3},
    "V100-PCIE": {"float16": 112.0, "float32": 14.0},
    "V100": {"float16": 125.0, "float32": 15.7},
    "T4": {"float16": 65.0, "float32": 8.1},
    "RTX 4090": {"bfloat16": 165.2, "float16": 165.2, "tf32": 82.6, "float32": 82.6},
    "RTX 3090": {"bfloat16": 71.0, "float16": 71.0, "tf32": 35.6, "float32": 35.6},
}

_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}


def _dims(config: WhisperConfig) -> tuple[int, int, int]:
    """(d, T, n): model width, encoder positions, mel bins."""
    return config.d_model, config.max_source_positions, config.num_mel_bins


def encoder_flops(config: WhisperConfig) -> int:
    """Forward FLOPs of the encoder (both convs and all layers) for one 30 s window."""
    d, T, n = _dims(config)
    f = config.encoder_ffn_dim
    convs = 2 * 3 * (2 * T) * n * d + 2 * 3 * T * d * d
    layer = T * 4 * 2 * d * d + 2 * 2 * T * T * d + T * 2 * 2 * d * f
    return convs + config.encoder_layers * layer


def decoder_flops(config: WhisperConfig, t: int) -> int:
    """Forward FLOPs of the decoder and output projection for one sample of ``t`` decoder positions."""
    d, T, _ = _dims(config)
    f = config.decoder_ffn_dim
    self_attn = t * 4 * 2 * d * d + 2 * 2 * t * t * d
    cross_attn = t * 2 * 2 * d * d + T * 2 * 2 * d * d + 2 * 2 * t * T * d
    layer = self_attn + cross_attn + t * 2 * 2 * d * f
    return config.decoder_layers * layer + t * 2 * d * config.vocab_size


def forward_flops(config: WhisperConfig, decoder_lengths: Sequence[int]) -> int:
    """Forward FLOPs of one batch: one 30 s window per entry of ``decoder_lengths``.

    Each entry is the number of positions the decoder runs for that sample: the padded length for a
    padded batch (what the hardware computes), or the unpadded one to count only useful work.
    """
    decoders = sum(decoder_flops(config, t) for t in decoder_lengths)
    return len(decoder_lengths) * encoder_flops(config) + decoders


def training_flops(
    config: WhisperConfig, decoder_lengths: Sequence[int], gradient_checkpointing: bool = False
) -> int:
    """FLOPs of one training step (forward + backward) on a batch: 3x forward, 4x with checkpointing."""
    return (4 if gradient_checkpointing else 3) * forward_flops(config, decoder_lengths)


def peak_flops(device_name: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of ``device_name`` (e.g. ``torch.cuda.get_device_name()``) for ``dtype``.

    ``dtype`` is "bfloat16", "float16", "tf32" or "float32" (a ``torch.dtype``'s str and short forms
    such as "bf16" are accepted). None when the device or the dtype is not in ``PEAK_TFLOPS`` (a CPU,
    a newer GPU, bfloat16 on a T4), so that no made-up MFU is reported.
    """
    key = dtype.lower().removeprefix("torch.")
    key = _DTYPE_ALIASES.get(key, key)
    name = device_name.lower()
    for pattern, table in PEAK_TFLOPS.items():
        if re.search(rf"(?<![a-z0-9]){re.escape(pattern.lower())}(?![a-z0-9])", name):
            tflops = table.get(key)
            return None if tflops is None else tflops * 1e12
    return None


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over ``peak`` (FLOP/s); None without a peak or a time.

    ``flops`` and ``peak`` must cover the same devices: one rank's FLOPs with one device's peak, or the
    whole job's FLOPs with the peak times the number of devices.
    """
    if peak is None or peak <= 0 or seconds <= 0:
        return None
    return flops / seconds / peak
