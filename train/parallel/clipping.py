"""Gradient clipping by the norm of the whole model's gradient, whatever holds which piece of it.

Under FSDP every gradient is a DTensor shard; with expert parallelism the experts' gradients live on
another mesh than the dense ones, and DTensor cannot sum norms across meshes. So: one norm per mesh
(each reduced over its own ranks), combined as the root of the sum of squares. Every rank then clips by
the same, true norm. Pipeline stages add their squared norms over the pp group.
"""

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def _mesh_key(grad: torch.Tensor):
    return grad.device_mesh if isinstance(grad, DTensor) else None


def by_mesh(parameters: list[torch.nn.Parameter]) -> list[list[torch.nn.Parameter]]:
    """Parameters with gradients, grouped by where their gradients live. Insertion order is the model's,
    the same on every rank, so the per-group reductions line up."""
    groups: dict = {}
    for param in parameters:
        if param.grad is not None:
            groups.setdefault(_mesh_key(param.grad), []).append(param)
    return list(groups.values())


def total_norm(groups: list[list[torch.nn.Parameter]]) -> torch.Tensor:
    norms = []
    for params in groups:
        group = [p.grad for p in params]
        norm = torch.nn.utils.get_total_norm(group, foreach=True)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if len(norms) <= 1:
        return norms[0] if norms else torch.zeros(())
    return torch.stack(norms).pow(2).sum().sqrt()


def clip_grad_norm(
    parameters: Iterable[torch.Tensor],
    max_norm: float,
    counted: Iterable[torch.Tensor] | None = None,
    pipeline_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Clip by the norm of the global gradient; returns that norm (before clipping). max_norm 0 only measures.
    Under pipeline parallelism each rank holds some stages: their norms combine over `pipeline_group`, and
    `counted` leaves out a parameter that is another stage's too (a tied embedding's copy), clipped all the same."""
    groups = by_mesh(list(parameters))
    total = total_norm(by_mesh(list(counted)) if counted is not None else groups)
    if pipeline_group is not None:
        squared = total.pow(2)
        dist.all_reduce(squared, group=pipeline_group)
        total = squared.sqrt()
    if max_norm > 0:  # scales the parameters' .grad; one call per mesh (a foreach op cannot mix meshes)
        for params in groups:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return total
