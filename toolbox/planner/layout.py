"""One layout of one job: memory per GPU, the bytes every collective moves, and the step time they add up to.

Ranks are ordered tp fastest, then cp, then dp, then pp (Megatron's order): a tp group is 8 neighbours on one
node, a cp group strides over tp, a dp group over tp x cp, and pipeline stages sit on different nodes.
Expert parallelism borrows consecutive data-parallel (and tp / cp) ranks, as in Megatron and this trainer.

What overlaps with compute, and what does not:
  tp   its all-gathers / reduce-scatters sit between the matmuls that need them: in the critical path.
  cp   the all-gather of K and V before each attention (Llama 3's scheme), its reduce-scatter in the backward:
       in the critical path.
  ep   the token dispatch and combine overlap only with what one micro-batch has in flight that does not
       depend on them, the shared experts; the rest is exposed. DualPipe (DeepSeek-V3) runs one micro-batch's
       forward beside another's backward, so each one's all-to-alls hide behind the other's compute, at the
       price of the GPU share its communication kernels hold while they run (COMMUNICATION_SM_SHARE).
  pp   the bubble is never hidden: (pp - 1) micro-batch times for 1F1B, (pp - 1) / v interleaved, and
       DualPipe's (pp/2 - 1)(F&B + B - 3W) (a forward, a full backward, a weight-gradient backward). 1F1B's
       point-to-point sends are in the critical path; interleaved and DualPipe overlap them but for the
       fill and drain.
  dp   gradient reductions overlap with the last micro-batch's backward, ZeRO-1/2's parameter all-gather with
       the first micro-batch's forward, FSDP / ZeRO-3's per-micro-batch all-gathers (prefetched a layer ahead)
       with all of the step's compute; the first gather and last reduction of one layer never overlap.
"""

import math
from dataclasses import dataclass, field

from . import collectives
from .job import InvalidLayout, Job, Layout
from .memory import expert_replicas, memory, stage_params
from .pipeline import COMMUNICATION_SM_SHARE, bubble, slowest_stage
from .spec import ModelSpec

ZERO3_REUSE_DISTANCE = 1e9  # DeepSpeed's stage3_max_reuse_distance, in parameters


@dataclass
class Traffic:
    """One kind of collective over a step: what this GPU sends, on which link, and what it costs."""

    name: str
    link: str  # "nvlink" or "fabric"
    bytes_per_step: float
    seconds: float
    exposed_s: float


@dataclass
class Estimate:
    job: Job
    layout: Layout
    dp: int
    micro_batches: int  # per data-parallel rank and step
    memory_gib: dict
    traffic: list = field(default_factory=list)
    compute_s: float = 0.0  # the step's compute on one GPU, recomputation included
    bubble_s: float = 0.0
    step_s: float = 0.0

    @property
    def batch_tokens(self) -> int:
        return self.dp * self.micro_batches * self.layout.micro_batch * self.job.seq_len

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


