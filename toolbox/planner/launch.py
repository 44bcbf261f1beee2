"""From a planned layout to the trainer's command line: the flags that make `python -m train` run exactly the
parallelism the planner costed (strategy, tp/cp/ep/pp degrees and schedule, micro-batch, sequence and global
batch), or the one reason it cannot."""

from train.parallel.pipeline_plan import micro_batch_shortfall

from .job import Job, Parallelism

ZERO_STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}


# The planner's schedules as the trainer names them. DualPipe's V (DeepSeek's "cut-in-half" DualPipe, one
# pipeline, two stages a rank) is what the trainer runs; the planner costs the same two stages a rank.
TRAINER_SCHEDULES = {"1f1b": "1f1b", "interleaved": "interleaved", "dualpipe": "dualpipev"}


def not_runnable(job: Job, parallelism: Parallelism) -> str | None:
    """Why the trainer cannot run this layout, or None when it can."""
    if parallelism.checkpointing == "selective":
        return "the trainer checkpoints whole blocks (full), not selected activations"
    stage_ranks = job.gpus // parallelism.pp
    data_parallel = stage_ranks // (parallelism.tp * parallelism.cp)
    micro_batches = job.global_batch_tokens // job.seq_len // (data_parallel * parallelism.micro_batch)
    schedule = TRAINER_SCHEDULES[parallelism.schedule]
    shortfall = micro_batch_shortfall(schedule, parallelism.pp, micro_batches) if parallelism.pp > 1 else None
    if shortfall:
        return f"the trainer's {schedule} schedule {shortfall} ({micro_batches} here)"
    split = [name for name in ("tp", "ep", "cp", "pp") if getattr(parallelism, name) > 1]
    if split and parallelism.data_parallel not in ("fsdp", "hsdp"):
        return f"the trainer runs {'/'.join(split)} with fsdp or hsdp, not {parallelism.data_parallel}"
    return None


def trainer_flags(job: Job, parallelism: Parallelism, batch_tokens: int) -> list[str] | None:
    """`python -m train` flags for this layout of this job, a step of `batch_tokens` (None when not_runnable
    says why not). The world size is the launcher's: torchrun --nproc_per_node x --nnodes = job.gpus."""
    if not_runnable(job, parallelism) is not None:
        return None
    kind = parallelism.data_parallel
    flags = [f"--parallel.strategy={'deepspeed' if kind in ZERO_STAGES else kind}"]
    if kind in ZERO_STAGES:
        flags.append(f"--parallel.zero_stage={ZERO_STAGES[kind]}")
        flags.append("--optim.name=adamw")  # DeepSpeed steps AdamW only (Muon needs whole matrices)
    if kind == "hsdp":
        flags.append(f"--parallel.shard_size={parallelism.shard_size}")  # data-parallel ranks, in both
    for name in ("tp", "cp", "ep", "pp"):
        if getattr(parallelism, name) > 1:
            flags.append(f"--parallel.{name}_size={getattr(parallelism, name)}")
    if parallelism.pp > 1:
        flags.append(f"--parallel.pp_schedule={TRAINER_SCHEDULES[parallelism.schedule]}")
        if parallelism.schedule == "interleaved":
            flags.append(f"--parallel.pp_virtual_stages={parallelism.virtual_stages}")
    if parallelism.checkpointing == "full":
        flags.append("--parallel.activation_checkpointing=true")
    return flags + [
        f"--data.seq_len={job.seq_len}",
        f"--batch.micro_batch_size={parallelism.micro_batch}",
        f"--batch.global_batch_tokens={batch_tokens}",
    ]
