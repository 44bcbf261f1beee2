"""tests/ranks.py itself: results come back in rank order, and a rank that fails or hangs fails the test within
its timeout, with every process it started gone (the guarantee the distributed tests rely on)."""

import sys
import time

import psutil
import pytest
import ranks
import torch.distributed as dist


def world_and_argument(rank: int, argument: str) -> tuple:
    return rank, dist.get_world_size(), argument


def rank_1_raises(rank: int) -> None:
    if rank == 1:
        raise ValueError("rank 1 cannot go on")
    dist.barrier()  # rank 0 waits for a rank that is gone


def rank_1_hangs(rank: int) -> None:
    if rank == 1:
        time.sleep(600)


def descendants() -> set[int]:
    """The running processes below this one, but multiprocessing's resource tracker (started with the first
    spawned process, it lives as long as this one)."""
    running = set()
    for process in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(process.cmdline()):
                running.add(process.pid)
        except psutil.Error:  # gone, or a zombie: running nothing
            pass
    return running


@pytest.mark.distributed
def test_spawn_returns_each_ranks_result_in_rank_order():
    assert ranks.spawn(world_and_argument, "a", world_size=3) == [(0, 3, "a"), (1, 3, "a"), (2, 3, "a")]


@pytest.mark.distributed
def test_a_rank_that_raises_fails_the_test_with_its_traceback():
    # rank 0 then fails too (its peer is gone): the report leads with rank 1, whichever exit join saw first
    before = descendants()
    with pytest.raises(pytest.fail.Exception) as failed:
        ranks.spawn(rank_1_raises, timeout=60)
    report = str(failed.value)
    assert report.startswith("rank_1_raises on 2 ranks failed; rank 1 first:\nTraceback"), report
    assert "ValueError: rank 1 cannot go on\nrank 0 (exit code " in report
    assert descendants() <= before


@pytest.mark.distributed
def test_ranks_that_hang_are_killed_at_the_timeout():
    before, started = descendants(), time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"rank_1_hangs on 2 ranks: .* still running after 5 s"):
        ranks.spawn(rank_1_hangs, timeout=5)
    assert time.monotonic() - started < 60 and descendants() <= before


@pytest.mark.distributed
def test_a_hung_torchrun_is_killed_with_its_workers(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text("import sys, time\nprint('started', file=sys.stderr, flush=True)\ntime.sleep(600)\n")
    before = descendants()
    with pytest.raises(pytest.fail.Exception, match="(?s)still running after 10 s.*started"):
        ranks.torchrun([str(script)], nproc=2, timeout=10)
    assert descendants() <= before


@pytest.mark.distributed
def test_a_failed_torchrun_rank_fails_the_check(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(
        "import os, sys, time\nif os.environ['RANK'] == '1':\n    sys.exit('rank 1 refuses')\ntime.sleep(600)\n"
    )
    with pytest.raises(AssertionError, match="rank 1 refuses"):
        ranks.torchrun([str(script)], nproc=2, timeout=120)
    assert ranks.torchrun([str(script)], nproc=2, timeout=120, check=False).returncode != 0


def test_a_test_without_the_distributed_mark_cannot_start_ranks(request):
    with pytest.raises(pytest.fail.Exception, match=f"{request.node.nodeid} starts ranks: mark it"):
        ranks.launch([sys.executable, "-c", "pass"])
    with pytest.raises(pytest.fail.Exception, match="mark it @pytest.mark.distributed"):
        ranks.spawn(world_and_argument, "a")
