"""One parallelism of one job: memory per GPU, the bytes every collective moves, and the step time they add up to.

A step is its micro-batches one after another on the busiest pipeline rank, plus the bubble: each micro-batch
time is its compute and the communication of tp, cp, ep and pp that the compute does not hide; the bubble is
idle micro-batch times; data parallelism's collectives add what their phase's compute does not hide
(toolbox/planner/traffic.py says what hides behind what).
"""

from dataclasses import dataclass, field

from . import compute
from .job import InvalidParallelism, Job, Parallelism
from .memory import memory, optimizer_params
from .pipeline import bubble, slowest_stage, stages_per_rank
from .spec import ModelSpec
from .traffic import (
    Traffic,
    context_parallel_traffic,
    data_parallel_traffic,
    expert_parallel_traffic,
    pipeline_traffic,
    tensor_parallel_traffic,
    tied_embedding_traffic,
)


@dataclass
class Estimate:
    job: Job
    parallelism: Parallelism
    dp: int
    micro_batches: int  # per data-parallel rank and step
    memory_gib: dict[str, float]
    traffic: list[Traffic] = field(default_factory=list)
    compute_s: float = 0.0  # the step's compute on one GPU, recomputation included
    optimizer_s: float = 0.0  # the optimizer step, after the last backward
    bubble_s: float = 0.0
    step_s: float = 0.0

    @property
    def batch_tokens(self) -> int:
        return self.dp * self.micro_batches * self.parallelism.micro_batch * self.job.seq_len

    @property
    def mem_gib(self) -> float:
        return sum(self.memory_gib.values())

    @property
    def fits(self) -> bool:
        return self.mem_gib <= self.job.cluster.gpu.usable_memory_gib

    @property
    def exposed_comm_s(self) -> float:
        return sum(t.exposed_s for t in self.traffic)

    @property
    def tokens_per_s(self) -> float:
        return self.batch_tokens / self.step_s

    @property
    def tflops_per_gpu(self) -> float:
        flops = self.job.spec.model_flops_per_token(self.job.seq_len)
        return self.tokens_per_s * flops / self.job.gpus / 1e12

    @property
    def mfu(self) -> float:
        return self.tflops_per_gpu * 1e12 / self.job.cluster.gpu.peak_flops


def check(job: Job, parallelism: Parallelism) -> int:
    """The data-parallel degree, or InvalidParallelism naming what does not divide."""
    spec = job.spec
    tp, pp, ep, cp = parallelism.tp, parallelism.pp, parallelism.ep, parallelism.cp
    micro_batch, schedule, virtual_stages = parallelism.micro_batch, parallelism.schedule, parallelism.virtual_stages
    model_parallel = tp * pp * cp
    if job.gpus % model_parallel:
        raise InvalidParallelism(f"tp {tp} x pp {pp} x cp {cp} = {model_parallel} does not divide {job.gpus} GPUs")
    dp = job.gpus // model_parallel
    if tp > job.cluster.gpus_per_node:
        raise InvalidParallelism(f"tp {tp} spans more than a node of {job.cluster.gpus_per_node} GPUs")
    if spec.heads % tp or (spec.kv_heads % tp and tp % spec.kv_heads):
        raise InvalidParallelism(f"tp {tp} does not divide the {spec.heads} heads / {spec.kv_heads} KV heads")
    stages = pp * max(virtual_stages, stages_per_rank(schedule))  # DualPipe: a stage from each end on every rank
    if stages > spec.layers:
        raise InvalidParallelism(f"pp {pp}'s {stages} stages are more than the {spec.layers} layers")
    if ep > 1 and (not spec.is_moe or spec.experts % ep or (dp * cp * tp) % ep):
        raise InvalidParallelism(
            f"ep {ep} must divide the {spec.experts} experts and the {dp * cp * tp} "
            f"data x context x tensor parallel ranks it borrows"
        )
    if job.seq_len % (2 * cp) and cp > 1:
        raise InvalidParallelism(f"cp {cp}: sequence {job.seq_len} must split into 2 x cp chunks")
    shard_size = parallelism.shard_size
    if parallelism.data_parallel == "hsdp" and (dp % shard_size or shard_size == 1):
        raise InvalidParallelism(f"hsdp: shard size {shard_size} must divide the {dp} data-parallel ranks")
    sequences = job.global_batch_tokens // job.seq_len
    if sequences < dp * micro_batch:
        raise InvalidParallelism(
            f"{dp} data-parallel ranks x micro-batch {micro_batch} need at least "
            f"{dp * micro_batch * job.seq_len:,} tokens a step (asked {job.global_batch_tokens:,})"
        )
    micro_batches = sequences // (dp * micro_batch)
    if schedule == "interleaved" and micro_batches < pp:
        raise InvalidParallelism("interleaved: needs at least pp micro-batches a step")
    if schedule == "dualpipe" and (pp % 2 or virtual_stages != 1 or micro_batches < 2 * pp):
        raise InvalidParallelism(
            "dualpipe: needs an even pp, no virtual stages and at least 2 x pp micro-batches a step"
        )
    return dp


