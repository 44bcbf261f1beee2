"""What the untrusted-input tables assert of every case: one line, exit code 2, no user file changed, and
memory and time bounded by real sizes.

    snapshot(*roots)                 every file, folder and symlink under the roots: content digest, link target
    run_bounded(argv, ...)           a command in a fresh process under a memory ceiling and a timeout; its
                                     exit code, output and peak resident memory (the kernel's, by wait4)
    assert_one_line(result, part)    exit 2 and exactly one `error: ...` line on stderr containing `part`,
                                     nothing that looks like a traceback
    with peak_bounded():             an in-process case did not raise this process's peak resident memory
                                     by more than PEAK_GROWTH_MIB
"""

import contextlib
import hashlib
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# A ceiling on address space, as a safety net for the machine: a case that would allocate without bound
# fails with MemoryError instead of taking the runner down. torch's CPU build maps ~2 GiB of address space
# at import; the assertion on peak resident memory below is the real test.
ADDRESS_SPACE_BYTES = 12 << 30
# An in-process case may not raise the test process's high-water mark of resident memory by more than this: a
# refusal costs kilobytes, and what the cases guard against (allocating what a lying file or flag says) costs
# gigabytes. (A high-water mark: a case that stays under an earlier peak is not seen, one that blows up is.)
PEAK_GROWTH_MIB = 1024


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Everything under the roots as it is now: a file's size and sha256, a folder, a symlink's target."""
    found: dict[str, tuple] = {}
    for root in roots:
        root = Path(root)
        paths = [root, *root.rglob("*")] if root.is_dir() and not root.is_symlink() else [root]
        for path in paths:
            if path.is_symlink():
                found[str(path)] = ("link", os.readlink(path))
            elif path.is_dir():
                found[str(path)] = ("folder",)
            elif path.is_file():
                found[str(path)] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    return found


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    peak_rss_mib: float
    seconds: float


# Runs the command as its own child under the address-space ceiling and reports that child's peak resident
# memory alone (the kernel's accounting of waited-for children; the wrapper's own memory is not in it) on the
# inherited pipe. The ceiling is set here, in a fresh small interpreter, not by a preexec_fn between fork and
# exec of the test process: that child still has the test process's address space (many GiB after a long
# session), and Python code run there is unsafe when the test runs commands from threads (a CI run saw the
# child die of SIGSEGV before exec).
_WRAPPER = """
import os, resource, subprocess, sys
report = int(os.environ.pop("PEAK_RSS_FD"))
ceiling = int(os.environ.pop("ADDRESS_SPACE_BYTES"))
resource.setrlimit(resource.RLIMIT_AS, (ceiling, ceiling))
code = subprocess.run(sys.argv[1:]).returncode
os.write(report, str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss).encode())
sys.exit(code)
"""


def run_bounded(
    argv: list[str], *, timeout: float = 120, cwd: Path = REPO, env: dict | None = None, stdin: str | None = None
) -> Result:
    """`python argv...` in a fresh process with its address space capped; its peak RSS from the kernel."""

    read_end, write_end = os.pipe()
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-c", _WRAPPER, sys.executable, *argv],
        cwd=cwd,
        env={
            **os.environ,
            **(env or {}),
            "PEAK_RSS_FD": str(write_end),
            "ADDRESS_SPACE_BYTES": str(ADDRESS_SPACE_BYTES),
        },
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        pass_fds=(write_end,),
        start_new_session=True,
    )
    os.close(write_end)
    try:
        stdout, stderr = process.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        stdout, stderr = process.communicate()
        os.close(read_end)
        raise AssertionError(f"{argv} still running after {timeout} s: time is not bounded\n{stderr[-2000:]}") from None
    with os.fdopen(read_end, "rb") as report:
        peak_kib = int(report.read() or 0)
    return Result(process.returncode, stdout, stderr, peak_kib / 1024, time.monotonic() - started)


def assert_one_line(result: object, part: str, code: int = 2) -> str:
    """The command stopped with `code` and one `error: ...` line naming `part`; returns that line."""
    stderr = result.stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:") or ": error:" in line]
    assert result.returncode == code, f"exit {result.returncode}, wanted {code}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(errors) == 1, f"wanted one error line, got {len(errors)}:\n{stderr[-3000:]}"
    assert part in errors[0], f"{part!r} not in {errors[0]!r}"
    return errors[0]


@contextlib.contextmanager
def peak_bounded(limit_mib: float = PEAK_GROWTH_MIB):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown <= limit_mib, f"peak resident memory grew by {grown:.0f} MiB (at most {limit_mib} MiB)"
