"""Preemption signals: SIGUSR1 (SLURM's time-limit warning, `scancel --signal=USR1`) and SIGTERM (a preempting
partition, `scancel --signal=TERM`, the kubelet, torchrun passing its own on).

A signal is only recorded here; the trainer acts on it at the end of the step it is in, on every rank
together: checkpoint, then exit 75. `catch()` is the first thing `python -m train` does, before torch is
imported: a signal that lands while a rank is still starting (imports, rendezvous, loading a checkpoint: seconds
to minutes) must not kill it with the default action, which would end the job without a checkpoint or a requeue.
It is then acted on at the end of the first step. No torch import here, so that this module loads in
milliseconds.
"""

import signal
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []


def _record(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)


def catch() -> None:
    """Record SIGTERM and SIGUSR1 from now on instead of dying of them (idempotent)."""
    for signum in SIGNALS:
        signal.signal(signum, _record)


def requested() -> bool:
    """Whether a preemption signal has arrived since the process started or since `clear()`."""
    return bool(_received)


def clear() -> None:
    """Forget signals already acted on (a checkpoint was written), so a later run in this process starts clean."""
    _received.clear()
