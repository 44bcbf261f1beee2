"""MoE balancing settings against each other (scripts/bench.py balance): a preset trained once per setting and
seed from the same data order, under expert parallelism 2, on a corpus whose held-out end is the validation.

Per run: validation bits/byte at the end; the busiest expert's load over an even share (`expert_load_max`,
averaged over layers: the mean over the run, and the worst layer after the first steps, where every setting
starts with one expert taking all it can); the same for the expert-parallel ranks (`ep_load_max`, the
imbalance every all-to-all waits on); the median tokens/s; and under a capacity the share of dropped
assignments.
"""

import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from train.metrics import read_metrics

from .bench_baseline import BaselineError, run_python

BIAS, AUX, CAPACITY = (
    "--model.overrides.router_bias_update_rate",
    "--model.overrides.router_aux_loss_coef",
    "--model.overrides.capacity_factor",
)
SETTINGS = {  # name -> trainer flags; each sets what it compares, so a preset's default does not leak in
    "aux": [f"{BIAS}=0", f"{AUX}=0.01"],  # Grok-1's routing: the auxiliary loss alone
    "bias": [f"{BIAS}=0.01", f"{AUX}=0"],  # auxiliary-loss-free
    "both": [f"{BIAS}=0.01", f"{AUX}=0.01"],
    "capacity": [f"{BIAS}=0", f"{AUX}=0.01", f"{CAPACITY}=1.25"],
}
PRESET_RUNS = {  # preset -> its config file and what this CPU affords of it
    "tiny": ("configs/tiny.toml", []),  # as it is: 160 steps of 4,096 tokens
    "small": (
        "configs/small.toml",
        [
            "--batch.global_batch_size=16",
            "--batch.micro_batch_size=8",
            "--run.max_steps=150",
            "--optim.warmup_steps=15",
            "--eval.every=150",
            "--eval.max_sequences=128",
        ],
    ),
}
SETTLED_AFTER_STEP = 20  # the max leaves out the first steps, before any balancing has had time to act


def summarize(rows: list[dict]) -> dict:
    """One run's figures from its metrics rows."""
    loads = [row for row in rows if row.get("expert_load_max")]
    settled = [row for row in loads if row["step"] > SETTLED_AFTER_STEP] or loads
    validated = [row for row in rows if "val_bpb" in row]
    if not loads or not validated:
        raise BaselineError("the run logged no expert load or no validation: train a mixture of experts")
    summary = {
        "val_bpb": round(validated[-1]["val_bpb"], 4),
        "busiest_expert_mean": round(statistics.mean(statistics.mean(r["expert_load_max"]) for r in loads), 2),
        "busiest_expert_max": round(max(max(r["expert_load_max"]) for r in settled), 2),
    }
    if any("ep_load_max" in row for row in loads):
        summary["all_to_all_mean"] = round(statistics.mean(statistics.mean(r["ep_load_max"]) for r in loads), 2)
        summary["all_to_all_max"] = round(max(max(r["ep_load_max"]) for r in settled), 2)
    summary["tokens_per_s"] = round(statistics.median(r["tokens_per_s"] for r in rows if r.get("tokens_per_s")))
    dropped = [row["dropped_share"] for row in rows if row.get("dropped_share") is not None]
    if dropped:
        summary["dropped_share"] = round(statistics.mean(dropped), 3)
    return summary


def bench_balance(
    preset: str,
    settings: list[str],
    seeds: list[int],
    source: Path,
    data_root: Path,
    nproc: int,
    overrides: list[str],
    report: Callable[[dict], None] = print,
) -> list[dict]:
    config, shortened = PRESET_RUNS[preset]
    data = data_root / f"{source.name.split('.')[0]}-val-from-end"
    run_python(  # reused when it is already there
        ["-m", "data.prepare", "--source", str(source), "--out", str(data), "--val-from", "end"],
        f"preparing {data}",
    )
    results = []
    for seed in seeds:
        for setting in settings:
            with tempfile.TemporaryDirectory() as out:
                command = [
                    *("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "train"),
                    *("--config", config, f"--data.path={data}", f"--run.out_dir={out}", f"--run.seed={seed}"),
                    *("--parallel.strategy=fsdp", "--parallel.ep_size=2", "--log.every=10", "--log.progress=false"),
                    *("--checkpoint.every=0", "--run.resume=never", *shortened, *SETTINGS[setting], *overrides),
                ]
                run_python(command, f"{preset} with {setting}, seed {seed}", one_thread=True)
                rows = read_metrics(Path(out))
            results.append({"bench": "balance", "preset": preset, "setting": setting, "seed": seed, **summarize(rows)})
            report(results[-1])
            sys.stdout.flush()
    return results
