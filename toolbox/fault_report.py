"""Fault-tolerance report: break real training runs on purpose and check what survives.

    python scripts/faults.py [--work DIR] [--json]

Every case trains the `tiny` config for 12 steps with 2 CPU processes under torchrun (gloo, FSDP,
checkpoints every 3 steps), injects a real fault (MINICOLOSSUS_FAULT, see train/fault_injection.py, or a signal),
lets the job recover the way a cluster would (torchrun --max-restarts, or launching the same command
again) and compares the result with an uninterrupted run of the same config:

    case | survived | steps lost (computed twice) | losses after the fault equal | final weights equal

tests/test_faults.py runs the same cases and asserts each row. (train/fault_injection.py is the other half: the
hook inside the trainer that fires the faults this report asks for.)
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from groundwork.cli import ArgumentParser, run_main
from groundwork.errors import UserError
from train.checkpoint import latest_checkpoint
from train.metrics import read_metrics
from train.trainer import PREEMPTED_EXIT
from train.weights import load_model_weights

REPO = Path(__file__).resolve().parents[1]  # the checkout: configs/ and the cwd of every launch
STEPS, EVERY = 12, 3
# The recipe these scenarios (and the test suite's runs) were measured with, whatever configs/tiny.toml's:
# AdamW runs under every engine, DeepSpeed included.
ADAMW_RECIPE = ["--optim.name=adamw", "--optim.lr=3e-3", "--optim.schedule=cosine", "--optim.min_lr_ratio=0.1"]
MARKER = ".faults-report"  # what makes --work a folder this report may reset


def prepare(work: Path) -> Path:
    """A small byte-level corpus cut from this Python's standard library (offline, seconds)."""
    data = work / "data"
    if not (data / "manifest.json").is_file():
        source = Path(argparse.__file__)  # a sizeable module of the standard library, always present
        (work / "corpus.txt").write_text(source.read_text() * 2)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "data.prepare",
                "--source",
                str(work / "corpus.txt"),
                "--out",
                str(data),
                "--tokenizer",
                "byte",
                "--val-fraction",
                "0.1",
            ],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
    return data


def train_args(data: Path, out: Path, *overrides: str) -> list[str]:
    return [
        "--config",
        str(REPO / "configs" / "tiny.toml"),
        f"--data.path={data}",
        "--data.seq_len=64",
        "--batch.global_batch_size=8",
        "--batch.micro_batch_size=4",
        *ADAMW_RECIPE,
        "--optim.warmup_steps=2",
        f"--run.max_steps={STEPS}",
        "--log.every=1",
        "--log.progress=false",
        "--eval.every=0",
        "--eval.max_sequences=8",
        f"--checkpoint.every={EVERY}",
        "--checkpoint.keep=5",
        "--parallel.strategy=fsdp",
        f"--run.out_dir={out}",
        *overrides,
    ]


def command(data: Path, out: Path, *overrides: str, restarts: int = 0, nproc: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        f"--max-restarts={restarts}",
        "-m",
        "train",
        *train_args(data, out, *overrides),
    ]


