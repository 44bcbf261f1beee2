"""Every launcher starts the same trainer with the same config: accelerate, the deepspeed launcher, torchrun
as two nodes (on loopback, and as two hosts in network namespaces), SLURM and Kubernetes; and a node that
never comes produces an error within the timeout, not a hang."""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ranks
import yaml
from conftest import REPO, STEPS, base_args, losses, train
from torch.distributed.run import get_args_parser

from train.config import load_config
from train.metrics import read_metrics

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def metrics(out: Path) -> list[dict]:
    return read_metrics(out)


def assert_same_curve(rows, reference_rows):
    assert len(rows) == len(reference_rows) == STEPS
    assert max(abs(a - b) for a, b in zip(losses(rows), losses(reference_rows))) < 1e-5


def run(command, timeout=300, **kwargs):
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.distributed
@pytest.mark.compat
def test_accelerate_launch(data_dir, reference, tmp_path):
    ranks.launch(
        [
            str(BIN / "accelerate"),
            "launch",
            "--multi_gpu",
            "--num_processes=2",
            "--num_machines=1",
            "--mixed_precision=no",
            "--dynamo_backend=no",
            "-m",
            "train",
            *base_args(data_dir, tmp_path),
            "--parallel.strategy=fsdp",
        ]
    )
    assert_same_curve(metrics(tmp_path), reference[0])


