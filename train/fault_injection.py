"""Fault injection, so that the reliability tests break a real run: MINICOLOSSUS_FAULT=KIND:key=value:...

    kill:rank=R:step=S      rank R SIGKILLs itself as step S begins (a GPU or node dies)
    nan:step=S              the loss of step S is NaN on every rank (a numerical blow-up)
    hang:rank=R:step=S      rank R stops as step S begins, its peers wait in a collective (a stuck GPU)
    killsave:rank=R:step=S  rank R SIGKILLs itself halfway through writing the step-S checkpoint

Unset (the default) nothing is built and the training step holds no fault code. A fault fires only in a
job's first attempt (TORCHELASTIC_RESTART_COUNT unset or 0), so the run that torchrun restarts goes on
normally: that is what the tests check. (toolbox/fault_report.py is the other half: it runs these faults
and reports what survived.)
"""

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import ConfigError

ENV = "MINICOLOSSUS_FAULT"
KINDS = {"kill": ("rank", "step"), "nan": ("step",), "hang": ("rank", "step"), "killsave": ("rank", "step")}


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None = None

    def fires(self, kind: str, step: int, rank: int) -> bool:
        return kind == self.kind and step == self.step and self.rank in (None, rank)


def from_env() -> Fault | None:
    """The fault MINICOLOSSUS_FAULT asks for; a malformed one is a one-line ConfigError."""
    spec = os.environ.get(ENV, "")
    if not spec or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return None
    kind, *pairs = spec.split(":")
    usage = f"{ENV}={spec!r}: expected one of " + ", ".join(
        ":".join([name, *(f"{key}=N" for key in keys)]) for name, keys in KINDS.items()
    )
    try:
        values = {key: int(value) for key, value in (pair.split("=", 1) for pair in pairs)}
    except ValueError:
        raise ConfigError(usage) from None
    if kind not in KINDS or set(values) != set(KINDS[kind]):
        raise ConfigError(usage)
    return Fault(kind, values["step"], values.get("rank"))


class FaultInjector:
    """Carries out one fault on this rank at its moment: the loop calls `step_begins`, the checkpointer
    `shards_written`; a nan fault poisons the model's loss through a forward hook."""

    def __init__(self, fault: Fault, rank: int):
        self.fault, self.rank = fault, rank

    def step_begins(self, step: int) -> None:
        if self.fault.fires("kill", step, self.rank):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.fault.fires("hang", step, self.rank):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # stuck for good: no clean preemption either
            while True:  # until the peers' collective times out and the launcher ends this process
                time.sleep(60)

    def shards_written(self, step: int) -> None:
        if self.fault.fires("killsave", step, self.rank):
            os.kill(os.getpid(), signal.SIGKILL)

    def poison_loss(self, outputs: list[nn.Module], current_step: Callable[[], int]) -> None:
        """From now on the loss is NaN during the nan fault's step: the model's (its other outputs stay finite),
        or, pipelined, that of the last stage's logits (`outputs`: the model, or the last stages here)."""
        if self.fault.kind != "nan":
            return

        def poison(module: nn.Module, inputs: tuple, output: object) -> object:
            if not self.fault.fires("nan", current_step(), self.rank):
                return output
            if isinstance(output, torch.Tensor):  # a last pipeline stage's logits
                return output * float("nan")
            if getattr(output, "loss", None) is not None:
                output.loss = output.loss * float("nan")
            return output

        for module in outputs:
            module.register_forward_hook(poison)


def injector_from_env(rank: int) -> FaultInjector | None:
    fault = from_env()
    return FaultInjector(fault, rank) if fault is not None else None
