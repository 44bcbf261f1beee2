"""How the tests start ranks: every test that runs more than one process goes through here (and is marked
`distributed`). Real processes and gloo throughout; no mocks.

    spawn(fn, *args, world_size=2)      fn(rank, *args) in world_size fresh processes that share a gloo
                                        process group; returns what each rank returned, in rank order
    run_main(module, argv, nproc=2)     `module`'s main(argv) on nproc ranks as torchrun's workers run it (its
                                        environment, one thread each), forked from a process that has already
                                        imported the trainer: ~0.1 s a rank instead of ~8 s of imports
    torchrun(program, nproc=2)          `python -m torch.distributed.run ... program` as users launch it
                                        (`program` is e.g. ["-m", "train", ...]); returns the CompletedProcess
    torchrun_argv(program, ...)         that command line, for a test that starts it some other way
    launch(argv) / launch_all(argvs)    any other command that starts ranks (accelerate launch, the
                                        deepspeed launcher, one torchrun agent per node, ...)

spawn and run_main fork their ranks from one server process per test session (multiprocessing's forkserver),
which imports torch, transformers and the trainer once; each rank is still a process of its own, with its own
gloo process group. Tests of the launchers themselves (restarts, signals, rendezvous) use torchrun.

Every one has a timeout. A rank that fails ends the run with its own error (spawn re-raises it with the
rank's traceback; torchrun, the launchers and check=True report the command's stderr). A rank that hangs is
killed at the timeout together with every process its launcher started, and the test fails saying so:
the suite never hangs and leaves no ranks behind.
"""

import multiprocessing
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

import psutil  # (a dependency of accelerate's)
import pytest

REPO = Path(__file__).resolve().parents[1]

# Set by conftest.py as each test starts: the test's id when it is not marked `distributed`. Starting ranks
# then fails the test, so that `pytest -m "not distributed"` (the fast tier) never starts them.
unmarked_test: str | None = None


def _check_marked() -> None:
    if unmarked_test is not None:
        pytest.fail(f"{unmarked_test} starts ranks: mark it @pytest.mark.distributed", pytrace=False)


# What the forkserver imports once, before it forks any rank: the ~8 s every fresh interpreter would spend.
PRELOAD = ["torch", "torch.distributed.fsdp", "transformers", "train.__main__", "toolbox.planner.traffic_probe"]


def _forkserver() -> multiprocessing.context.BaseContext:
    multiprocessing.set_forkserver_preload(PRELOAD)  # read when the server starts (the first use only)
    return multiprocessing.get_context("forkserver")


# --- a function on N ranks ----------------------------------------------------------------------------


def _rank_main(rank: int, fn: Callable, args: tuple, world_size: int, folder: str, timeout: float) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/store",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout),
    )
    try:
        result = fn(rank, *args)
        dist.barrier()  # no rank tears gloo down while another still works (a SIGABRT in one CI run)
    except BaseException:  # when it happened: the other ranks then fail too, because this one is gone
        Path(folder, f"rank{rank}.error").write_text(f"{time.time()!r}\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()
    Path(folder, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))


def spawn(fn: Callable, *args, world_size: int = 2, timeout: float = 120) -> list:
    """Runs fn(rank, *args) on `world_size` ranks, each a process of its own (forked) already in a
    gloo process group (a file store). fn must be a module-level function, its arguments and result
    picklable. Returns the results in rank order. A rank that raises fails the test with the traceback of the
    rank that failed first (the others, stopped or failing in turn, in a line each); ranks still running after
    `timeout` seconds are killed and the test fails."""
    import torch.multiprocessing as mp

    _check_marked()
    _forkserver()
    with tempfile.TemporaryDirectory(prefix="ranks-") as folder:
        context = mp.start_processes(
            _rank_main,
            args=(fn, args, world_size, folder, timeout),
            nprocs=world_size,
            join=False,
            start_method="forkserver",
        )
        deadline = time.monotonic() + timeout
        failed = False
        try:
            # join raises when a rank fails, after terminating the others, and returns True once all are done
            while not context.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    running = [rank for rank, process in enumerate(context.processes) if process.is_alive()]
                    pytest.fail(
                        f"{fn.__name__} on {world_size} ranks: rank(s) {running} still running after {timeout} s"
                    )
        except (mp.ProcessRaisedException, mp.ProcessExitedException):
            failed = True  # whichever rank join saw first; the report below finds the one that failed first
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join()
        if failed:
            pytest.fail(_failure_report(fn.__name__, context.processes, folder), pytrace=False)
        return [pickle.loads(Path(folder, f"rank{rank}.pkl").read_bytes()) for rank in range(world_size)]