@pytest.mark.distributed
def test_deepspeed_launcher(data_dir, reference, tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed: pip install -e '.[deepspeed]'")
    # the launcher appends --local_rank=N to the trainer's arguments
    ranks.launch(
        [
            str(BIN / "deepspeed"),
            "--num_gpus=2",
            f"--master_port={free_port()}",
            "--module",
            "train",
            *base_args(data_dir, tmp_path),
            "--parallel.strategy=deepspeed",
            "--parallel.zero_stage=2",
        ]
    )
    assert_same_curve(metrics(tmp_path), reference[0])


def two_nodes(data_dir, out, nproc_per_node, *overrides, rdzv_timeout=60):
    """Two torchrun agents, node ranks 0 and 1, meeting at a c10d rendezvous on 127.0.0.1."""
    endpoint = f"127.0.0.1:{free_port()}"
    program = ["-m", "train", *base_args(data_dir, out), *overrides]
    agents = [
        ranks.torchrun_argv(
            program, nproc=nproc_per_node, nnodes=2, node_rank=rank, endpoint=endpoint, join_timeout=rdzv_timeout
        )
        for rank in (0, 1)
    ]
    ranks.launch_all(agents, timeout=300)
    return metrics(out)


@pytest.mark.distributed
def test_two_nodes_fsdp(data_dir, reference, tmp_path):
    assert_same_curve(two_nodes(data_dir, tmp_path, 1, "--parallel.strategy=fsdp"), reference[0])


@pytest.mark.distributed
def test_two_nodes_of_two_processes_hsdp(data_dir, tmp_path):
    # 4 ranks: replicate across the 2 nodes x shard over each node's 2 processes (from LOCAL_WORLD_SIZE).
    # One micro-batch of 2 sequences per rank; the single process accumulates 4 of the same size.
    single = train(data_dir, tmp_path / "single", "--batch.micro_batch_size=2")
    rows = two_nodes(data_dir, tmp_path / "nodes", 2, "--parallel.strategy=hsdp", "--batch.micro_batch_size=2")
    assert_same_curve(rows, single)


@pytest.mark.distributed
def test_a_node_that_never_joins_fails_within_the_rendezvous_timeout(data_dir, tmp_path):
    started = time.monotonic()
    result = ranks.torchrun(
        ["-m", "train", *base_args(data_dir, tmp_path), "--parallel.strategy=fsdp"],
        nproc=1,
        nnodes=2,
        node_rank=0,
        endpoint=f"127.0.0.1:{free_port()}",
        rdzv_id="lonely",
        join_timeout=3,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0 and time.monotonic() - started < 60
    assert "RendezvousTimeoutError" in result.stderr


@pytest.mark.distributed  # runs a command in a fresh interpreter
def test_a_rank_that_never_joins_gives_a_one_line_error(data_dir, tmp_path):
    # Launched without an agent (srun, mpirun, by hand): the process group's own rendezvous, run.timeout_s.
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            *base_args(data_dir, tmp_path),
            "--parallel.strategy=fsdp",
            "--run.timeout_s=3",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("error: the 2 processes did not all join")
        and "run.timeout_s=3" in lines[0]
    )


@pytest.mark.distributed
def test_two_hosts_in_network_namespaces(data_dir, reference, tmp_path):
    result = ranks.launch(
        ["bash", "scripts/multinode_local.sh", *base_args(data_dir, tmp_path), "--parallel.strategy=fsdp"],
        timeout=300,
        check=False,
        env={**os.environ, "PYTHON": sys.executable, "PORT": str(free_port())},
    )
    if result.returncode == 77:
        pytest.skip(result.stderr.strip())
    assert result.returncode == 0, result.stderr[-4000:]
    assert_same_curve(metrics(tmp_path), reference[0])


# --- cluster job files: checked as far as can be without a cluster -----------------------------------------


def executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def recorded_launches(record: Path) -> list[list[str]]:
    return [json.loads(line) for line in record.read_text().splitlines()]


def check_torchrun_command(argv: list[str], nnodes: int, nproc: int, node_rank: int, endpoint: str):
    args = get_args_parser().parse_args(argv)
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == (str(nnodes), str(nproc), node_rank)
    assert args.rdzv_backend == "c10d" and args.rdzv_endpoint == endpoint
    assert args.module and args.training_script == "train"
    train_args = list(args.training_script_args)
    at = train_args.index("--config")
    config_path = train_args.pop(at + 1)
    train_args.pop(at)
    return load_config(REPO / config_path, train_args)  # the trainer accepts what the job passes


def test_slurm_script_starts_one_process_per_rank_from_the_allocation(tmp_path):
    """Without a cluster (tests/test_slurm.py runs it under a real SLURM): the ranks per node come from the GPUs
    allocated, the threads from the CPUs, and a GPU-less allocation without RANKS_PER_NODE is one line."""
    subprocess.run(["bash", "-n", "scripts/slurm/train.sbatch"], cwd=REPO, check=True)
    record = tmp_path / "launches.jsonl"
    fake = tmp_path / "bin"
    fake.mkdir()
    # scontrol expands the node list; srun runs its command once per task with SLURM_PROCID / SLURM_LOCALID
    executable(fake / "scontrol", "#!/usr/bin/env bash\nprintf 'gpu-node-17\\ngpu-node-18\\n'\n")
    executable(
        fake / "srun",
        "#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\n"
        "for p in $(seq 0 $((WORLD_SIZE - 1))); do SLURM_PROCID=$p "
        'SLURM_LOCALID=$((p % LOCAL_WORLD_SIZE)) "$@" || exit; done\n',
    )
    executable(
        fake / "python",
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"keys = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'OMP_NUM_THREADS')\n"
        f"open({str(record)!r}, 'a').write(json.dumps([sys.argv[1:], "
        f"{{k: os.environ[k] for k in keys}}]) + '\\n')\n",
    )
    env = {
        **os.environ,
        "PATH": f"{fake}:{os.environ['PATH']}",
        "PYTHON": str(fake / "python"),
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu-node-[17-18]",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_CPUS_ON_NODE": "64",
    }
    run(["bash", "scripts/slurm/train.sbatch", "configs/gpu-350m.toml", "--run.max_steps=10"], env=env)
    launches = recorded_launches(record)
    assert [int(e["RANK"]) for _, e in launches] == list(range(16))
    assert [int(e["LOCAL_RANK"]) for _, e in launches] == list(range(8)) * 2
    assert {(e["WORLD_SIZE"], e["MASTER_ADDR"], e["OMP_NUM_THREADS"]) for _, e in launches} == {
        ("16", "gpu-node-17", "8")
    }
    argv = launches[0][0]
    assert argv[:2] == ["-m", "train"] and argv[2] == "--parallel.strategy=hsdp"
    config = load_config(REPO / argv[4], [argv[2], *argv[5:]])  # the trainer accepts what the job passes
    assert config.parallel.strategy == "hsdp" and config.run.max_steps == 10
    cpu_only = {**env, "SLURM_GPUS_ON_NODE": "0"}
    refused = subprocess.run(
        ["bash", "scripts/slurm/train.sbatch", "configs/tiny.toml"],
        cwd=REPO,
        env=cpu_only,
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and "set RANKS_PER_NODE" in refused.stderr.strip().splitlines()[-1]


def test_kubernetes_job_is_consistent_and_builds_the_torchrun_command(tmp_path):
    service, job = yaml.safe_load_all((REPO / "scripts" / "k8s" / "train.yaml").read_text())
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    assert job["kind"] == "Job" and job["spec"]["completionMode"] == "Indexed"
    pod = job["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert pod["spec"]["subdomain"] == service["metadata"]["name"]
    container = pod["spec"]["containers"][0]
    env = {item["name"]: item["value"] for item in container["env"]}
    nnodes, gpus = int(env["NNODES"]), int(env["GPUS_PER_NODE"])
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == nnodes
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    record = tmp_path / "launches.jsonl"
    fake = tmp_path / "bin"
    fake.mkdir()
    executable(
        fake / "torchrun",
        f"#!{sys.executable}\nimport json, sys\nopen({str(record)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n",
    )
    endpoint = f"{job['metadata']['name']}-0.{service['metadata']['name']}:29500"
    for index in range(nnodes):  # what each pod runs
        run(
            [*container["command"], *container["args"]],
            env={**os.environ, **env, "PATH": f"{fake}:{os.environ['PATH']}", "JOB_COMPLETION_INDEX": str(index)},
        )
    for index, argv in enumerate(recorded_launches(record)):
        config = check_torchrun_command(argv, nnodes, gpus, index, endpoint)
        assert config.parallel.strategy == "hsdp"


def test_kubernetes_manifest_is_valid_and_a_terminated_pod_exits_75_for_its_failure_policy(tmp_path):
    validate = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "scripts/k8s/train.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert validate.returncode == 0, validate.stdout + validate.stderr
    _, job = yaml.safe_load_all((REPO / "scripts" / "k8s" / "train.yaml").read_text())
    pod = job["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 120  # a checkpoint's time between SIGTERM and SIGKILL
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [75]}} in rules
    container = pod["containers"][0]
    # a torchrun stand-in whose worker checkpoints and exits 75 on SIGTERM, and which exits 1 when its
    # worker fails, as torchrun does; the pod's shell must turn the kubelet's SIGTERM into exit 75
    fake = tmp_path / "bin"
    fake.mkdir()
    ready = tmp_path / "worker-ready"
    executable(
        fake / "torchrun",
        f"""#!{sys.executable}
import signal, subprocess, sys
worker = subprocess.Popen([sys.executable, "-c", '''
import pathlib, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))
pathlib.Path({str(ready)!r}).write_text("up")
time.sleep(60)
'''])
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the stand-in agent outlives its worker, as torchrun tries to
sys.exit(1 if worker.wait() else 0)
""",
    )
    env = {
        **os.environ,
        **{item["name"]: item["value"] for item in container["env"]},
        "PATH": f"{fake}:{os.environ['PATH']}",
        "JOB_COMPLETION_INDEX": "0",
    }
    shell = subprocess.Popen([*container["command"], *container["args"]], env=env, cwd=REPO)
    deadline = time.time() + 30
    while not ready.exists():
        assert time.time() < deadline and shell.poll() is None
        time.sleep(0.05)
    shell.send_signal(signal.SIGTERM)  # what the kubelet sends first
    assert shell.wait(timeout=30) == 75
