"""AdamW with the usual parameter groups, and the learning-rate schedule as a pure function of step."""

import math

import torch
import torch.nn as nn

from .config import OptimSection


def build_optimizer(model: nn.Module, optim: OptimSection, device: torch.device) -> torch.optim.AdamW:
    """Weight decay on weight matrices only: not on norms (1-D) nor on the (tied) embedding."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "embed_tokens" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # fused kernels on GPU; foreach (multi-tensor) elsewhere
    kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, **kind)


def lr_at(step: int, max_steps: int, optim: OptimSection) -> float:
    """Linear warmup, then cosine or WSD (warmup-stable-decay) down to lr * min_lr_ratio, or constant."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    floor = optim.lr * optim.min_lr_ratio
    if optim.schedule == "constant":
        return optim.lr
    if optim.schedule == "cosine":
        progress = (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps)
        return floor + (optim.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_start = max(optim.warmup_steps, int(max_steps * (1 - optim.decay_fraction)))
    if step < decay_start:
        return optim.lr
    progress = (step - decay_start) / max(1, max_steps - decay_start)
    return optim.lr - (optim.lr - floor) * min(1.0, progress)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