def launch(argv: list[str], fault: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MINICOLOSSUS_FAULT"}
    if fault:
        env["MINICOLOSSUS_FAULT"] = fault
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def rows(out: Path) -> list[dict]:
    """The run's rows so far; none before its first log step (the cases poll while it starts)."""
    return read_metrics(out) if (out / "metrics.jsonl").is_file() else []


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_model_weights(latest_checkpoint(out / "checkpoints"))[1]


def compare(case: str, out: Path, reference: Path, survived: bool, **extra: int | float | None) -> dict:
    """The report row: steps logged twice were computed twice (lost); the last row per step is what stands."""
    logged, straight = rows(out), {r["step"]: r["loss"] for r in rows(reference)}
    by_step = {r["step"]: r["loss"] for r in logged}
    finished = survived and max(by_step, default=0) == STEPS and latest_checkpoint(out / "checkpoints") is not None
    equal_weights = finished and all(
        torch.equal(a, b) for a, b in zip(final_weights(out).values(), final_weights(reference).values())
    )
    return {
        "case": case,
        "survived": finished,
        "steps_lost": len(logged) - len(by_step),
        "losses_equal": finished and by_step == straight,
        "weights_equal": equal_weights,
        **extra,
    }


def uninterrupted(data: Path, work: Path, *overrides: str, tag: str = "") -> Path:
    """The run a case is compared with; `overrides` (and a `tag` for its folder) for another layout."""
    out = work / f"uninterrupted{tag}"
    if not (out / "metrics.jsonl").is_file():
        result = launch(command(data, out, *overrides))
        assert result.returncode == 0, result.stderr[-3000:]
    return out


def killed_rank(data: Path, work: Path, reference: Path) -> dict:
    out = work / "killed-rank"
    result = launch(command(data, out, restarts=1), fault="kill:rank=1:step=8")
    return compare("rank 1 SIGKILLed at step 8; torchrun --max-restarts=1", out, reference, result.returncode == 0)


def crash_during_save(data: Path, work: Path, reference: Path) -> dict:
    out = work / "crash-in-save"
    result = launch(command(data, out, restarts=1), fault="killsave:rank=1:step=6")
    partial = sorted(p.name for p in (out / "checkpoints").iterdir() if "tmp" in p.name) if out.exists() else []
    row = compare("rank 1 SIGKILLed while writing the step-6 checkpoint", out, reference, result.returncode == 0)
    row["survived"] = row["survived"] and not partial
    return row


def preemption(data: Path, work: Path, reference: Path, *overrides: str, tag: str = "") -> dict:
    """SIGTERM to the job (what SLURM and Kubernetes send) once step 4 is logged, then the same command again."""
    out = work / f"preempted{tag}"
    argv = command(data, out, *overrides)
    job = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while job.poll() is None and max((r["step"] for r in rows(out)), default=0) < 4:
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=120)
    checkpoint = latest_checkpoint(out / "checkpoints")
    stopped_at = max(r["step"] for r in rows(out))
    clean_stop = checkpoint is not None and checkpoint.name == f"step_{stopped_at:08d}" and stopped_at < STEPS
    result = launch(argv)
    return compare(
        "SIGTERM to the job at step 4, then relaunched",
        out,
        reference,
        clean_stop and result.returncode == 0,
        stopped_at=stopped_at,
        worker_exit=PREEMPTED_EXIT if f"exitcode  : {PREEMPTED_EXIT}" in stderr else None,
    )


def hang(data: Path, work: Path, reference: Path) -> dict:
    """Rank 1 stops at step 5: rank 0's collective times out after run.timeout_s, then the job is relaunched."""
    out = work / "hang"
    started = time.monotonic()
    first = launch(command(data, out, "--run.timeout_s=5"), fault="hang:rank=1:step=5")
    detected_s = time.monotonic() - started
    named = "run.timeout_s=5" in first.stderr
    result = launch(command(data, out))
    return compare(
        "rank 1 hangs at step 5 (run.timeout_s=5), relaunched",
        out,
        reference,
        first.returncode != 0 and named and result.returncode == 0,
        detected_s=round(detected_s, 1),
    )


def nan_loss(data: Path, work: Path, reference: Path, *overrides: str, tag: str = "") -> dict:
    """A NaN loss at step 5: the update is skipped, counted, and training goes on (weights differ by design)."""
    out = work / f"nan{tag}"
    result = launch(command(data, out, *overrides), fault="nan:step=5")
    logged = rows(out)
    row = compare("NaN loss at step 5 (update skipped)", out, reference, result.returncode == 0)
    row["skipped_steps"] = logged[-1]["skipped_steps"] if logged else None
    return row


CASES = [killed_rank, crash_during_save, preemption, hang, nan_loss]


class WorkFolderError(UserError, ValueError):
    """--work names a folder that holds something else: it is reset, so it is never a folder of the user's."""


def reset(work: Path) -> None:
    made_here = (work / MARKER).is_file() or (work / "uninterrupted").is_dir()  # or by this report's first form
    if work.exists() and not (work.is_dir() and (made_here or not any(work.iterdir()))):
        raise WorkFolderError(
            f"--work {work}: exists and is not a folder this report made (it is deleted and "
            f"made again); pass a new or empty folder"
        )
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / MARKER).touch()


def table(report: list[dict]) -> str:
    yes = {True: "yes", False: "no"}
    lines = [
        "| case | survived | steps lost | losses after the fault equal | final weights equal |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {row['case']} | {yes[row['survived']]} | {row['steps_lost']} | {yes[row['losses_equal']]} | "
        f"{yes[row['weights_equal']]} |"
        for row in report
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="scripts/faults.py", description=__doc__)
    parser.add_argument(
        "--work", type=Path, default=REPO / "runs" / "faults", help="scratch folder (deleted and made again)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    def work() -> int:
        reset(args.work)
        data = prepare(args.work)
        reference = uninterrupted(data, args.work)
        report = [case(data, args.work, reference) for case in CASES]
        print(json.dumps(report, indent=2) if args.json else table(report))
        return 0 if args.json or all(row["survived"] for row in report) else 1

    return run_main(work)
