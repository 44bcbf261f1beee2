"""What every command line of the project shares: bad input is one line on stderr and exit code 2.

    parser = ArgumentParser(prog="scripts/export_hf.py", description=__doc__)
    ...
    return run_main(lambda: work(parser.parse_args(argv)))

argparse's own errors print a usage block and then the error; ours print only `error: ...` (the usage
is one `--help` away). `run_main` turns every `UserError` into that same one line.
"""

import argparse
import sys
from collections.abc import Callable
from typing import Any

from .errors import UserError

USER_ERROR_EXIT = 2


class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        fail(f"{self.prog}: {message} (see --help)")


def fail(message: str):
    """Print one line and exit 2 (for command lines; package code raises a `UserError`)."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT)


def integer(minimum: int = 1):
    """An argparse type: an integer >= minimum (argparse's own `type=int` takes -3 for a count)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {minimum}")
        return value

    return parse


def positive_number(text: str) -> float:
    """An argparse type: a finite number > 0, written either way (16777216 or 6e12)."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number > 0")
    return value


def run_main(work: Callable[[], int | None]) -> int:
    """Run a command's body; a `UserError` becomes its one line on stderr and exit code 2."""
    try:
        result = work()
    except UserError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return USER_ERROR_EXIT
    return 0 if result is None else int(result)
