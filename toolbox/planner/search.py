"""Every parallelism of a job that fits, ranked by predicted step time."""

import itertools
from collections.abc import Iterator
from dataclasses import replace

from .job import CHECKPOINTING, InvalidParallelism, Job, Parallelism
from .launch import not_runnable
from .layout import Estimate, estimate

MICRO_BATCHES = (1, 2, 4)  # sequences per forward


def interleave_depths(job: Job, pp: int) -> list[int]:
    """An interleaved schedule's chunks per rank: every depth that leaves each chunk a layer or more, and, for
    software that cuts a model into equal stages (Megatron-LM asserts it), only depths that divide them evenly."""
    layers = job.spec.layers
    if job.software.uneven_stages:
        return list(range(2, layers // pp + 1))
    return [depth for depth in range(2, layers // pp + 1) if layers % (pp * depth) == 0]


def powers_of_two(limit: int) -> list[int]:
    return [2**i for i in range(limit.bit_length()) if 2**i <= limit]


def candidates(job: Job) -> Iterator[Parallelism]:
    """Every layout the job's software offers (its data-parallel kinds, schedules and checkpointing)."""
    spec, node = job.spec, job.cluster.gpus_per_node
    offered = job.software.model_parallel
    tps = powers_of_two(node) if "tp" in offered else [1]
    # any stage count that divides the job (100,000 GPUs = 2^5 x 5^5 take pp 5 or 25) and, unless the software
    # takes uneven stages, the layers
    pps = [
        stages
        for stages in range(1, min(spec.layers, 128) + 1)
        if job.gpus % stages == 0
        and (stages == 1 or "pp" in offered)
        and (job.software.uneven_stages or spec.layers % stages == 0)
    ]
    eps = powers_of_two(spec.experts) if spec.is_moe and "ep" in offered else [1]
    cps = [degree for degree in powers_of_two(32) if (job.seq_len >= 16384 and "cp" in offered) or degree == 1]
    for dp_kind, tp, pp, ep, cp, checkpointing, micro_batch in itertools.product(
        job.software.data_parallel, tps, pps, eps, cps, job.software.checkpointing, MICRO_BATCHES
    ):
        offered = job.software.schedules
        schedules = [("1f1b", 1)]
        schedules += (
            [("interleaved", virtual) for virtual in interleave_depths(job, pp)]
            if pp > 1 and "interleaved" in offered
            else []
        )
        schedules += [("dualpipe", 1)] if pp % 2 == 0 and "dualpipe" in offered else []
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


def fill_open(job: Job, parallelism: Parallelism, open_knobs: tuple[str, ...]) -> Estimate:
    """A stated layout whose `open_knobs` (micro_batch, virtual_stages, checkpointing) are filled as the search
    would fill them: the fastest choice that fits, or the fastest if none does."""
    depths = interleave_depths(job, parallelism.pp)
    choices = {"micro_batch": MICRO_BATCHES, "virtual_stages": depths, "checkpointing": CHECKPOINTING}
    results = []
    for values in itertools.product(*(choices[knob] for knob in open_knobs)):
        try:
            results.append(estimate(job, replace(parallelism, **dict(zip(open_knobs, values)))))
        except InvalidParallelism:
            continue
    if not results:
        raise InvalidParallelism(f"{parallelism.describe()} does not divide this job, whatever its open knobs")
    return max(results, key=lambda result: (result.fits, result.tokens_per_s))


def search(
    job: Job,
    top: int | None = None,
    fitting_only: bool = True,
    runnable_only: bool = False,
) -> list[Estimate]:
    """What the job's software offers (Job.software), or with `runnable_only` what this project's trainer runs."""
    results = []
    for parallelism in candidates(job):
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
