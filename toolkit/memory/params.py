"""Parameter counts of a Whisper model, from its config alone.

:meth:`ModelStats.from_config` builds ``WhisperForConditionalGeneration`` on the ``meta`` device (no
memory, no weights) and counts what the estimates need, so the counts cannot drift from
transformers' Whisper. The LoRA defaults are :class:`toolkit.config.LoraConfig`'s, read from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from toolkit.config import LoraConfig
from toolkit.memory.sizes import resolve_config

_LORA_DEFAULTS = LoraConfig()
LORA_RANK: int = _LORA_DEFAULTS.rank
LORA_TARGETS: tuple[str, ...] = tuple(_LORA_DEFAULTS.target_modules)
LORA_DROPOUT: float = _LORA_DEFAULTS.dropout
"""Defaults of :class:`toolkit.config.LoraConfig` (PEFT's int8 Whisper recipe)."""
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
"""The linear modules of a Whisper layer: what ``lora.target_modules`` may name."""

ADAM8BIT_MIN_SIZE = 4096
"""bitsandbytes' AdamW8bit keeps 32-bit states for tensors under ``min_8bit_size`` values."""


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
        """Output rows of the quantised linears (LLM.int8 keeps a scale per row)."""
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


def model_stats(model: ModelStats | str | Any) -> ModelStats:
    """:class:`ModelStats` for stats (returned as they are), a name or path (:func:`load_stats`) or a ``WhisperConfig``."""
    if isinstance(model, ModelStats):
        return model
    if isinstance(model, str):
        return load_stats(model)
    return ModelStats.from_config(model)
