"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import torch
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

from toolkit.config import TrainingConfig

NO_DECAY = ("bias", "layer_norm", "layernorm", "norm.weight")


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if any(key in name.lower() for key in NO_DECAY) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: TrainingConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.weight_decay)
    hyper = {"lr": cfg.learning_rate, "betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon}
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **hyper)
    # The fused kernel exists for CUDA and CPU tensors in torch >= 2.4; anything else uses foreach.
    return torch.optim.AdamW(groups, fused=device.type in ("cuda", "cpu"), **hyper)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per optimizer step by the loop itself.

    It is deliberately not passed through ``accelerator.prepare``: accelerate's wrapper steps a
    scheduler once per process per call, which shortens warm-up and decay N-fold on N processes.
    """
    if cfg.lr_scheduler == "constant":
        return get_constant_schedule_with_warmup(optimizer, cfg.warmup_steps)
    return get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