def _failure_report(name: str, processes: list, folder: str) -> str:
    """The traceback of the rank that raised first, then a line for each other rank."""
    errors = {}
    for rank in range(len(processes)):
        path = Path(folder, f"rank{rank}.error")
        if path.exists():
            when, _, text = path.read_text().partition("\n")
            errors[rank] = (float(when), text.rstrip())
    first = min(errors, key=lambda rank: errors[rank][0], default=None)
    lines = [f"{name} on {len(processes)} ranks failed" + (f"; rank {first} first:" if first is not None else "")]
    if first is not None:
        lines.append(errors[first][1])
    for rank, process in enumerate(processes):
        if rank != first:
            what = errors[rank][1].splitlines()[-1] if rank in errors else "no Python error"
            lines.append(f"rank {rank} (exit code {process.exitcode}): {what}")
    return "\n".join(lines)


# --- a command's main on N ranks ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _main_on_rank(module: str, argv: list[str], environment: dict[str, str], folder: str) -> None:
    """One rank: torchrun's worker environment, output to files, then the command's main; its code is the exit."""
    import importlib

    import torch

    os.environ.update(environment)
    os.chdir(REPO)
    torch.set_num_threads(1)  # torchrun's OMP_NUM_THREADS=1, which an already imported torch no longer reads
    rank = environment["RANK"]
    for stream, name in ((1, "out"), (2, "err")):
        file = os.open(Path(folder, f"rank{rank}.{name}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(file, stream)
        os.close(file)
    try:
        code = importlib.import_module(module).main(argv)
    except SystemExit as exit_:
        code = exit_.code
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1)


def run_main(
    module: str, argv: Sequence[str], *, nproc: int = 2, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`module`.main(argv) on nproc ranks of one node, each in the environment torchrun gives its workers
    (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT, one thread). Returns what torchrun would:
    the first failing rank's exit code (else 0), rank 0's stdout, every rank's stderr (in rank order). Ranks still running
    after `timeout` seconds are killed and the test fails. The working directory is the repository."""
    _check_marked()
    context = _forkserver()
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="ranks-") as folder:
        processes = []
        for rank in range(nproc):
            environment = {
                **(env or {}),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(nproc),
                "LOCAL_WORLD_SIZE": str(nproc),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
            }
            process = context.Process(target=_main_on_rank, args=(module, list(argv), environment, folder))
            process.start()
            processes.append(process)
        deadline = time.monotonic() + timeout
        try:
            for process in processes:
                process.join(max(0.1, deadline - time.monotonic()))
        finally:
            running = [rank for rank, process in enumerate(processes) if process.is_alive()]
            for process in processes:
                if process.is_alive():
                    process.kill()
                    process.join()
        texts = [Path(folder, f"rank{rank}.err") for rank in range(nproc)]
        stderr = "".join(path.read_text() for path in texts if path.exists())
        stdout = Path(folder, "rank0.out").read_text() if Path(folder, "rank0.out").exists() else ""
        if running:
            pytest.fail(
                f"{module} on {nproc} ranks: rank(s) {running} still running after {timeout} s\n{stderr[-3000:]}"
            )
        codes = [process.exitcode for process in processes]
        returncode = next((code for code in codes if code != 0), 0)
        return subprocess.CompletedProcess([module, *argv], returncode, stdout, stderr)


# --- commands that start ranks ------------------------------------------------------------------------


def torchrun_argv(
    program: Sequence[str],
    *,
    nproc: int = 2,
    nnodes: int = 1,
    node_rank: int = 0,
    endpoint: str | None = None,
    rdzv_id: str = "test",
    join_timeout: int | None = None,
) -> list[str]:
    """torchrun's command line: --standalone on one node, else a c10d rendezvous at `endpoint` (host:port)."""
    argv = [sys.executable, "-m", "torch.distributed.run"]
    if endpoint is None:
        assert nnodes == 1, "several nodes meet at an endpoint"
        argv.append("--standalone")
    else:
        argv += [
            f"--nnodes={nnodes}",
            f"--node_rank={node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}",
            f"--rdzv-id={rdzv_id}",
        ]
        if join_timeout is not None:
            argv.append(f"--rdzv-conf=join_timeout={join_timeout}")
    argv.append(f"--nproc_per_node={nproc}")
    return argv + list(program)


def torchrun(
    program: Sequence[str],
    *,
    timeout: float = 300,
    check: bool = True,
    env: dict | None = None,
    cwd: Path = REPO,
    **launcher,
) -> subprocess.CompletedProcess:
    """`program` under torchrun (launcher: torchrun_argv's options: nproc, nnodes, node_rank, endpoint, ...).
    check: the run must exit 0, else the test fails with the end of its stderr."""
    return launch(torchrun_argv(program, **launcher), timeout=timeout, check=check, env=env, cwd=cwd)


def launch(
    argv: Sequence[str], *, timeout: float = 300, check: bool = True, env: dict | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """A command that starts ranks, run to its end (see launch_all)."""
    return launch_all([argv], timeout=timeout, check=check, env=env, cwd=cwd)[0]


def launch_all(
    argvs: Sequence[Sequence[str]],
    *,
    timeout: float = 300,
    check: bool = True,
    env: dict | None = None,
    cwd: Path = REPO,
) -> list[subprocess.CompletedProcess]:
    """Several commands at once (e.g. one torchrun agent per node), all within one timeout. Output goes to
    files, so no pipe fills up and no orphaned rank holds one open. Whatever happens, every process the
    commands started is gone when this returns; after `timeout` seconds the test fails with their stderr."""
    _check_marked()
    jobs = []
    try:
        for argv in argvs:
            stdout, stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            jobs.append(
                (
                    subprocess.Popen(list(argv), cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=True),
                    stdout,
                    stderr,
                )
            )
        deadline = time.monotonic() + timeout
        for process, _, _ in jobs:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
    finally:
        timed_out = [process.args for process, _, _ in jobs if process.poll() is None]
        for process, _, _ in jobs:
            _kill_tree(process)
        results = []
        for process, stdout, stderr in jobs:
            for file in (stdout, stderr):
                file.seek(0)
            results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout.read(), stderr.read()))
            for file in (stdout, stderr):
                file.close()
    if timed_out:
        tails = "\n".join(f"--- {' '.join(map(str, r.args))[:200]}\n{r.stderr[-3000:]}" for r in results)
        pytest.fail(f"still running after {timeout} s, killed with every rank it started: {timed_out}\n{tails}")
    if check:
        for result in results:
            assert result.returncode == 0, result.stderr[-4000:]
    return results


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a launcher that is still running and everything below it (torchrun puts each worker in a
    session of its own, so a process group would not reach them); then reap them."""
    if process.poll() is not None:
        return
    try:
        below = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        below = []
    process.kill()  # first: an agent must not start new workers in place of the killed ones
    for each in below:
        try:
            each.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait()
    psutil.wait_procs(below, timeout=10)