def work_flops_per_token(spec: ModelSpec, seq_len: int, checkpointing: str) -> float:
    """What the GPUs compute per token: 6N matmuls, the causal attention cores, what checkpointing redoes,
    and the multi-token-prediction modules (one more layer's attention each)."""
    attention = spec.trained_attention_flops(seq_len)
    recompute = {"none": 0.0, "selective": attention / 3, "full": 2 * spec.params_active + attention / 3}
    return 6 * spec.trained_params_active + attention + recompute[checkpointing]


def forward_flops_per_token(spec: ModelSpec, seq_len: int) -> float:
    """A forward's share of the work: a third of the matmuls and of the attention cores (a recompute is
    part of the backward)."""
    return 2 * spec.trained_params_active + spec.trained_attention_flops(seq_len) / 3


def micro_batch_compute_s(job: Job, parallelism: Parallelism) -> float:
    """One micro-batch's forward and backward, recomputation included, on the busiest pipeline rank: the
    model's work by shape (toolbox/planner/compute.py) split over the stages."""
    spec = job.spec
    seconds = compute.micro_batch_s(job, parallelism) / parallelism.pp
    if parallelism.schedule == "dualpipe" and parallelism.ep > 1:  # the all-to-alls run on SMs of their own
        seconds /= 1 - job.cluster.gpu.communication_share
    # a pipeline runs at the pace of its busiest rank
    return seconds * slowest_stage(spec, parallelism.pp, parallelism.schedule, job.seq_len)


def estimate(job: Job, parallelism: Parallelism) -> Estimate:
    """`job` split as `parallelism` says: its memory, traffic and step time, or InvalidParallelism."""
    spec = job.spec
    dp = check(job, parallelism)
    micro_batches = job.global_batch_tokens // job.seq_len // (dp * parallelism.micro_batch)
    result = Estimate(job, parallelism, dp, micro_batches, memory(job, parallelism, dp))
    compute_s = micro_batch_compute_s(job, parallelism)
    per_micro_batch = [
        traffic
        for traffic in (
            tensor_parallel_traffic(job, parallelism),
            context_parallel_traffic(job, parallelism),
            expert_parallel_traffic(job, parallelism, compute_s),
            pipeline_traffic(job, parallelism, dp, micro_batches),
        )
        if traffic is not None
    ]
    micro_batch_s = compute_s + sum(traffic.exposed_s for traffic in per_micro_batch)
    work = work_flops_per_token(spec, job.seq_len, parallelism.checkpointing)
    forward_share = forward_flops_per_token(spec, job.seq_len) / work
    weights_share = 2 * spec.trained_params_active / work  # the backward's weight gradients
    idle = bubble(parallelism.pp, parallelism.schedule, parallelism.virtual_stages, forward_share, weights_share)
    result.compute_s = micro_batches * compute_s
    result.optimizer_s = compute.optimizer_step_s(job.cluster.gpu, optimizer_params(job, parallelism, dp))
    result.bubble_s = idle * micro_batch_s
    result.traffic = [traffic.over_step(micro_batches) for traffic in per_micro_batch]
    result.traffic += data_parallel_traffic(job, parallelism, dp, micro_batches, compute_s, forward_share)
    tied = tied_embedding_traffic(job, parallelism, dp)
    result.traffic += [tied] if tied is not None else []
    for traffic in result.traffic:
        if not (parallelism.schedule == "dualpipe" and traffic.name.startswith("ep")):  # counted in compute_s
            # what the compute hides still costs the SMs its kernels hold while they run
            traffic.exposed_s += (traffic.seconds - traffic.exposed_s) * job.cluster.gpu.communication_share
    # the bubble is idle micro-batch times, their exposed communication included; the rest is each
    # collective's exposed time over the step: the breakdown adds up to the step
    result.step_s = result.compute_s + result.optimizer_s + result.bubble_s + result.exposed_comm_s
    return result
