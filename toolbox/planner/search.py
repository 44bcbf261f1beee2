"""Every parallelism of a job that fits, ranked by predicted step time."""

import itertools
from collections.abc import Iterator

from .job import CHECKPOINTING, DATA_PARALLEL, InvalidParallelism, Job, Parallelism
from .launch import not_runnable
from .layout import Estimate, estimate

MICRO_BATCHES = (1, 2, 4)  # sequences per forward
VIRTUAL_STAGES = (2, 4)  # an interleaved schedule's chunks per rank


def powers_of_two(limit: int) -> list[int]:
    return [2**i for i in range(limit.bit_length()) if 2**i <= limit]


def candidates(job: Job, data_parallel: tuple[str, ...] = DATA_PARALLEL) -> Iterator[Parallelism]:
    spec, node = job.spec, job.cluster.gpus_per_node
    tps = powers_of_two(node)
    # any stage count that divides the job (100,000 GPUs = 2^5 x 5^5 take pp 5 or 25), uneven stages allowed
    pps = [stages for stages in range(1, min(spec.layers, 128) + 1) if job.gpus % stages == 0]
    eps = powers_of_two(spec.experts) if spec.is_moe else [1]
    cps = [degree for degree in powers_of_two(32) if job.seq_len >= 16384 or degree == 1]
    for dp_kind, tp, pp, ep, cp, checkpointing, micro_batch in itertools.product(
        data_parallel, tps, pps, eps, cps, CHECKPOINTING, MICRO_BATCHES
    ):
        schedules = [("1f1b", 1)] + ([("interleaved", virtual) for virtual in VIRTUAL_STAGES] if pp > 1 else [])
        schedules += [("dualpipe", 1)] if pp % 2 == 0 else []
        for schedule, virtual_stages in schedules:
            yield Parallelism(
                dp_kind,
                tp=tp,
                pp=pp,
                ep=ep,
                cp=cp,
                micro_batch=micro_batch,
                schedule=schedule,
                virtual_stages=virtual_stages,
                checkpointing=checkpointing,
                shard_size=node,
            )


def search(
    job: Job,
    top: int | None = None,
    fitting_only: bool = True,
    data_parallel: tuple[str, ...] = DATA_PARALLEL,
    runnable_only: bool = False,
) -> list[Estimate]:
    """`data_parallel` narrows the kinds tried (a published run's software had only some of them);
    `runnable_only` to the layouts this project's trainer runs."""
    results = []
    for parallelism in candidates(job, data_parallel):
        if runnable_only and not_runnable(job, parallelism) is not None:
            continue
        try:
            result = estimate(job, parallelism)
        except InvalidParallelism:
            continue
        if result.fits or not fitting_only:
            results.append(result)
    results.sort(key=lambda result: result.tokens_per_s, reverse=True)  # best first
    return results[:top] if top else results
