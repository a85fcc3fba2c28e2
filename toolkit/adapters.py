"""LoRA (PEFT) and quantised bases (bitsandbytes): wrap, checkpoint the adapter alone, export merged.

A LoRA run's checkpoints hold only the trainable weights: the base (possibly int8/NF4) is the
checkpoint it started from and never changes, so saving it again every few hundred steps would
cost gigabytes for nothing. :class:`AdapterCheckpointHooks` plugs that into accelerate's
``save_state``/``load_state``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from toolkit.config import LoraConfig, ModelConfig

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
"""torch dtypes by their config names (``model.compute_dtype``, ``evaluate --dtype``)."""
ADAPTER_DIR = "adapter"


def quantization_config(model_cfg: ModelConfig) -> Any | None:
    """bitsandbytes settings for ``model.quantization`` (None for a full-precision base)."""
    if model_cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if model_cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=DTYPES[model_cfg.compute_dtype],
    )


def target_modules(lora_cfg: LoraConfig, freeze_encoder: bool) -> list[str] | str:
    """Module names for PEFT; with a frozen encoder, only the decoder's layers get adapters."""
    if not freeze_encoder:
        return list(lora_cfg.target_modules)
    names = "|".join(lora_cfg.target_modules)
    return rf".*decoder\..*\.({names})$"


def apply_lora(model: Any, lora_cfg: LoraConfig, *, freeze_encoder: bool = False) -> Any:
    """Freeze the base and add LoRA adapters; returns the PEFT model."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(
        r=lora_cfg.rank,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=target_modules(lora_cfg, freeze_encoder),
        bias="none",
    )
    return get_peft_model(model, config)


def prepare_quantized(model: Any, gradient_checkpointing: bool) -> Any:
    """PEFT's k-bit preparation: freeze, cast norms to fp32, make inputs carry grad for checkpointing."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )


def is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is an optional extra
        return False
    return isinstance(model, PeftModel)


class AdapterCheckpointHooks:
    """accelerate save/load pre-hooks that keep only the trainable (adapter) weights in checkpoints."""

    FILE = "adapter_weights.safetensors"

    def __init__(self, accelerator: Any):
        self.accelerator = accelerator

    def _trainable(self, model: Any) -> dict[str, torch.Tensor]:
        unwrapped = self.accelerator.unwrap_model(model)
        return {name: p.detach() for name, p in unwrapped.named_parameters() if p.requires_grad}

    def save(self, models: list, weights: list, output_dir: str) -> None:
        for index, model in enumerate(models):
            if is_peft(self.accelerator.unwrap_model(model)) and index < len(weights):
                weights[index] = {k: v.contiguous().cpu() for k, v in self._trainable(model).items()}

    def load(self, models: list, input_dir: str) -> None:
        for model in list(models):
            unwrapped = self.accelerator.unwrap_model(model)
            if not is_peft(unwrapped):
                continue
            state = load_file(str(Path(input_dir) / "model.safetensors"))
            expected = set(self._trainable(model))
            if set(state) != expected:
                missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
                raise RuntimeError(f"{input_dir} does not match this LoRA run (missing {missing}, unexpected {extra})")
            unwrapped.load_state_dict(state, strict=False)
            models.remove(model)  # loaded here; accelerate would want the whole base in the file

    def register(self) -> None:
        self.accelerator.register_save_state_pre_hook(self.save)
        self.accelerator.register_load_state_pre_hook(self.load)


def export_merged(adapter_dir: Path, base: str, target: Path, dtype: torch.dtype = torch.float32) -> None:
    """Load the base at full precision, apply the adapter, merge, and save a plain transformers model.

    The base is reloaded rather than merged in place because a quantised (int8/NF4) base cannot
    take the merged weights without rounding them away.
    """
    from peft import PeftModel
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(base, dtype=dtype)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.config.use_cache = True
    merged.save_pretrained(str(target), safe_serialization=True)


def adapter_base(adapter_dir: Path) -> str | None:
    """The base checkpoint an adapter directory was trained on (from PEFT's adapter_config.json)."""
    config = adapter_dir / "adapter_config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("base_model_name_or_path")
