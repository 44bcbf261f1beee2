"""How far the planner's predictions are from the held-out published runs (toolbox/planner/heldout.py): each run's
error, and the statistics the README reports (median absolute error, the share within 20%, and whether the faster
layout of each measured pair is predicted faster)."""

import statistics

from .hardware import FABRICS, GPUS, Cluster
from .heldout import (
    DEEPSPEED_ZERO3_2021,
    LLM_FOUNDRY,
    MEGATRON_2021,
    MEGATRON_2022,
    MEGATRON_2023,
    MEGATRON_BRIDGE,
    MEGATRON_DEEPSPEED,
    NEMO_2024,
    HeldOutRun,
)
from .job import Job
from .layout import Estimate
from .search import fill_open
from .software import SOFTWARE

# Each run's stack as a software profile (toolbox/planner/software.py)
PROFILES = {
    MEGATRON_2021: "megatron-lm-2021",
    DEEPSPEED_ZERO3_2021: "deepspeed-2021",
    MEGATRON_2022: "megatron-lm-2022",
    MEGATRON_2023: "megatron-lm-2023",
    NEMO_2024: "megatron-core",
    MEGATRON_DEEPSPEED: "megatron-deepspeed",
    LLM_FOUNDRY: "pytorch-fsdp",
    MEGATRON_BRIDGE: "megatron-core-tp-overlap",  # its published recipes turn tp overlap on
}


def job(run: HeldOutRun) -> Job:
    return Job(
        run.spec,
        Cluster(GPUS[run.gpu], FABRICS[run.fabric]),
        run.gpus,
        run.spec.context,
        run.global_batch_sequences * run.spec.context,
        software=SOFTWARE[PROFILES[run.software]],
    )


def prediction(run: HeldOutRun) -> Estimate:
    """The run's layout, its open knobs filled as the search would: the fastest choice that fits (or the fastest)."""
    return fill_open(job(run), run.parallelism, run.open)


def error(run: HeldOutRun) -> float:
    """Predicted over published tokens/s per GPU, minus 1 (+ means predicted too fast)."""
    return prediction(run).tokens_per_s / run.gpus / run.tokens_per_gpu_s - 1


def summary(runs: tuple[HeldOutRun, ...]) -> dict:
    errors = {run.key: error(run) for run in runs}
    pairs = {}
    for run in runs:
        if run.pair:
            pairs.setdefault(run.pair, []).append(run)
    ordered = [
        (first.tokens_per_gpu_s > second.tokens_per_gpu_s)
        == ((1 + errors[first.key]) * first.tokens_per_gpu_s > (1 + errors[second.key]) * second.tokens_per_gpu_s)
        for first, second in (members for members in pairs.values() if len(members) == 2)
    ]
    return {
        "runs": len(errors),
        "median_abs_error": statistics.median(abs(value) for value in errors.values()),
        "median_error": statistics.median(errors.values()),
        "within_20_percent": sum(abs(value) <= 0.20 for value in errors.values()) / len(errors),
        "pairs_ordered": sum(ordered),
        "pairs": len(ordered),
        "errors": errors,
    }
