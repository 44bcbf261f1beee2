"""Data parallelism: the wrapper that keeps replicas or shards in step.

  ddp   DistributedDataParallel: full replicas, gradients all-reduced;
  fsdp  FSDP2 `fully_shard` per block and on the root: parameters, gradients and optimizer state
        sharded over the data-parallel ranks (ZeRO-3);
  hsdp  the same on a 2-D mesh: replicate across nodes x shard inside a node.
With expert parallelism, each MoE's experts are their own FSDP unit on the expert mesh's data-parallel
ranks, and the router its own unit on the dense mesh (its gradient must be reduced over every rank
that routed tokens, the ep group included), both inside the block's unit.
"""

import contextlib

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from .expert import moe_layers
from .mesh import WorldMesh
from .precision import fsdp_policy


def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    # gradient_as_bucket_view: gradients live in the all-reduce buckets, saving a copy and memory
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True
    )


def reshards_after_forward(configured: bool | None, pp: int) -> bool:
    """parallel.reshard_after_forward, or its default: yes without pipelining; with it, a stage's parameters stay
    gathered from the first micro-batch's forward to the last one's backward (one gather a step, not one per
    micro-batch), and the split backward of the V schedules needs them there."""
    return configured if configured is not None else pp == 1


def apply_fsdp(model: nn.Module, mesh: WorldMesh, dtype: torch.dtype, reshard_after_forward: bool) -> None:
    options = dict(mp_policy=fsdp_policy(dtype), reshard_after_forward=reshard_after_forward)
    if mesh.expert is not None:
        for moe in moe_layers(model):
            fully_shard(moe.router, mesh=mesh.data_parallel, **options)
            fully_shard(moe, mesh=mesh.expert_data_parallel, **options)  # its w_gate / w_up / w_down
    for block in model.model.layers.children():  # a pipeline stage's are a ModuleDict
        fully_shard(block, mesh=mesh.data_parallel, **options)
    fully_shard(model, mesh=mesh.data_parallel, **options)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of a step."""
    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)  # recurses into every FSDP unit, the experts' too
    yield
