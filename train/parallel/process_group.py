"""The process group: the launcher's environment read once, device and dtype chosen, gloo or NCCL
started, and the few collectives the trainer's own decisions need."""

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from groundwork.errors import UserError

from ..config import ConfigError, TrainConfig
from .mesh import Layout, layout_of
from .precision import compute_dtype


class LaunchError(UserError, RuntimeError):
    """The processes of a job could not form a group; the message says what to check."""


@dataclass
class Env:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    dtype: torch.dtype  # compute dtype: bf16 autocast on GPU, fp32 on CPU
    layout: Layout  # how the ranks split into data-parallel, expert and tensor groups

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel index: the ranks of one tensor- or context-parallel group read the same batch."""
        return self.layout.dp_rank(self.rank)

    @property
    def dp_size(self) -> int:
        return self.layout.dp_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_initialized()


def uses_cuda(config: TrainConfig) -> bool:
    """run.device resolved: "auto" is CUDA when one is visible."""
    if config.run.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError('run.device \'cuda\': no CUDA device is visible; use run.device = "cpu" or "auto"')
    return config.run.device == "cuda" or (config.run.device == "auto" and torch.cuda.is_available())


def setup(config: TrainConfig) -> Env:
    """Read the launcher's environment, pick device and dtype, and start the process group."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    strategy = config.parallel.strategy
    if strategy == "none" and world_size > 1:
        raise ConfigError(
            f"parallel.strategy 'none' runs one process, but {world_size} were launched; use ddp, fsdp or hsdp"
        )
    layout = layout_of(config, world_size, local_world_size)
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
            dist.init_process_group(
                "nccl" if use_cuda else "gloo",
                timeout=timeout,
                store=_restart_store(timeout),
                device_id=device if use_cuda else None,
                rank=rank,
                world_size=world_size,
            )
        except (dist.DistError, RuntimeError) as error:  # a rank that never came: fail within the timeout
            first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
            raise LaunchError(
                f"the {world_size} processes did not all join at {os.environ['MASTER_ADDR']}:"
                f"{os.environ['MASTER_PORT']} within run.timeout_s={config.run.timeout_s} ({first[:200]}); start "
                f"every node, check that they reach that address, or raise run.timeout_s"
            ) from error
    return Env(rank, world_size, local_rank, local_world_size, device, dtype, layout)


def _restart_store(timeout: timedelta) -> dist.Store | None:
    """After torchrun restarts a failed job, its store still holds the dead attempt's keys (gloo's peer
    addresses among them), which the new processes would read and fail to connect to. Give each attempt
    its own key space. None (the default env:// store) for a first attempt."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0:
        return None
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=not agent_hosts_store and os.environ["RANK"] == "0",
        timeout=timeout,
    )
    return dist.PrefixStore(f"minicolossus/attempt_{attempt}", store)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


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


def broadcast_from_main(value: object):
    """Rank 0's value (a small plain object of our own) on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
