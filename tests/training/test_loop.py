"""Loop pieces that need no launch: precision checks and the loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from toolkit.config import ConfigError, load_config
from toolkit.data.collator import Batch
from toolkit.training.loop import make_accelerator
from toolkit.training.step import loss_sum

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_fp16_without_a_gpu_is_refused() -> None:
    config = load_config(ROOT / "recipes" / "demo.yaml", ["model.name_or_path=x", "training.mixed_precision=fp16"])
    with pytest.raises(ConfigError, match="training.mixed_precision=fp16 needs a CUDA GPU; use bf16 or no on CPU"):
        make_accelerator(config)


def test_loss_sum_is_the_summed_token_cross_entropy(tiny_model: Path) -> None:
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(tiny_model).eval()
    labels = torch.tensor([[363, 40, 41, 256], [363, 42, 256, -100]])
    batch = Batch(torch.randn(2, 80, 3000), labels, ["a", "b"], ["x", "y"])
    start = model.config.decoder_start_token_id
    summed = loss_sum(model, batch, model.config.pad_token_id, start)
    # The model's own loss is the mean over the 7 label tokens.
    mean = model(input_features=batch.input_features, labels=labels).loss
    torch.testing.assert_close(summed / 7, mean, rtol=1e-5, atol=1e-5)
