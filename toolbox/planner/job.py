"""What the planner plans: a job (a model on a cluster, its batch and sequence) and the parallelism that splits it
over the cluster's GPUs."""

from dataclasses import dataclass

from groundwork.errors import UserError

from .hardware import Cluster
from .software import CHECKPOINTING, DATA_PARALLEL, SOFTWARE, Software
from .spec import ModelSpec

__all__ = ["CHECKPOINTING", "DATA_PARALLEL", "InvalidParallelism", "Job", "Parallelism"]


@dataclass(frozen=True)
class Parallelism:
    """How a planned job is split: its parallel degrees (data parallelism takes the GPUs they leave), the
    data-parallel kind, the pipeline schedule, the micro-batch and activation checkpointing. A plan only: the
    process groups of a job that runs are the trainer's (train/parallel/mesh.py)."""

    data_parallel: str = "fsdp"
    tp: int = 1
    pp: int = 1
    ep: int = 1
    cp: int = 1
    micro_batch: int = 1  # sequences per forward
    schedule: str = "1f1b"
    virtual_stages: int = 1  # interleaved: model chunks per pipeline rank
    checkpointing: str = "none"
    shard_size: int = 8  # hsdp: the GPUs a shard group spans (one node)

    def describe(self) -> str:
        parts = [self.data_parallel] + [
            f"{name}{getattr(self, name)}" for name in ("tp", "pp", "ep", "cp") if getattr(self, name) > 1
        ]
        if self.pp > 1:
            parts.append(self.schedule + (f"(v{self.virtual_stages})" if self.schedule == "interleaved" else ""))
        if self.checkpointing != "none":
            parts.append(f"ac-{self.checkpointing}")
        return " ".join(parts) + f" mb{self.micro_batch}"


@dataclass(frozen=True)
class Job:
    spec: ModelSpec
    cluster: Cluster
    gpus: int
    seq_len: int
    global_batch_tokens: int = 16 * 2**20  # Llama 3's
    model_bytes: int = 2  # bf16 compute; 4 describes this project's fp32 CPU runs
    software: Software = SOFTWARE["any"]  # what the run's stack offers and its kernels (toolbox/planner/software.py)

    @property
    def fused_attention(self) -> bool:
        return self.software.fused_attention

    @property
    def sequence_parallel(self) -> bool:
        return self.software.sequence_parallel


class InvalidParallelism(UserError, ValueError):
    """This parallelism cannot run this job: the message says which number does not divide which."""
