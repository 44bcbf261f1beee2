"""Everything distributed, applied from outside the model (as torchtitan does).

  none  one process;
  ddp   DistributedDataParallel: full replicas, gradients all-reduced;
  fsdp  FSDP2 `fully_shard` per block and on the root: parameters, gradients and optimizer state
        sharded over all ranks (ZeRO-3);
  hsdp  FSDP2 on a 2-D mesh: replicate across nodes x shard inside a node.
(deepspeed, ZeRO-1/2/3, wraps the model itself: see deepspeed_engine.py.)
The same code runs with gloo on CPU and NCCL on GPU.
"""

import contextlib
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from .config import ConfigError, TrainConfig


class LaunchError(RuntimeError):
    """The processes of a job could not form a group; the message says what to check."""


@dataclass
class Env:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    dtype: torch.dtype  # compute dtype: bf16 autocast on GPU, fp32 on CPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_initialized()


def uses_cuda(config: TrainConfig) -> bool:
    """run.device resolved: "auto" is CUDA when one is visible."""
    if config.run.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device 'cuda': no CUDA device is visible; use run.device = \"cpu\" or \"auto\"")
    return config.run.device == "cuda" or (config.run.device == "auto" and torch.cuda.is_available())


def compute_dtype(config: TrainConfig, use_cuda: bool) -> torch.dtype:
    """precision.dtype resolved: "auto" is bf16 on GPU, fp32 on CPU (no bf16 units on most CPUs)."""
    if config.precision.dtype == "bf16" or (config.precision.dtype == "auto" and use_cuda):
        return torch.bfloat16
    return torch.float32


def setup(config: TrainConfig) -> Env:
    """Read the launcher's environment, pick device and dtype, and start the process group."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    strategy = config.parallel.strategy
    if strategy == "none" and world_size > 1:
        raise ConfigError(f"parallel.strategy 'none' runs one process, but {world_size} were launched; "
                          f"use ddp, fsdp or hsdp")
    use_cuda = uses_cuda(config)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    dtype = compute_dtype(config, use_cuda)
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 or strategy != "none":
        if "MASTER_ADDR" not in os.environ:  # one process, started without a launcher: a private rendezvous
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(_free_port())
            for key, value in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0), ("LOCAL_WORLD_SIZE", 1)):
                os.environ.setdefault(key, str(value))  # what a launcher would say (DeepSpeed reads them)
        timeout = timedelta(seconds=config.run.timeout_s)
        try:
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout, store=_restart_store(timeout),
                                    device_id=device if use_cuda else None, rank=rank, world_size=world_size)
        except (dist.DistError, RuntimeError) as error:  # a rank that never came: fail within the timeout
            first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
            raise LaunchError(
                f"the {world_size} processes did not all join at {os.environ['MASTER_ADDR']}:"
                f"{os.environ['MASTER_PORT']} within run.timeout_s={config.run.timeout_s} ({first[:200]}); start "
                f"every node, check that they reach that address, or raise run.timeout_s") from error
    return Env(rank, world_size, local_rank, local_world_size, device, dtype)


def _restart_store(timeout: timedelta) -> dist.Store | None:
    """After torchrun restarts a failed job, its store still holds the dead attempt's keys (gloo's peer
    addresses among them), which the new processes would read and fail to connect to. Give each attempt
    its own key space. None (the default env:// store) for a first attempt."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0:
        return None
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=not agent_hosts_store and os.environ["RANK"] == "0",
                          timeout=timeout)
    return dist.PrefixStore(f"minicolossus/attempt_{attempt}", store)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def build_mesh(config: TrainConfig, env: Env) -> DeviceMesh | None:
    strategy = config.parallel.strategy
    if strategy in ("none", "ddp"):
        return None
    if strategy == "fsdp":
        return init_device_mesh(env.device.type, (env.world_size,), mesh_dim_names=("shard",))
    shard = config.parallel.shard_size or env.local_world_size
    replicate = config.parallel.replicate_size or env.world_size // shard
    if replicate * shard != env.world_size:
        raise ConfigError(f"parallel.replicate_size {replicate} x parallel.shard_size {shard} != world size "
                          f"{env.world_size}; set them so their product is the number of processes")
    return init_device_mesh(env.device.type, (replicate, shard), mesh_dim_names=("replicate", "shard"))


def apply_block_options(model: nn.Module, config: TrainConfig) -> None:
    """Activation checkpointing and torch.compile per transformer block (every strategy, DeepSpeed too)."""
    blocks = model.model.layers
    for i, block in enumerate(blocks):
        if config.parallel.activation_checkpointing:
            block = checkpoint_wrapper(block)
        if config.parallel.compile:
            block.compile()
        blocks[i] = block


def parallelize(model: nn.Module, config: TrainConfig, env: Env) -> nn.Module:
    """Block options, then the data-parallel wrapper."""
    apply_block_options(model, config)
    blocks = model.model.layers
    strategy = config.parallel.strategy
    if strategy == "ddp":
        # gradient_as_bucket_view: gradients live in the all-reduce buckets, saving a copy and memory
        return DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                                       gradient_as_bucket_view=True)
    if strategy in ("fsdp", "hsdp"):
        mesh = build_mesh(config, env)
        # bf16 compute with fp32 gradient reduction on GPU; plain fp32 on CPU.
        policy = MixedPrecisionPolicy(param_dtype=env.dtype, reduce_dtype=torch.float32)
        reshard = config.parallel.reshard_after_forward
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    return model


def autocast(env: Env):
    """bf16 autocast for ddp/none on GPU; FSDP casts through its MixedPrecisionPolicy instead."""
    return torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=env.dtype == torch.bfloat16)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch of a step."""
    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    yield


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Clip by the norm of the *global* gradient; returns that norm (before clipping).

    Under FSDP each rank holds a shard of every gradient (DTensor): the total norm is reduced across
    the mesh, so every rank clips by the same, true norm. max_norm 0 only measures.
    """
    with_grad = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in with_grad], foreach=True)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if max_norm > 0:  # takes the parameters, and scales their .grad
        torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, total, foreach=True)
    return total


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_from_main(value):
    """Rank 0's value (a small plain object of our own) on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