def check(job: Job, layout: Layout) -> int:
    """The data-parallel degree, or InvalidLayout naming what does not divide."""
    s, L = job.spec, layout
    model_parallel = L.tp * L.pp * L.cp
    if job.gpus % model_parallel:
        raise InvalidLayout(f"tp {L.tp} x pp {L.pp} x cp {L.cp} = {model_parallel} does not divide {job.gpus} GPUs")
    dp = job.gpus // model_parallel
    if L.tp > job.cluster.gpus_per_node:
        raise InvalidLayout(f"tp {L.tp} spans more than a node of {job.cluster.gpus_per_node} GPUs")
    if s.heads % L.tp or (s.kv_heads % L.tp and L.tp % s.kv_heads):
        raise InvalidLayout(f"tp {L.tp} does not divide the {s.heads} heads / {s.kv_heads} KV heads")
    if L.pp * L.virtual_stages > s.layers:
        raise InvalidLayout(f"pp {L.pp} x {L.virtual_stages} virtual stages is more than {s.layers} layers")
    if L.ep > 1 and (not s.is_moe or s.experts % L.ep or (dp * L.cp * L.tp) % L.ep):
        raise InvalidLayout(
            f"ep {L.ep} must divide the {s.experts} experts and the {dp * L.cp * L.tp} "
            f"data x context x tensor parallel ranks it borrows"
        )
    if job.seq_len % (2 * L.cp) and L.cp > 1:
        raise InvalidLayout(f"cp {L.cp}: sequence {job.seq_len} must split into 2 x cp chunks")
    if L.data_parallel == "hsdp" and (dp % L.shard_size or L.shard_size == 1):
        raise InvalidLayout(f"hsdp: shard size {L.shard_size} must divide the {dp} data-parallel ranks")
    sequences = job.global_batch_tokens // job.seq_len
    if sequences < dp * L.micro_batch:
        raise InvalidLayout(
            f"{dp} data-parallel ranks x micro-batch {L.micro_batch} need at least "
            f"{dp * L.micro_batch * job.seq_len:,} tokens a step (asked {job.global_batch_tokens:,})"
        )
    if L.schedule == "interleaved" and sequences // (dp * L.micro_batch) < L.pp:
        raise InvalidLayout("interleaved: needs at least pp micro-batches a step")
    if L.schedule == "dualpipe" and (L.pp % 2 or L.virtual_stages != 1 or sequences // (dp * L.micro_batch) < 2 * L.pp):
        raise InvalidLayout("dualpipe: needs an even pp, no virtual stages and at least 2 x pp micro-batches a step")
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


def tensor_parallel_collectives(
    s: ModelSpec, L: Layout, stage_layers: int, moe_stage_layers: int, recomputes: bool
) -> float:
    """All-reduce equivalents per micro-batch on one stage. Attention and a dense or shared FFN: an all-gather
    in and a reduce-scatter out, each way (2); routed experts, which this trainer runs whole on every tp rank,
    gather their input in the forward and their output's gradient in the backward (1); the embedding
    (reduce-scatter out) and the logits (all-gather in) on the first and last stage (1 each). A full
    recompute repeats the forward's half."""
    dense_layers = stage_layers - moe_stage_layers
    ffn = 2 * dense_layers + (2 * moe_stage_layers if s.shared_ffn else 0) + 1 * moe_stage_layers
    per_layer = 2 * stage_layers + ffn
    ends = 2 if L.pp == 1 else 1
    return (1.5 if recomputes else 1.0) * per_layer + ends


def estimate(job: Job, layout: Layout) -> Estimate:
    L, s, cluster = layout, job.spec, job.cluster
    dp = check(job, L)
    m = job.global_batch_tokens // job.seq_len // (dp * L.micro_batch)
    result = Estimate(job, L, dp, m, memory(job, L, dp))
    gpu = cluster.gpu
    stage_layers = math.ceil(s.layers / L.pp)
    moe_stage_layers = math.ceil(s.moe_layers / L.pp)
    tokens = L.micro_batch * job.seq_len  # one micro-batch, whole sequences
    work = work_flops_per_token(s, job.seq_len, L.checkpointing)
    t_compute = tokens * work / (L.tp * L.cp * L.pp) / (gpu.peak_flops * gpu.matmul_efficiency)
    forward_share = forward_flops_per_token(s, job.seq_len) / work
    dualpipe = L.schedule == "dualpipe"
    if dualpipe and L.ep > 1:  # the all-to-all kernels run beside the compute, on SMs of their own
        t_compute /= 1 - COMMUNICATION_SM_SHARE
    t_compute *= slowest_stage(s, L.pp, L.schedule, job.seq_len)  # a pipeline runs at the pace of its busiest rank
    recomputes = L.checkpointing == "full"
    act = job.model_bytes  # activations travel in the compute dtype
    per_mb = []  # (name, link, seconds, bytes sent, exposed seconds) per micro-batch on one stage

    def link(ranks: int, stride: int) -> tuple[str, float, float]:
        bandwidth, latency = cluster.link(ranks, stride)
        return ("nvlink" if cluster.in_node(ranks, stride) else "fabric"), bandwidth, latency

    if L.tp > 1:
        kind, bw, lat = link(L.tp, 1)
        # in all-reduce equivalents (an all-gather before and a reduce-scatter after each split block, each way)
        seconds, sent = collectives.all_reduce(tokens / L.cp * s.hidden * act, L.tp, bw, lat)
        count = tensor_parallel_collectives(s, L, stage_layers, moe_stage_layers, recomputes)
        per_mb.append(("tp all-gather/reduce-scatter", kind, seconds * count, sent * count, seconds * count))
    if L.cp > 1:
        kind, bw, lat = link(L.cp, L.tp)
        kv = (s.kv_lora_rank + s.qk_rope_dim) if s.kv_lora_rank else 2 * max(s.kv_heads // L.tp, 1) * s.head_dim
        seconds, sent = collectives.all_gather(tokens * kv * act, L.cp, bw, lat)
        count = (3 if L.checkpointing != "none" else 2) * stage_layers
        per_mb.append(("cp all-gather K/V", kind, seconds * count, sent * count, seconds * count))
    if L.ep > 1:
        kind, bw, lat = link(L.ep, 1)
        local_tokens = tokens / (L.cp * L.tp)
        destinations = s.top_k
        remote_share = (L.ep - 1) / L.ep
        if kind == "fabric":
            nodes = L.ep // cluster.gpus_per_node
            if s.routing_node_limit:  # one copy a node, forwarded over NVLink
                destinations = min(s.top_k, s.routing_node_limit, nodes)
            remote_share = (nodes - 1) / nodes
        seconds, sent = collectives.all_to_all(
            local_tokens * destinations * s.hidden * act * remote_share, L.ep, bw, lat
        )
        count = (6 if recomputes else 4) * moe_stage_layers
        if dualpipe:  # behind the compute of the micro-batch running beside it
            exposed = max(0.0, seconds * count - t_compute)
        else:  # behind the shared experts' half of a pass
            shared = local_tokens * 6 * s.ffn_params(s.shared_ffn) / (gpu.peak_flops * gpu.matmul_efficiency) / 2
            exposed = max(0.0, seconds - shared) * count
        per_mb.append(("ep all-to-all", kind, seconds * count, sent * count, exposed))
    if L.pp > 1:
        kind, bw, lat = link(L.pp, L.tp * L.cp * dp)
        seconds, sent = collectives.send(tokens / (L.cp * L.tp) * s.hidden * act, bw, lat)
        count = 2 * L.virtual_stages
        in_path = seconds * count if L.schedule == "1f1b" else 0.0
        per_mb.append(("pp send/recv", kind, seconds * count, sent * count, in_path))

    t_micro_batch = t_compute + sum(exposed for *_, exposed in per_mb)
    weights_share = 2 * s.trained_params_active / work  # the backward's weight gradients
    idle = bubble(L.pp, L.schedule, L.virtual_stages, forward_share, weights_share)
    result.compute_s = m * t_compute
    result.bubble_s = idle * t_micro_batch
    for name, kind, seconds, sent, exposed in per_mb:
        result.traffic.append(Traffic(name, kind, sent * m, seconds * m, exposed * (m + idle)))
    if L.pp > 1 and L.schedule != "1f1b":  # its sends are exposed only in the fill and drain
        pipeline_sends = result.traffic[-1]  # appended last above
        pipeline_sends.exposed_s = pipeline_sends.seconds / m / L.virtual_stages * (L.pp - 1)
    result.traffic += data_parallel_traffic(job, L, dp, m, t_compute, forward_share, link)
    result.step_s = (m + idle) * t_micro_batch + sum(t.exposed_s for t in result.traffic if t.name.startswith("dp"))
    return result


def data_parallel_traffic(job: Job, L: Layout, dp: int, m: int, t_compute: float, forward_share: float, link) -> list:
    s = job.spec
    stage_layers = math.ceil(s.layers / L.pp)
    dense, experts = stage_params(s, L)
    grad_bytes = 4 if L.data_parallel in ("ddp", "fsdp", "hsdp") else job.model_bytes
    forward_window, backward_window = t_compute * forward_share, t_compute * (1 - forward_share)
    stage_params_count = dense + experts
    traffic = []
    compute_windows = {}  # per link: the compute left to hide sharded gathers and reductions behind
    groups = [("dense", dense, dp * L.cp, L.tp)]
    if experts:
        groups.append(("experts", experts, expert_replicas(L, dp), L.ep if L.ep > 1 else L.tp))
    for what, params, ranks, stride in groups:
        if ranks <= 1 or not params:
            continue
        shard_ranks = L.shard_size if L.data_parallel == "hsdp" else ranks
        kind, bw, lat = link(shard_ranks, stride)
        # issued a layer at a time: each layer's collective pays its own latency
        gather_s, gather_sent = per_layer(
            collectives.all_gather, job.model_bytes * params, shard_ranks, bw, lat, stage_layers
        )
        reduce_s, reduce_sent = per_layer(
            collectives.reduce_scatter, grad_bytes * params, shard_ranks, bw, lat, stage_layers
        )
        if L.data_parallel == "ddp":
            reduce_s, reduce_sent = per_layer(collectives.all_reduce, 4 * params, ranks, bw, lat, stage_layers)
            traffic.append(
                overlapped(f"dp all-reduce ({what})", kind, reduce_s, reduce_sent, backward_window, stage_layers)
            )
        elif L.data_parallel in ("zero1", "zero2"):
            # DeepSpeed all-reduces the gradients at these stages (each rank then keeps its partition) and
            # all-gathers the updated parameters after its optimizer step, as measured on this trainer
            reduce_s, reduce_sent = per_layer(collectives.all_reduce, grad_bytes * params, ranks, bw, lat, stage_layers)
            traffic.append(
                overlapped(f"dp all-reduce ({what})", kind, reduce_s, reduce_sent, backward_window, stage_layers)
            )
            traffic.append(
                overlapped(f"dp all-gather ({what})", kind, gather_s, gather_sent, forward_window, stage_layers)
            )
        else:  # fsdp / hsdp / zero3: gathers for each micro-batch's forward and backward
            windows = compute_windows.setdefault(
                kind, {"forward": forward_window, "backward": backward_window, "last backward": backward_window}
            )
            traffic += sharded_traffic(
                L,
                what,
                kind,
                m,
                (gather_s, gather_sent),
                (reduce_s, reduce_sent),
                windows,
                stage_layers,
                stage_params_count,
            )
            if L.data_parallel == "hsdp" and ranks > shard_ranks:
                kind, bw, lat = link(ranks // shard_ranks, stride * shard_ranks)
                seconds, sent = collectives.all_reduce(grad_bytes * params / shard_ranks, ranks // shard_ranks, bw, lat)
                traffic.append(overlapped(f"dp all-reduce across replicas ({what})", kind, seconds, sent, 0.0, 1))
    return traffic


def sharded_traffic(
    L: Layout, what: str, kind: str, m: int, gather, reduce, windows: dict, layers: int, stage_params_count: float
) -> list:
    """FSDP / ZeRO-3, phase by phase: each micro-batch's forward hides its gathers behind the forward's compute
    only, and its backward hides the backward's re-gathers and the gradient reduce-scatter behind the
    backward's compute (ZeRO-3 reduces in every micro-batch's backward, FSDP in the last one's only, so the
    last backward is a window of its own). Collectives on one link share its windows (`windows`, seconds per
    micro-batch, consumed here): what a phase's compute cannot cover is exposed, plus one layer of each
    collective, which has nothing to hide behind."""
    (gather_s, gather_sent), (reduce_s, reduce_sent) = gather, reduce
    # DeepSpeed ZeRO-3 keeps what it gathered for the forward until the backward when the stage's
    # parameters are within its reuse distance (stage3_max_reuse_distance, 1e9): one gather, not two
    regathers = not (L.data_parallel == "zero3" and stage_params_count <= ZERO3_REUSE_DISTANCE)
    reduces_every_micro_batch = L.data_parallel == "zero3"

    def behind(seconds: float, phase: str) -> float:
        exposed = max(0.0, seconds - windows[phase])
        windows[phase] = max(0.0, windows[phase] - seconds)
        return exposed

    def in_every_backward(seconds: float) -> float:
        return (m - 1) * behind(seconds, "backward") + behind(seconds, "last backward")

    forward_exposed = m * behind(gather_s, "forward")
    # the backward's re-gathers are prefetched ahead of the compute that needs them: they take the window first
    gather_exposed = forward_exposed + (in_every_backward(gather_s) if regathers else 0.0)
    reduce_exposed = in_every_backward(reduce_s) if reduces_every_micro_batch else behind(reduce_s, "last backward")
    gathers, reduces = (2 if regathers else 1) * m, m if reduces_every_micro_batch else 1
    return [
        Traffic(
            f"dp all-gather ({what})",
            kind,
            gathers * gather_sent,
            gathers * gather_s,
            min(gathers * gather_s, gather_exposed + gather_s / layers),
        ),
        Traffic(
            f"dp reduce-scatter ({what})",
            kind,
            reduces * reduce_sent,
            reduces * reduce_s,
            min(reduces * reduce_s, reduce_exposed + reduce_s / layers),
        ),
    ]


def per_layer(collective, size: float, ranks: int, bandwidth: float, latency: float, layers: int):
    seconds, sent = collective(size / layers, ranks, bandwidth, latency)
    return seconds * layers, sent * layers


def overlapped(name: str, kind: str, seconds: float, sent: float, window: float, pieces: int) -> Traffic:
    """A collective issued in `pieces` (per layer) behind `window` seconds of compute: what does not fit in the
    window is exposed, and so is the one piece that has nothing to hide behind."""
    exposed = max(0.0, seconds - window) + seconds / max(pieces, 1)
    return Traffic(name, kind, sent, seconds, min(seconds, exposed))
