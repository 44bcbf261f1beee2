"""Everything distributed, applied to the model from outside (as torchtitan does), one file per concern:

  process_group  the launcher's environment, device, dtype, gloo / NCCL, the trainer's collectives
  mesh           how ranks split into data-parallel, expert and tensor groups; the device meshes
  precision      compute dtype, autocast, FSDP's mixed-precision policy
  tensor         tensor parallelism: matmuls split inside a node, sequence-parallel norms, vocab-parallel loss
  context        context parallelism: each sequence split over ranks, keys and values gathered for attention
  pipeline       pipeline parallelism: the blocks cut into stages, micro-batches through them under a schedule
  expert         expert parallelism: experts sharded over ranks, tokens swapped by all-to-all
  block_options  activation checkpointing and torch.compile, per block or the whole model
  data_parallel  ddp / fsdp / hsdp wrapping, gradient sync across micro-batches
  clipping       the global gradient norm across meshes
(deepspeed, ZeRO-1/2/3, wraps the model itself: see train/deepspeed_engine.py.)
The same code runs with gloo on CPU and NCCL on GPU.
"""

from collections.abc import Callable

import torch.nn as nn

from ..config import TrainConfig
from .block_options import apply_block_options
from .clipping import clip_grad_norm
from .context import apply_context_parallel, sequence_split
from .data_parallel import apply_ddp, apply_fsdp, gradient_sync, reshards_after_forward
from .expert import apply_expert_parallel
from .mesh import Layout, MeshAxis, WorldMesh, build_world_mesh, check_model_fits, layout_of
from .pipeline import Pipeline, split_into_stages, tied_embedding_group
from .pipeline_plan import V_SHAPED, pass_micro_batches, stage_uses_fsdp, stages_per_rank
from .precision import autocast, compute_dtype
from .process_group import (
    Env,
    LaunchError,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    broadcast_from_main,
    setup,
    teardown,
    uses_cuda,
)
from .tensor import apply_tensor_parallel, forward_context


def parallelize(
    model: nn.Module, config: TrainConfig, env: Env, init_weights: Callable[[nn.Module], None]
) -> nn.Module:
    """Split a meta-device model: tensor, expert and context parallelism, activation checkpointing and compile
    (per block, or whole with one process), FSDP; then `init_weights(model)` allocates and fills this rank's
    shards; DDP last (it copies rank 0's weights). The order matters: the styles address modules by their
    names in the plain model, and FSDP shards what the other dimensions left on each rank."""
    strategy = config.parallel.strategy
    mesh = build_world_mesh(env.layout, env.device.type) if strategy in ("fsdp", "hsdp") else None
    split(model, config, env, mesh, one_graph=strategy == "none")
    init_weights(model)
    if strategy == "ddp":
        return apply_ddp(model, env.device)
    return model


def split(
    model: nn.Module, config: TrainConfig, env: Env, mesh: WorldMesh | None, one_graph: bool, shard: bool = True
) -> None:
    """Every dimension but pipelining, on a whole model or on one pipeline stage (same names, same parts);
    FSDP unless not `shard`."""
    if mesh is not None and env.layout.tp > 1:
        apply_tensor_parallel(model, mesh.tensor_parallel)
    if mesh is not None and env.layout.ep > 1:
        apply_expert_parallel(model, mesh)
    if mesh is not None and env.layout.cp > 1:
        apply_context_parallel(model, mesh.context_parallel)
    apply_block_options(model, config, env.device, one_graph=one_graph)
    if mesh is not None and shard:
        apply_fsdp(model, mesh, env.dtype, reshards_after_forward(config.parallel.reshard_after_forward, env.layout.pp))


def parallelize_pipeline(
    model: nn.Module, config: TrainConfig, env: Env, init_weights: Callable[[nn.Module], None], micro_batches: int
) -> Pipeline:
    """This rank's pipeline stages of a meta-device model, each split like a whole model and then allocated,
    under the configured schedule."""
    layout, par = env.layout, config.parallel
    mesh = build_world_mesh(layout, env.device.type)
    parts = split_into_stages(
        model, layout.pp_rank(env.rank), layout.pp, par.pp_schedule, par.pp_virtual_stages, config.data.seq_len
    )
    for part in parts:
        part.sequence_shards, part.cp_rank, part.cp_size = layout.tp, layout.cp_rank(env.rank), layout.cp
        split(part, config, env, mesh, one_graph=False, shard=stage_uses_fsdp(layout))
        init_weights(part)
    stages = layout.pp * stages_per_rank(par.pp_schedule, par.pp_virtual_stages)
    return Pipeline(
        parts,
        stages,
        par.pp_schedule,
        micro_batches,
        pass_micro_batches(par.pp_microbatches, micro_batches),
        mesh.pipeline_parallel.get_group(),
        tied_embedding_group(mesh, model.config.tie_word_embeddings and par.pp_schedule not in V_SHAPED),
        env.device,
        lambda logits, targets: parts[-1].next_token_loss(logits, targets),
    )


__all__ = [
    "Env",
    "Layout",
    "LaunchError",
    "MeshAxis",
    "WorldMesh",
    "all_reduce_max",
    "all_reduce_sum",
    "apply_block_options",
    "autocast",
    "barrier",
    "broadcast_from_main",
    "build_world_mesh",
    "check_model_fits",
    "clip_grad_norm",
    "compute_dtype",
    "forward_context",
    "gradient_sync",
    "layout_of",
    "parallelize",
    "parallelize_pipeline",
    "Pipeline",
    "sequence_split",
    "setup",
    "teardown",
    "uses_cuda",
]
