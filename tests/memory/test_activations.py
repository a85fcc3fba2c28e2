"""Activations: a hand-computed figure (ZeRO-2, whisper-small) and how the settings move the estimate."""

from __future__ import annotations

from toolkit.memory import GIB, ModelStats, Scenario, estimate
from toolkit.memory.estimate import CUDA_CONTEXT_BYTES, FRAGMENTATION


def test_zero2_small_activations_by_hand(small: ModelStats) -> None:
    """whisper-small under ZeRO-2 (pure bf16), micro-batch 16, 448 label tokens, checkpointing on."""
    e = estimate("zero2", Scenario(small, gpus=1, micro_batch=16, label_tokens=448, gradient_checkpointing=True))
    b, L, h, s, V = 16, 448, 768, 1500, 51865
    conv = 2 * b * (2 * s * 80 + 5 * s * h)  # 192,000,000: conv1 input, GELU in/out, conv2's GELU input
    enc_ckpt = 12 * 2 * s * b * h  # 442,368,000: each encoder layer's bf16 input
    dec_ckpt = 12 * 2 * L * b * h  # 132,120,576
    enc_out = (2 + 2) * s * b * h  # 73,728,000: final layer norm input and output (the encoder output)
    dec_out = (2 + 2) * L * b * h  # 22,020,096: final layer norm input and output (proj_out's input)
    kept = conv + enc_ckpt + dec_ckpt + enc_out + dec_out
    assert kept == 862_236_672
    loss = 12 * b * L * V  # 4,461,219,840: fp32 log-softmax, its gradient, the logits' gradient
    # One encoder layer recomputed: 32sbh + 2sbh (SDPA output) + 16 B/token norm stats + the
    # log-sum-exp (4*b*heads*s), less its checkpointed input (2sbh): 591,360,000 < the loss term.
    recompute = s * b * (34 * h + 16) + 4 * b * 12 * s - 2 * s * b * h
    assert recompute == 591_360_000 < loss
    assert e.activations == kept + loss == 5_323_456_512
    # DeepSpeed: 2P + 18P/N on one GPU.
    assert e.weights + e.grads + e.optimizer == 2 * 241_734_912 + 18 * 241_734_912 == 4_834_698_240
    assert e.allocated == 4_834_698_240 + 5_323_456_512
    assert e.total == e.allocated + CUDA_CONTEXT_BYTES + int(FRAGMENTATION * e.allocated)
    assert round(e.total / GIB, 2) == 10.43


def test_checkpointing_off_and_eager_attention_cost_more(small: ModelStats) -> None:
    scenario = Scenario(small, micro_batch=8)
    on = estimate("full", scenario)
    off = estimate("full", scenario.but(gradient_checkpointing=False))
    eager = estimate("full", scenario.but(attention="eager"))
    assert off.activations > 2 * on.activations
    assert eager.activations >= on.activations
    assert estimate("full", scenario.but(label_tokens=100)).activations < on.activations
