"""The optimizers (AdamW, or Muon for the hidden matrices with AdamW for the rest) with the usual parameter
groups, and the learning-rate schedule as a pure function of step."""

import math
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor

from .config import OptimSection

# Keller Jordan's quintic Newton-Schulz coefficients (as torch.optim.Muon): steep at 0, so 5 steps suffice
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    """What Muon updates: the blocks' weight matrices, a stacked [E, in, out] expert weight as E matrices.
    The embedding, an untied lm_head, the router and the norms stay on AdamW (as Muon's authors do)."""
    return param.ndim >= 2 and ".layers." in name and "router" not in name


def build_optimizer(model: nn.Module, optim: OptimSection, device: torch.device) -> torch.optim.Optimizer:
    """Weight decay on weight matrices only: not on norms (1-D) nor on the (tied) embedding."""
    decay, no_decay, hidden = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if optim.name == "muon" and is_hidden_matrix(name, param):
            hidden.append(param)
        else:
            (no_decay if param.ndim < 2 or "embed_tokens" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if optim.name == "muon":
        groups.append({"params": hidden, "weight_decay": optim.weight_decay, "muon": True})
        return Muon(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, momentum=optim.muon_momentum)
    # One fused kernel per parameter group, on GPU and CPU alike (on a CPU it takes a third of foreach's time at
    # nanoGPT's shape); foreach on other devices.
    kind = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, **kind)


def orthogonalize(update: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Newton-Schulz iteration towards U V^T of each matrix [..., A, B] (U S V^T its SVD), in fp32: unlike
    torch.optim.Muon's bf16, so that a sharded run and one process agree to fp32 rounding."""
    a, b, c = NEWTON_SCHULZ
    x = update.float()
    wide = x.shape[-2] <= x.shape[-1]
    x = x if wide else x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.mT


class Muon(torch.optim.Optimizer):
    """Muon (momentum, orthogonalised) for the groups marked `muon`, AdamW for the others, at one learning
    rate: Muon's update is scaled to AdamW's RMS (0.2 sqrt(max(A, B)), Moonshot's Muon-is-scalable rule).

    A sharded matrix (FSDP / TP / EP DTensor) is gathered whole for the orthogonalisation, which every rank
    computes, and each rank keeps its own shard of the result: the same numbers as one process."""

    def __init__(
        self,
        groups: list[dict],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        momentum: float = 0.95,
    ):
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, momentum=momentum, muon=False))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if group["weight_decay"]:
                    param.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled decay, as AdamW
                (self._muon if group["muon"] else self._adamw)(param, self.state[param], group)

    @staticmethod
    def _muon(param: torch.Tensor, state: dict, group: dict):
        momentum = group["momentum"]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param)
        buffer = state["momentum_buffer"].mul_(momentum).add_(param.grad)
        nesterov = param.grad.add(buffer, alpha=momentum)
        whole = nesterov.full_tensor() if isinstance(nesterov, DTensor) else nesterov
        update = orthogonalize(whole).to(param.dtype)
        if isinstance(param, DTensor):  # this rank's shard of the whole update, no communication
            update = distribute_tensor(update, param.device_mesh, param.placements, src_data_rank=None)
        rows, cols = param.shape[-2:]
        param.add_(update, alpha=-group["lr"] * 0.2 * math.sqrt(max(rows, cols)))

    @staticmethod
    def _adamw(param: torch.Tensor, state: dict, group: dict):
        beta1, beta2 = group["betas"]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(param), torch.zeros_like(param)
        state["step"] += 1  # a tensor, as torch's AdamW keeps it: the bias corrections need no host sync
        step = state["step"]
        state["exp_avg"].lerp_(param.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
        denominator = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(group["eps"])
        param.addcdiv_(state["exp_avg"] / (1 - beta1**step), denominator, value=-group["lr"])


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
