"""The SLURM batch script under a real SLURM: a one-node cluster (slurmctld + slurmd + munge, started here with
a config in a temp folder and stopped by their process ids) runs scripts/slurm/train.sbatch unchanged."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, base_args, in_process, losses, train
from test_prepare_engine import FILTERS, assert_same_bytes, write_corpus

from data.prepare import main as prepare_main
from train.metrics import read_metrics

pytestmark = pytest.mark.distributed  # every job runs 2 ranks (and the runs it is compared with, torchrun)

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel")


def find_or_install_slurm() -> str | None:
    """None when every program is there, else why they cannot be had (the test is then skipped)."""

    def missing():
        return [name for name in DAEMONS if not shutil.which(name, path=os.environ["PATH"] + ":/usr/sbin")]

    if missing() and os.geteuid() == 0 and shutil.which("apt-get"):
        quiet = dict(
            capture_output=True, text=True, timeout=600, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        )
        subprocess.run(["apt-get", "update", "-qq"], **quiet)
        subprocess.run(["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"], **quiet)
    return f"SLURM programs not found and not installable here: {', '.join(missing())}" if missing() else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def slurm():
    reason = find_or_install_slurm()
    if reason:
        pytest.skip(reason)
    # munged wants every folder up to its socket open to all (pytest's temp folders are private)
    root = Path(tempfile.mkdtemp(prefix="minicolossus-slurm-"))
    root.chmod(0o755)
    for folder in ("state", "spool", "log"):
        (root / folder).mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=minicolossus-test",
                f"SlurmctldHost={host}",
                "AuthType=auth/munge",
                f"AuthInfo=socket={root}/munge.sock",
                "CredType=cred/munge",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SlurmUser=root",
                "SlurmdUser=root",
                f"StateSaveLocation={root}/state",
                f"SlurmdSpoolDir={root}/spool",
                f"SlurmctldPidFile={root}/slurmctld.pid",
                f"SlurmdPidFile={root}/slurmd.pid",
                f"SlurmctldLogFile={root}/log/slurmctld.log",
                f"SlurmdLogFile={root}/log/slurmd.log",
                f"SlurmctldPort={free_port()}",
                f"SlurmdPort={free_port()}",
                "SchedulerType=sched/builtin",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "ReturnToService=2",
                "MpiDefault=none",
                f"NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN",
                f"PartitionName=cpu Nodes={host} Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": os.environ["PATH"] + ":/usr/sbin"}
    pid_files = []
    try:
        subprocess.run(
            [
                "munged",
                f"--socket={root}/munge.sock",
                f"--key-file={key}",
                f"--pid-file={root}/munged.pid",
                f"--log-file={root}/log/munged.log",
                f"--seed-file={root}/munge.seed",
            ],
            env=env,
            check=True,
        )
        pid_files.append(root / "munged.pid")
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([daemon, "-f", str(conf)], env=env, check=True)
            pid_files.append(root / f"{daemon}.pid")
        deadline = time.time() + 60
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout:
            assert time.time() < deadline, (root / "log" / "slurmctld.log").read_text()[-2000:]
            time.sleep(0.5)
        yield env, root
    finally:
        for pid_file in reversed(pid_files):  # only the daemons this fixture started
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
                except ProcessLookupError:
                    pass
        shutil.rmtree(root, ignore_errors=True)


def job_state(env, job: str) -> dict:
    text = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in text.split() if "=" in field)


def wait_for(env, job: str, states: set, timeout: float = 240) -> dict:
    deadline = time.time() + timeout
    while (state := job_state(env, job)).get("JobState") not in states:
        assert time.time() < deadline, state
        time.sleep(0.5)
    return state


def submit(env, root, out: Path, *train_args, sbatch_args=(), settings=None) -> str:
    """The project's batch script, unchanged; on a CPU partition the documented RANKS_PER_NODE setting."""
    result = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--output={root}/job-%j.out",
            *sbatch_args,
            "scripts/slurm/train.sbatch",
            "configs/tiny.toml",
            *train_args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**env, "RANKS_PER_NODE": "2", "PYTHON": sys.executable, **(settings or {})},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


