"""From a planned layout to the trainer's command line: the flags that make `python -m train` run exactly the
parallelism the planner costed (strategy, tp/cp/ep degrees, micro-batch, sequence and global batch), or the one
reason it cannot yet."""

from .job import Job, Parallelism

ZERO_STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}


def not_runnable(parallelism: Parallelism) -> str | None:
    """Why the trainer cannot run this layout, or None when it can."""
    if parallelism.pp > 1:
        return "pipeline parallelism is not in the trainer yet"
    if parallelism.checkpointing == "selective":
        return "the trainer checkpoints whole blocks (full), not selected activations"
    split = [name for name in ("tp", "ep", "cp") if getattr(parallelism, name) > 1]
    if split and parallelism.data_parallel not in ("fsdp", "hsdp"):
        return f"the trainer runs {'/'.join(split)} with fsdp or hsdp, not {parallelism.data_parallel}"
    return None


def trainer_flags(job: Job, parallelism: Parallelism, batch_tokens: int) -> list[str] | None:
    """`python -m train` flags for this layout of this job, a step of `batch_tokens` (None when not_runnable
    says why not). The world size is the launcher's: torchrun --nproc_per_node x --nnodes = job.gpus."""
    if not_runnable(parallelism) is not None:
        return None
    kind = parallelism.data_parallel
    flags = [f"--parallel.strategy={'deepspeed' if kind in ZERO_STAGES else kind}"]
    if kind in ZERO_STAGES:
        flags.append(f"--parallel.zero_stage={ZERO_STAGES[kind]}")
    if kind == "hsdp":
        flags.append(f"--parallel.shard_size={parallelism.shard_size}")  # data-parallel ranks, in both
    for name in ("tp", "cp", "ep"):
        if getattr(parallelism, name) > 1:
            flags.append(f"--parallel.{name}_size={getattr(parallelism, name)}")
    if parallelism.checkpointing == "full":
        flags.append("--parallel.activation_checkpointing=true")
    return flags + [
        f"--data.seq_len={job.seq_len}",
        f"--batch.micro_batch_size={parallelism.micro_batch}",
        f"--batch.global_batch_tokens={batch_tokens}",
    ]
