"""Fault injection, so that the reliability tests break a real run: MINICOLOSSUS_FAULT=KIND:key=value:...

    kill:rank=R:step=S      rank R SIGKILLs itself as step S begins (a GPU or node dies)
    nan:step=S              the loss of step S is NaN on every rank (a numerical blow-up)
    hang:rank=R:step=S      rank R stops as step S begins, its peers wait in a collective (a stuck GPU)
    killsave:rank=R:step=S  rank R SIGKILLs itself halfway through writing the step-S checkpoint

Unset (the default) nothing happens. A fault fires only in a job's first attempt (TORCHELASTIC_RESTART_COUNT
unset or 0), so the run that torchrun restarts goes on normally: that is what the tests check.
"""

import os
import signal
import time
from dataclasses import dataclass

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
    spec = os.environ.get(ENV, "")
    if not spec or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return None
    kind, *pairs = spec.split(":")
    usage = f"{ENV}={spec!r}: expected one of " + ", ".join(
        ":".join([k, *(f"{key}=N" for key in keys)]) for k, keys in KINDS.items()
    )
    try:
        values = {key: int(value) for key, value in (pair.split("=", 1) for pair in pairs)}
    except ValueError:
        raise ConfigError(usage) from None
    if kind not in KINDS or set(values) != set(KINDS[kind]):
        raise ConfigError(usage)
    return Fault(kind, values["step"], values.get("rank"))


def inject(fault: Fault | None, kind: str, step: int, rank: int) -> bool:
    """Carry out a kill or hang here if one is due; returns True for a due nan (the caller poisons the loss)."""
    if fault is None or not fault.fires(kind, step, rank):
        return False
    if kind in ("kill", "killsave"):
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "hang":
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # stuck for good: no clean preemption either
        while True:  # until the peers' collective times out and the launcher ends this process
            time.sleep(60)
    return True
