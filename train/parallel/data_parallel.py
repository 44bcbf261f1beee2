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
import os
from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from ..config import TrainConfig
from .expert import moe_layers
from .mesh import WorldMesh
from .precision import fsdp_policy


def use_persistent_compile_cache() -> None:
    """Inductor's compiled kernels and graphs go to a per-user cache that outlives /tmp cleanups and reboots
    (a TORCHINDUCTOR_CACHE_DIR of the user's own wins): a re-run loads them instead of compiling again."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    # Importing parts of torch (flex attention among them) already writes inductor's /tmp default into the
    # environment, so a setdefault would never take: only that default, or nothing, is replaced.
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not current or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(persistent_compile_cache_dir())


def persistent_compile_cache_dir() -> Path:
    return Path.home() / ".cache" / "minicolossus" / "inductor"


def apply_block_options(model: nn.Module, config: TrainConfig, device: torch.device,
                        one_graph: bool = False) -> None:
    """Activation checkpointing per block, and torch.compile: per block, or with one_graph (a single process,
    nothing hooked in between blocks) the whole model as one graph. One graph saves each block's call overhead
    and compiles the embedding, final norm and loss too (+4-8% a step at nanoGPT's shape on a CPU); under DDP,
    FSDP and DeepSpeed each block stays its own graph, so that their per-block hooks overlap communication
    with compute."""
    if config.parallel.compile:
        use_persistent_compile_cache()
        if device.type == "cpu":
            # Compiled graphs call their kernels from C++ rather than Python: on a CPU that per-kernel overhead
            # is a visible part of a small model's step (+1-3% at nanoGPT's shape).
            from torch._inductor import config as inductor_config  # only when compiling: not at every start-up
            inductor_config.cpp_wrapper = True
    whole_model = config.parallel.compile and one_graph and not config.parallel.activation_checkpointing
    blocks = model.model.layers
    for i, block in enumerate(blocks):
        if config.parallel.activation_checkpointing:
            block = checkpoint_wrapper(block)
        if config.parallel.compile and not whole_model:
            block.compile()
        blocks[i] = block
    if whole_model:
        model.compile()  # in place: parameter names and state_dict keys stay the plain model's


def apply_ddp(model: nn.Module, device) -> nn.Module:
    # gradient_as_bucket_view: gradients live in the all-reduce buckets, saving a copy and memory
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True)


def apply_fsdp(model: nn.Module, mesh: WorldMesh, dtype, reshard_after_forward: bool) -> None:
    options = dict(mp_policy=fsdp_policy(dtype), reshard_after_forward=reshard_after_forward)
    if mesh.expert is not None:
        for moe in moe_layers(model):
            fully_shard(moe.router, mesh=mesh.data_parallel, **options)
            fully_shard(moe, mesh=mesh.expert_data_parallel, **options)  # its w_gate / w_up / w_down
    for block in model.model.layers:
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
