"""Everything distributed, applied to the model from outside (as torchtitan does), one file per concern:

  process_group  the launcher's environment, device, dtype, gloo / NCCL, the trainer's collectives
  mesh           how ranks split into data-parallel, expert and tensor groups; the device meshes
  precision      compute dtype, autocast, FSDP's mixed-precision policy
  expert         expert parallelism: experts sharded over ranks, tokens swapped by all-to-all
  data_parallel  ddp / fsdp / hsdp wrapping, gradient sync across micro-batches
  clipping       the global gradient norm across meshes
(deepspeed, ZeRO-1/2/3, wraps the model itself: see train/deepspeed_engine.py.)
The same code runs with gloo on CPU and NCCL on GPU.
"""

import torch.nn as nn

from ..config import TrainConfig
from .clipping import clip_grad_norm
from .data_parallel import apply_block_options, apply_ddp, apply_fsdp, gradient_sync
from .expert import apply_expert_parallel
from .mesh import Layout, WorldMesh, build_world_mesh, check_model_fits, layout_of
from .precision import autocast, compute_dtype
from .process_group import (Env, LaunchError, all_reduce_max, all_reduce_sum, barrier, broadcast_from_main, setup,
                            teardown, uses_cuda)


def parallelize(model: nn.Module, config: TrainConfig, env: Env) -> nn.Module:
    """Block options, then expert parallelism, then the data-parallel wrapper (the order matters: FSDP
    shards what the other dimensions left on each rank)."""
    apply_block_options(model, config)
    strategy = config.parallel.strategy
    if strategy == "ddp":
        return apply_ddp(model, env.device)
    if strategy in ("fsdp", "hsdp"):
        mesh = build_world_mesh(env.layout, env.device.type)
        if env.layout.ep > 1:
            apply_expert_parallel(model, mesh)
        apply_fsdp(model, mesh, env.dtype, config.parallel.reshard_after_forward)
    return model


__all__ = ["Env", "Layout", "LaunchError", "WorldMesh", "all_reduce_max", "all_reduce_sum", "apply_block_options",
           "autocast", "barrier", "broadcast_from_main", "build_world_mesh", "check_model_fits", "clip_grad_norm",
           "compute_dtype", "gradient_sync", "layout_of", "parallelize", "setup", "teardown", "uses_cuda"]
