"""LoRA wrapping: target modules, frozen encoder, trainable parameter counts."""

from __future__ import annotations

from pathlib import Path

from toolkit.adapters import apply_lora, target_modules
from toolkit.config import LoraConfig


def test_lora_targets_every_attention_block(tiny_model: Path) -> None:
    from transformers import WhisperForConditionalGeneration

    model = apply_lora(WhisperForConditionalGeneration.from_pretrained(tiny_model), LoraConfig(rank=4))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    # 2 encoder self-attn + 2 decoder self-attn + 2 cross-attn blocks, q and v, A and B matrices.
    assert len(trainable) == 6 * 2 * 2 and all("lora_" in name for name in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 24 * 4 * 64


def test_frozen_encoder_gets_no_adapters(tiny_model: Path) -> None:
    from transformers import WhisperForConditionalGeneration

    assert target_modules(LoraConfig(), freeze_encoder=True) == r".*decoder\..*\.(q_proj|v_proj)$"
    model = apply_lora(WhisperForConditionalGeneration.from_pretrained(tiny_model), LoraConfig(), freeze_encoder=True)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".decoder." in name for name in trainable)
