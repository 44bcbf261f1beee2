"""`scripts/bench.py init`: what a rank holds while the trainer builds and initialises a model.

Each rank builds the model on the meta device, splits it, and fills only its own shards (see
train/initialization.py). This runs the trainer's own construction on N ranks and prints, per rank, the
growth of its resident memory during construction against the bytes of the whole fp32 model: a rank that
built the whole model first would grow by at least the latter.
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from train.config import load_config

REPO = Path(__file__).resolve().parents[1]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def worker(argv: list[str]) -> None:
    """One rank (under torchrun): construct the trainer, report memory as one JSON line."""
    from train.parallel import setup, teardown
    from train.startup import check_before_start
    from train.trainer import Trainer

    config_path, overrides = argv[0], argv[1:]
    config = load_config(config_path, overrides)
    check_before_start(config)
    env = setup(config)
    before = peak_rss_mib()
    trainer = Trainer(config, env)
    after = peak_rss_mib()
    held = trainer.engine.memory_bytes()["params"] / 2**20
    print(
        json.dumps(
            {
                "rank": env.rank,
                "preset": config.model.preset,
                "params": trainer.params_total,
                "full_model_mib": round(trainer.params_total * 4 / 2**20, 1),
                "params_held_mib": round(held, 1),
                "rss_before_mib": round(before, 1),
                "rss_growth_mib": round(after - before, 1),
            }
        ),
        flush=True,
    )
    teardown()


def bench_init(config: str, data: Path, nproc: int, overrides: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "toolbox.bench_init",
            config,
            f"--data.path={data}",
            f"--run.out_dir={out}",
            "--run.resume=never",
            *overrides,
        ]
        result = subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or len(rows) != nproc:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"init bench failed (exit {result.returncode}): {last}")
    return sorted(rows, key=lambda row: row["rank"])


if __name__ == "__main__":
    worker(sys.argv[1:])
