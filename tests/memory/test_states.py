"""Model states: hand-computed figures, DeepSpeed's own estimators, and the toolkit's loading choices."""

from __future__ import annotations

import pytest

from toolkit.memory import ModelStats, Scenario, estimate
from toolkit.memory.params import LORA_DROPOUT, LORA_RANK, LORA_TARGETS
from toolkit.memory.states import LORA_BASE_BYTES, zero2_model_states, zero3_model_states


def test_full_ddp_model_states_are_16_bytes_per_parameter(small: ModelStats, large_v3: ModelStats) -> None:
    e = estimate("full", Scenario(small))
    trainable = 241_734_912 - 1500 * 768  # = 240,582,912
    assert e.weights == 4 * 241_734_912 == 966_939_648  # fp32 master weights
    assert e.grads == 4 * trainable == 962_331_648  # fp32 gradients
    assert e.optimizer == 8 * trainable == 1_924_663_296  # AdamW m, v
    e = estimate("full", Scenario(large_v3))
    trainable = 1_543_490_560 - 1500 * 1280
    assert (e.weights, e.grads, e.optimizer) == (6_173_962_240, 4 * trainable, 8 * trainable)
    # Two GPUs: DDP's flat gradient buckets hold a second fp32 copy of the gradients.
    assert estimate("full", Scenario(large_v3, gpus=2)).grads == 8 * trainable


def test_large_v3_offload_and_quantised_bases_by_hand(large_v3: ModelStats) -> None:
    P = 1_543_490_560
    e = estimate("zero2-offload", Scenario(large_v3))
    assert (e.weights, e.grads, e.optimizer) == (2 * P, 0, 0)  # bf16 weights only; states on the CPU
    assert e.cpu == int(P * 16 * 1.5)  # DeepSpeed: P * max(4 * gpus, 16) * 1.5
    e = estimate("zero3-offload", Scenario(large_v3))
    # DeepSpeed: 4 * largest layer; plus up to stage3_max_live_parameters (1e9) gathered bf16 weights.
    assert e.weights == 4 * 51866 * 1280 + 2 * 1_000_000_000 == 2_265_553_920
    # Linear weights in the layers (what bitsandbytes quantises):
    enc = 32 * (4 * 1280**2 + 2 * 1280 * 5120)  # 629,145,600
    dec = 32 * (8 * 1280**2 + 2 * 1280 * 5120)  # 838,860,800 (self- and cross-attention, MLP)
    Q = enc + dec
    assert large_v3.quantizable == Q == 1_468_006_400
    lora = 15_728_640
    nf4 = Q // 2 + Q // 64 + 4 * Q // (64 * 256)  # 4 bits + 8-bit absmax per 64 + fp32 absmax per 256 blocks
    assert nf4 == 757_299_200
    e = estimate("qlora-nf4", Scenario(large_v3))
    assert e.weights == nf4 + 4 * (P - Q) + 4 * lora == 1_122_150_400  # rest fp32 (prepare_model_for_kbit_training)
    assert (e.grads, e.optimizer) == (4 * lora, 8 * lora)
    rows = 32 * (4 * 1280 + 1280 + 5120) + 32 * (8 * 1280 + 5120 + 1280)  # int8 keeps an fp32 scale per row
    assert estimate("lora-int8", Scenario(large_v3)).weights == Q + 4 * rows + 4 * (P - Q) + 4 * lora


# -- DeepSpeed's own estimators -------------------------------------------------------------------


def test_zero_formulas_are_deepspeeds() -> None:
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    for total, largest in ((241_734_912, 39_832_320), (1_543_490_560, 66_388_480)):
        for gpus in (1, 2, 8):
            for offload in (False, True):
                ours = zero2_model_states(total, gpus, offload)
                assert ours == estimate_zero2_model_states_mem_needs(total, gpus, 1, cpu_offload=offload)
                ours = zero3_model_states(total, largest, gpus, offload)
                cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
                    total, largest, gpus, 1, cpu_offload=offload, cpu_offload_params=offload, zero_init=False
                )
                assert ours == (cpu, gpu)


def test_zero3_model_states_shrink_with_gpus(large_v3: ModelStats) -> None:
    states = []
    for gpus in (1, 2, 4, 8):
        e = estimate("zero3", Scenario(large_v3, gpus=gpus))
        states.append(e.weights + e.grads + e.optimizer)
        P, largest = large_v3.total, large_v3.largest_layer
        # DeepSpeed: 4 * largest layer + 18P/N, plus the live gathered parameters (2 * min(P, 1e9)).
        assert states[-1] == 4 * largest + int(18 * P / gpus) + 2 * 1_000_000_000
        assert e.activations == estimate("zero3", Scenario(large_v3, gpus=1)).activations
    assert states == sorted(states, reverse=True) and len(set(states)) == 4
    assert estimate("zero2", Scenario(large_v3, gpus=8)).optimizer < estimate("zero2", Scenario(large_v3)).optimizer


# -- constants that must follow the rest of the toolkit ---------------------------------------------


def test_assumptions_match_the_toolkit() -> None:
    import torch

    from toolkit.adapters import quantization_config
    from toolkit.config import LoraConfig, ModelConfig
    from toolkit.modeling import load_dtype

    base = load_dtype(ModelConfig(name_or_path="x"), "cuda", frozen_base=True)
    assert torch.tensor([], dtype=base).element_size() == LORA_BASE_BYTES
    lora = LoraConfig()
    assert (lora.rank, tuple(lora.target_modules), lora.dropout) == (LORA_RANK, LORA_TARGETS, LORA_DROPOUT)
    nf4 = quantization_config(ModelConfig(name_or_path="x", quantization="nf4"))
    assert nf4.bnb_4bit_use_double_quant and nf4.bnb_4bit_quant_type == "nf4"
