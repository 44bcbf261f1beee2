"""Reliability with real faults and real processes: the cases of scripts/faults.py (toolbox/fault_report.py),
each asserted, plus the guards (NaN, loss spikes), preemption, a full disk, and checkpoints that cannot be
resumed."""

import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO

from toolbox import fault_report as report


@pytest.fixture(scope="module")
def fault_data(tmp_path_factory):
    """The report's corpus, prepared (in its work folder, the data folder's parent)."""
    return report.prepare(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def work(fault_data):
    """(data, work folder, the uninterrupted run every case is compared with: 2 ranks under torchrun)."""
    return fault_data, fault_data.parent, report.uninterrupted(fault_data, fault_data.parent)


@pytest.mark.distributed
def test_killed_rank_is_restarted_by_torchrun_and_finishes_exactly(work):
    row = report.killed_rank(*work)
    # killed as step 8 began; the restart resumed from step 6, so step 7 was computed twice
    assert row["survived"] and row["steps_lost"] == 1 and row["losses_equal"] and row["weights_equal"], row


@pytest.mark.distributed
def test_crash_during_save_falls_back_to_the_previous_checkpoint(work):
    row = report.crash_during_save(*work)
    # the step-6 save never completed: resumed from step 3, steps 4-6 computed twice, the partial one removed
    assert row["survived"] and row["steps_lost"] == 3 and row["losses_equal"] and row["weights_equal"], row


@pytest.mark.distributed
@pytest.mark.compat
def test_preemption_checkpoints_the_current_step_and_resumes_exactly(work):
    row = report.preemption(*work)
    assert row["survived"] and row["steps_lost"] == 0 and row["losses_equal"] and row["weights_equal"], row


@pytest.mark.distributed
def test_a_hung_rank_is_detected_by_the_collective_timeout(work):
    row = report.hang(*work)
    assert row["survived"] and row["detected_s"] < 60 and row["losses_equal"] and row["weights_equal"], row


@pytest.mark.distributed
def test_a_nan_loss_skips_one_update_and_training_goes_on(work):
    row = report.nan_loss(*work)
    assert row["survived"] and row["skipped_steps"] == 1 and not row["weights_equal"], row
    logged = report.rows(work[1] / "nan")
    assert logged[4]["step"] == 5 and logged[4]["loss"] != logged[4]["loss"]  # NaN, logged
    assert all(r["loss"] == r["loss"] for r in logged[5:])


@pytest.mark.distributed
def test_under_pipeline_parallelism_preemption_resumes_exactly_and_a_nan_loss_skips_one_update(work):
    data, folder, _ = work
    pp2 = ("--parallel.pp_size=2",)
    reference = report.uninterrupted(data, folder, *pp2, tag="-pp2")
    row = report.preemption(data, folder, reference, *pp2, tag="-pp2")
    assert row["survived"] and row["steps_lost"] == 0 and row["losses_equal"] and row["weights_equal"], row
    row = report.nan_loss(data, folder, reference, *pp2, tag="-pp2")
    assert row["survived"] and row["skipped_steps"] == 1 and not row["weights_equal"], row
    logged = report.rows(folder / "nan-pp2")
    assert logged[4]["loss"] != logged[4]["loss"] and all(r["loss"] == r["loss"] for r in logged[5:])


def train_one_process(data, out, *overrides, fault=None, timeout=120):
    argv = [sys.executable, "-m", "train", *report.train_args(data, out, *overrides), "--parallel.strategy=none"]
    return report.launch(argv, fault=fault, timeout=timeout)


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.distributed  # runs a command in a fresh interpreter
def test_too_many_skipped_updates_stop_and_keep_the_last_good_checkpoint(fault_data, tmp_path):
    error = one_line_error(train_one_process(fault_data, tmp_path, "--run.max_skipped_steps=1", fault="nan:step=5"))
    assert "1 updates in a row skipped" in error and "step_00000003" in error
    assert [p.name for p in (tmp_path / "checkpoints").glob("step_*")] == ["step_00000003"]


@pytest.mark.distributed  # runs a command in a fresh interpreter
def test_loss_spike_guard_skips_updates(fault_data, tmp_path):
    # a factor below 1 makes every loss after the first a "spike": steps 2-4 are skipped, then it stops
    error = one_line_error(
        train_one_process(fault_data, tmp_path, "--run.loss_spike_factor=0.5", "--run.max_skipped_steps=3")
    )
    assert "3 updates in a row skipped" in error and "up to step 4" in error
    assert [r["skipped_steps"] for r in report.rows(tmp_path)] == [0, 1, 2, 3]


@pytest.mark.distributed  # runs a command in a fresh interpreter
def test_sigterm_to_a_single_process_exits_with_the_preemption_code(fault_data, tmp_path):
    argv = [
        sys.executable,
        "-m",
        "train",
        *report.train_args(fault_data, tmp_path),
        "--parallel.strategy=none",
        "--run.max_steps=200",
    ]
    job = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while job.poll() is None and not report.rows(tmp_path):
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == report.PREEMPTED_EXIT == 75
    stopped = report.rows(tmp_path)[-1]["step"]
    assert f"preempted at step {stopped}" in stderr and stopped < 200
    assert (tmp_path / "checkpoints" / f"step_{stopped:08d}" / "COMPLETE").is_file()


def catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler for the signal (Linux: the SigCgt mask in /proc/PID/status)."""
    try:
        status = open(f"/proc/{pid}/status").read()
    except FileNotFoundError:
        return False
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1]
    return bool(int(caught, 16) >> (signum - 1) & 1)


@pytest.mark.distributed  # runs a command in a fresh interpreter
def test_a_signal_during_start_up_is_acted_on_after_the_first_step(fault_data, tmp_path):
    # SIGUSR1 as soon as `python -m train` records it: seconds before torch is even imported. The default
    # action would kill the rank (exit 138, no checkpoint, no requeue); it must checkpoint step 1 and exit 75.
    if not sys.platform.startswith("linux"):
        pytest.skip("reads the signal mask from /proc")
    argv = [
        sys.executable,
        "-m",
        "train",
        *report.train_args(fault_data, tmp_path),
        "--parallel.strategy=none",
        "--run.max_steps=200",
    ]
    job = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while job.poll() is None and not catches(job.pid, signal.SIGUSR1):
        time.sleep(0.005)
    assert "libtorch" not in open(f"/proc/{job.pid}/maps").read()  # still starting: torch not even loaded
    job.send_signal(signal.SIGUSR1)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 75 and "preempted at step 1:" in stderr, stderr
    assert (tmp_path / "checkpoints" / "step_00000001" / "COMPLETE").is_file()


@pytest.mark.distributed  # runs a command in a fresh interpreter
def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(fault_data, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:  # one checkpoint of this run takes ~17 MB: the step-3 one fits, the step-6 one does not
        error = one_line_error(
            train_one_process(fault_data, tmp_path / "run", f"--checkpoint.dir={small}", "--run.max_steps=6")
        )
        assert "writing the step-6 checkpoint failed" in error and "MiB left" in error
        assert "step_00000003) is intact" in error
        assert [p.name for p in small.glob("step_*")] == ["step_00000003"]  # (and the folder's marker)
        assert (small / "step_00000003" / "COMPLETE").is_file()
    finally:
        subprocess.run(["umount", str(small)], check=True)


@pytest.mark.distributed  # (the uninterrupted 2-rank run's checkpoint)
def test_resuming_a_checkpoint_of_another_model_shape_names_the_difference(work, tmp_path):
    # found at start-up from the checkpoint's config.json, before any process group or weight is touched
    checkpoint = work[2] / "checkpoints" / "step_00000012"
    error = one_line_error(
        train_one_process(work[0], tmp_path, f"--run.resume={checkpoint}", "--model.overrides.intermediate_size=64")
    )
    assert "config.json: intermediate_size" in error and "96" in error and "64" in error and "model.overrides" in error


@pytest.mark.distributed  # (the uninterrupted 2-rank run's checkpoint)
@pytest.mark.compat
def test_resuming_a_corrupted_checkpoint_is_one_line(work, tmp_path):
    checkpoint = tmp_path / "checkpoints" / "step_00000012"
    shutil.copytree(work[2] / "checkpoints" / "step_00000012", checkpoint)
    shard = next(checkpoint.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    error = one_line_error(train_one_process(work[0], tmp_path, f"--run.resume={checkpoint}"))
    assert str(shard) in error and "damaged or edited" in error  # the digest check names the file


@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
@pytest.mark.distributed  # runs a command in a fresh interpreter
def test_a_damaged_shard_is_named_before_training(fault_data, tmp_path, damage):
    data = tmp_path / "data"
    shutil.copytree(fault_data, data)
    shard = data / "train_000.bin"
    content = bytearray(shard.read_bytes())
    if damage == "truncated":
        content = content[:-100]
    else:
        content[1000] ^= 0xFF
    shard.write_bytes(bytes(content))
    error = one_line_error(
        report.launch(
            [sys.executable, "-m", "train", *report.train_args(data, tmp_path / "run"), "--parallel.strategy=none"]
        )
    )
    assert str(shard) in error and ("bytes, manifest says" if damage == "truncated" else "checksum") in error
    assert "re-run data.prepare" in error and not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.distributed  # runs a command in a fresh interpreter
def test_a_malformed_fault_spec_is_rejected_before_training(fault_data, tmp_path):
    error = one_line_error(train_one_process(fault_data, tmp_path, fault="explode:step=3"))
    assert "MINICOLOSSUS_FAULT='explode:step=3'" in error and "kill:rank=N:step=N" in error
    assert not (tmp_path / "metrics.jsonl").exists()
