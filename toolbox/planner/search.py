"""Every layout of a job that fits, ranked by predicted step time."""

import itertools

from .job import CHECKPOINTING, DATA_PARALLEL, InvalidLayout, Job, Layout
from .layout import Estimate, estimate

MICRO_BATCHES = (1, 2, 4)  # sequences per forward
VIRTUAL_STAGES = (2, 4)  # an interleaved schedule's chunks per rank


def powers_of_two(limit: int) -> list[int]:
    return [2**i for i in range(limit.bit_length()) if 2**i <= limit]


def candidates(job: Job, data_parallel: tuple = DATA_PARALLEL):
    s, node = job.spec, job.cluster.gpus_per_node
    tps = powers_of_two(node)
    # any stage count that divides the job (100,000 GPUs = 2^5 x 5^5 take pp 5 or 25), uneven stages allowed
    pps = [p for p in range(1, min(s.layers, 128) + 1) if job.gpus % p == 0]
    eps = powers_of_two(s.experts) if s.is_moe else [1]
    cps = [c for c in powers_of_two(32) if job.seq_len >= 16384 or c == 1]
    for dp_kind, tp, pp, ep, cp, ac, micro in itertools.product(
        data_parallel, tps, pps, eps, cps, CHECKPOINTING, MICRO_BATCHES
    ):
        schedules = [("1f1b", 1)] + ([("interleaved", v) for v in VIRTUAL_STAGES] if pp > 1 else [])
        schedules += [("dualpipe", 1)] if pp % 2 == 0 else []
        for schedule, virtual in schedules:
            yield Layout(
                dp_kind,
                tp=tp,
                pp=pp,
                ep=ep,
                cp=cp,
                micro_batch=micro,
                schedule=schedule,
                virtual_stages=virtual,
                checkpointing=ac,
                shard_size=node,
            )


def search(
    job: Job, top: int | None = None, fitting_only: bool = True, data_parallel: tuple = DATA_PARALLEL
) -> list[Estimate]:
    """`data_parallel` narrows the kinds tried (a published run's software had only some of them)."""
    results = []
    for layout in candidates(job, data_parallel):
        try:
            result = estimate(job, layout)
        except InvalidLayout:
            continue
        if result.fits or not fitting_only:
            results.append(result)
    results.sort(key=lambda r: r.batch_tokens / r.step_s, reverse=True)  # tokens per second, best first
    return results[:top] if top else results
