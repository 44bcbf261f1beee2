"""What the training loop asks of an engine, and what both engines share.

    with engine.micro_batch(last):            # gradient sync only on the last micro-batch; autocast
        out = engine.model(inputs, targets=targets)
        engine.backward(out.loss)             # scaled by 1 / gradient accumulation
    grad_norm = engine.step(lr, skip)         # clip by the global norm, update (unless skipped), zero grads

  TorchEngine      none / ddp / fsdp / hsdp with tp, ep, cp and pp, on torch.distributed (engine.py), DCP state
  DeepSpeedEngine  ZeRO-1/2/3 through deepspeed.initialize (deepspeed_engine.py), DeepSpeed state
Both save and load their model and optimizer state into a folder that train/checkpoint.py makes
atomic and completes with the loader state, RNG and step, so the loop has one shape for both.
"""

import contextlib
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import torch
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor

from groundwork.errors import UserError

from .parallel import Pipeline


class Engine(Protocol):
    model: nn.Module  # what the loop calls forward on (wrapped: DDP, FSDP units, a DeepSpeed engine)
    checkpoint_format: str  # "dcp" or "deepspeed": which files a checkpoint folder holds
    pipeline: "Pipeline | None"  # this rank's stages under pipeline parallelism: its `step` replaces the loop above

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager: ...

    def forward_context(self) -> contextlib.AbstractContextManager: ...  # evaluation's forward passes too

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, lr: float, skip: bool = False) -> torch.Tensor: ...  # returns the global gradient norm

    def memory_bytes(self) -> dict[str, int]: ...  # this rank's params, grads, optim state

    def save_state(self, folder: Path) -> None: ...

    def load_state(self, folder: Path) -> None: ...


# DCP raises CheckpointException, a BaseException (not an Exception), gathering every rank's failure.
DCP_ERRORS = (Exception, CheckpointException)


def dcp_cause(error: BaseException) -> BaseException:
    """The error a rank raised inside DCP: a CheckpointException carries them in `failures`, rank ->
    (exception, traceback), with no __cause__."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        return next(iter(failures.values()))[0]
    return error.__cause__ or error


def first_line(error: BaseException) -> str:
    """The first line that says something: DCP nests each rank's traceback inside its message."""
    error = dcp_cause(error) if getattr(error, "failures", None) else error
    for line in str(error).splitlines():
        line = line.strip()
        if line and not line.startswith(("Traceback", "CheckpointException")):
            return line[:300]
    return type(error).__name__


class StateLoadError(UserError, ValueError):
    """Saved model/optimizer state that this engine cannot restore; one line: what is wrong, what to do."""


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes this rank holds for these tensors (a DTensor counts its local shard)."""
    local = (t.to_local() if isinstance(t, DTensor) else t for t in tensors)
    return sum(t.numel() * t.element_size() for t in local)


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The per-parameter state tensors (AdamW's moments), not the scalar step counters."""
    return [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.numel() > 1]