@pytest.mark.compat
def test_a_batch_job_trains_like_torchrun(slurm, data_dir, tmp_path):
    env, root = slurm
    args = base_args(data_dir, tmp_path / "slurm")[2:]  # without --config: the script takes the config first
    job = submit(env, root, tmp_path / "slurm", *args, "--checkpoint.every=6")
    state = wait_for(env, job, {"COMPLETED", "FAILED", "CANCELLED"})
    log = (root / f"job-{job}.out").read_text()
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", log
    assert f"1 node(s) x 2 rank(s), {max(os.cpu_count() // 2, 1)} thread(s) each" in log
    assert (tmp_path / "slurm" / "checkpoints" / "step_00000012" / "COMPLETE").exists()
    reference = train(data_dir, tmp_path / "torchrun", nproc=2)
    assert losses(read_metrics(tmp_path / "slurm")) == losses(reference)


@pytest.mark.parametrize("signal_name", ["USR1", "TERM"])
def test_a_signalled_job_checkpoints_exits_75_requeues_and_resumes(slurm, data_dir, tmp_path, signal_name):
    env, root = slurm
    out = tmp_path / "preempted"
    args = base_args(data_dir, out, steps=40)[2:]
    job = submit(env, root, out, *args)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or len(read_metrics(out)) < 5:
        assert time.time() < deadline and job_state(env, job).get("JobState") in ("PENDING", "RUNNING")
        time.sleep(0.2)
    subprocess.run(["scancel", f"--signal={signal_name}", job], env=env, check=True)
    state = wait_for(env, job, {"PENDING", "COMPLETED", "FAILED"})
    log = (root / f"job-{job}.out").read_text()
    assert state["JobState"] == "PENDING" and state["Restarts"] == "1", log
    assert "Exited with exit code 75" in log and "requeueing job" in log
    # the node is free again once the first run's processes are gone; then skip SLURM's requeue delay
    deadline = time.time() + 120
    while subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout.strip() != "idle":
        assert time.time() < deadline
        time.sleep(0.5)
    # slurmd refuses a launch credential issued in the same second as it revoked the job's last one
    # ("Job N already killed, do not launch batch job"): start the requeued run in a later second
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)
    state = wait_for(env, job, {"COMPLETED", "FAILED", "CANCELLED"})
    log = (root / f"job-{job}.out").read_text()
    daemons = "".join((root / "log" / name).read_text()[-1500:] for name in ("slurmctld.log", "slurmd.log"))
    assert state["JobState"] == "COMPLETED" and "resumed from" in log, (state, log, daemons)
    straight = train(data_dir, tmp_path / "straight", nproc=2, steps=40)
    rows = read_metrics(out)
    assert [row["step"] for row in rows] == list(range(1, 41))
    assert losses(rows) == losses(straight)


def test_the_time_limit_warning_checkpoints_and_the_job_ends_with_75(slurm, data_dir, tmp_path):
    # A 1-minute limit is inside the script's 180 s warning: SIGUSR1 comes at once. REQUEUE=0 so that what
    # SLURM records is the job's own exit code.
    env, root = slurm
    out = tmp_path / "limited"
    job = submit(
        env,
        root,
        out,
        *base_args(data_dir, out, steps=100_000)[2:],
        "--log.every=100",
        sbatch_args=["--time=1"],
        settings={"REQUEUE": "0"},
    )
    state = wait_for(env, job, {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED"}, timeout=120)
    log = (root / f"job-{job}.out").read_text()
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "75:0", log
    assert "preempted at step" in log
    assert any((folder / "COMPLETE").exists() for folder in (out / "checkpoints").iterdir())


def test_data_prepare_as_job_arrays_gives_the_bytes_of_one_local_task(slurm, tmp_path):
    """datatrove's SLURM executor: each stage a job array after the last; the same bytes as one local task."""
    env, _ = slurm
    corpus = write_corpus(tmp_path)
    args = ["--source", corpus, "--tokenizer", "byte", "--dedup", "exact,minhash", "--filters", FILTERS]
    local = in_process(prepare_main, *args, "--out", tmp_path / "local")
    assert local.returncode == 0, local.stderr
    on_slurm = subprocess.run(
        [sys.executable, "-m", "data.prepare", *map(str, args), "--out", str(tmp_path / "slurm")]
        + ["--executor", "slurm", "--tasks", "2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert on_slurm.returncode == 0, on_slurm.stderr
    assert len(on_slurm.stderr.strip().splitlines()) == 1, on_slurm.stderr
    assert_same_bytes(tmp_path / "local", tmp_path / "slurm")
