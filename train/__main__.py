"""python -m train --config configs/NAME.toml [--section.key=value ...]

The same command under torchrun (any --nproc_per_node / --nnodes), accelerate launch or the deepspeed
launcher runs the same training. Exit codes: 0 done, 2 bad input or a stop explained in one line,
75 preempted (SIGTERM/SIGUSR1) with a checkpoint written: launch the same command again to resume.
"""

import os
import sys

from . import preemption

preemption.catch()  # before the heavy imports below: a preemption signal during start-up is acted on, not fatal

from groundwork.cli import USER_ERROR_EXIT, run_main  # noqa: E402 (after the signal handlers)

from .config import load_config  # noqa: E402
from .trainer import PREEMPTED_EXIT, Preempted, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    argv = [a for a in argv if not a.startswith("--local_rank=") and not a.startswith("--local-rank=")]
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    config_path = None
    if "--config" in argv:
        at = argv.index("--config")
        if at + 1 >= len(argv):
            print("error: --config needs a file, e.g. --config configs/tiny.toml", file=sys.stderr)
            return USER_ERROR_EXIT
        config_path = argv[at + 1]
        del argv[at : at + 2]
    argv = [a for a in argv if not a.startswith("--config=") or not (config_path := a.split("=", 1)[1])]
    return run_main(lambda: train(config_path, argv))


def train(config_path: str | None, overrides: list[str]) -> int:
    try:
        run(load_config(config_path, overrides))
    except Preempted as stop:  # not an error: the checkpoint is written, relaunching resumes
        print(str(stop), file=sys.stderr)
        return PREEMPTED_EXIT
    return 0


def exit_now(code: int) -> None:
    """Leave without the interpreter's teardown once DeepSpeed has run: its C++ state, torn down with the
    interpreter, aborts the process now and then ("terminate called without an active exception",
    seen about once in 30 two-rank ZeRO-3 runs on CPU, always after the work and the checkpoint were
    done), which would turn a finished run into a failed one. Everything that matters is written and
    flushed by now; without DeepSpeed, exit normally."""
    if "deepspeed" not in sys.modules:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
