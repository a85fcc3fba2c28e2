"""Parameter counts on the meta device, against the official checkpoints."""

from __future__ import annotations

from toolkit.memory import ModelStats


def test_parameter_counts_match_the_official_checkpoints(small: ModelStats, large_v3: ModelStats) -> None:
    assert small.total == 241_734_912  # whisper-small: 241.7M
    assert large_v3.total == 1_543_490_560  # whisper-large-v3: 1,543.5M
    for stats in (small, large_v3):
        assert stats.encoder + stats.decoder + stats.embeddings == stats.total
        # Only the encoder's sinusoidal positions (1500 x d_model) are frozen.
        assert stats.total - stats.trainable == 1500 * stats.d_model
    # DeepSpeed's largest layer is the token embedding: vocab x d_model.
    assert small.largest_layer == 51865 * 768
    assert large_v3.largest_layer == 51866 * 1280
    # LoRA r=32 on q_proj, v_proj of every attention block (encoder self, decoder self and cross):
    # blocks x 2 targets x r x (in + out).
    assert small.lora_params() == (12 + 2 * 12) * 2 * 32 * (768 + 768) == 3_538_944
    assert large_v3.lora_params() == (32 + 2 * 32) * 2 * 32 * (1280 + 1280) == 15_728_640
