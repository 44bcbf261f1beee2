"""The bytes each parallel dimension's collectives move, on which link, and what of their time the compute hides.

Ranks are ordered tp fastest, then cp, then dp, then pp (Megatron's order): a tp group is 8 neighbours on one
node, a cp group strides over tp, a dp group over tp x cp, and pipeline stages sit on different nodes.
Expert parallelism borrows consecutive data-parallel (and tp / cp) ranks, as in Megatron and this trainer.

What overlaps with compute, and what does not:
  tp   its all-gathers / reduce-scatters sit between the matmuls that need them: in the critical path, unless
       the software cuts them in chunks that run beside the GEMMs (Software.tp_comm_overlap).
  cp   the all-gather of K and V before each attention (Llama 3's scheme), its reduce-scatter in the backward:
       in the critical path.
  ep   the token dispatch and combine overlap only with what one micro-batch has in flight that does not
       depend on them, the shared experts; the rest is exposed. DualPipe (DeepSeek-V3) runs one micro-batch's
       forward beside another's backward, so each one's all-to-alls hide behind the other's compute, at the
       price of the GPU share its communication kernels hold while they run (GPU.communication_share).
  pp   the bubble is never hidden: (pp - 1) micro-batch times for 1F1B, (pp - 1) / v interleaved, and
       DualPipe's (pp/2 - 1)(F&B + B - 3W) (a forward, a full backward, a weight-gradient backward). 1F1B's
       point-to-point sends are in the critical path; interleaved and DualPipe overlap them but for the
       fill and drain, where the software posts them ahead (Software.p2p_overlap).
  dp   gradient reductions overlap with the last micro-batch's backward, ZeRO-1/2's parameter all-gather with
       the first micro-batch's forward, FSDP / ZeRO-3's per-micro-batch all-gathers (prefetched a layer ahead)
       with all of the step's compute; the first gather and last reduction of one layer never overlap.

tp, cp, ep and pp cost the same in every micro-batch (`MicroBatchTraffic`); dp's collectives are placed in
the step's phases (`data_parallel_traffic`).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

from . import collectives, compute
from .job import Job, Parallelism
from .memory import expert_replicas, stage_params
from .spec import ModelSpec

ZERO3_REUSE_DISTANCE = 1e9  # DeepSpeed's stage3_max_reuse_distance, in parameters
ZERO3_PREFETCH_PARAMS = 5e7  # DeepSpeed's stage3_prefetch_bucket_size: what it gathers ahead of the compute
# (size, ranks, bandwidth, latency) -> (seconds, bytes sent): the functions of collectives.py
Collective = Callable[[float, int, float, float], tuple[float, float]]


@dataclass
class Traffic:
    """One kind of collective over a step: what this GPU sends, on which link, and what it costs."""

    name: str
    link: str  # "nvlink" or "fabric"
    bytes_per_step: float
    seconds: float
    exposed_s: float


@dataclass(frozen=True)
class MicroBatchTraffic:
    """One kind of collective in one micro-batch on one stage: its seconds, the bytes this GPU sends, and the
    seconds the compute does not hide, which lengthen every micro-batch time of the step, the bubble's too."""

    name: str
    link: str  # "nvlink" or "fabric"
    seconds: float
    sent: float
    exposed_s: float
    step_exposed_s: float | None = None  # when the step exposes it otherwise (pipeline sends: fill and drain)

    def over_step(self, micro_batches: int) -> Traffic:
        """The step's: `micro_batches` of it (what the bubble's idle micro-batch times expose is the bubble's)."""
        exposed = self.exposed_s * micro_batches if self.step_exposed_s is None else self.step_exposed_s
        return Traffic(self.name, self.link, self.sent * micro_batches, self.seconds * micro_batches, exposed)


def tensor_parallel_collectives(spec: ModelSpec, parallelism: Parallelism) -> float:
    """All-reduce equivalents per micro-batch on one stage. Attention and a dense or shared FFN: an all-gather
    in and a reduce-scatter out, each way (2); routed experts, which this trainer runs whole on every tp rank,
    gather their input in the forward and their output's gradient in the backward (1); the embedding
    (reduce-scatter out) and the logits (all-gather in) on the first and last stage (1 each). A full
    recompute repeats the forward's half."""
    stage_layers = math.ceil(spec.layers / parallelism.pp)
    moe_stage_layers = math.ceil(spec.moe_layers / parallelism.pp)
    dense_layers = stage_layers - moe_stage_layers
    ffn = 2 * dense_layers + (2 * moe_stage_layers if spec.shared_ffn else 0) + 1 * moe_stage_layers
    per_layer = 2 * stage_layers + ffn
    ends = 2 if parallelism.pp == 1 else 1
    return (1.5 if parallelism.checkpointing == "full" else 1.0) * per_layer + ends


def tensor_parallel_traffic(job: Job, parallelism: Parallelism) -> MicroBatchTraffic | None:
    """The residual stream gathered into and scattered out of each split block (tensor_parallel_collectives)."""
    if parallelism.tp <= 1:
        return None
    kind, bandwidth, latency = job.cluster.link(parallelism.tp, 1)
    tokens = parallelism.micro_batch * job.seq_len
    # in all-reduce equivalents (an all-gather before and a reduce-scatter after each split block, each way)
    stream = tokens / parallelism.cp * job.spec.hidden * job.model_bytes
    seconds, sent = collectives.all_reduce(stream, parallelism.tp, bandwidth, latency)
    count = tensor_parallel_collectives(job.spec, parallelism)
    exposed = seconds * count
    if job.software.tp_comm_overlap:
        # cut into tp chunks, each sent while the GEMM computes on the one before: the first chunk is exposed,
        # and what the split GEMMs' time cannot cover
        exposed = exposed / parallelism.tp + max(0.0, exposed - compute.tensor_parallel_gemm_s(job, parallelism))
    return MicroBatchTraffic("tp all-gather/reduce-scatter", kind, seconds * count, sent * count, exposed)


def context_parallel_traffic(job: Job, parallelism: Parallelism) -> MicroBatchTraffic | None:
    """Each layer gathers K and V in the forward and again in a recomputed forward; the backward's
    reduce-scatter of their gradients moves as much."""
    if parallelism.cp <= 1:
        return None
    spec = job.spec
    kind, bandwidth, latency = job.cluster.link(parallelism.cp, parallelism.tp)
    tokens = parallelism.micro_batch * job.seq_len
    if spec.kv_lora_rank:  # MLA gathers its compressed latent and the shared rope key
        kv_per_token = spec.kv_lora_rank + spec.qk_rope_dim
    else:
        kv_per_token = 2 * max(spec.kv_heads // parallelism.tp, 1) * spec.head_dim
    seconds, sent = collectives.all_gather(tokens * kv_per_token * job.model_bytes, parallelism.cp, bandwidth, latency)
    count = (3 if parallelism.checkpointing != "none" else 2) * math.ceil(spec.layers / parallelism.pp)
    return MicroBatchTraffic("cp all-gather K/V", kind, seconds * count, sent * count, seconds * count)


def expert_parallel_traffic(job: Job, parallelism: Parallelism, compute_s: float) -> MicroBatchTraffic | None:
    """Dispatch and combine, forward and backward (and the recomputed forward's), of each MoE layer; `compute_s`
    is a micro-batch's compute, which DualPipe hides them behind."""
    if parallelism.ep <= 1:
        return None
    spec, cluster = job.spec, job.cluster
    kind, bandwidth, latency = cluster.link(parallelism.ep, 1)
    local_tokens = parallelism.micro_batch * job.seq_len / (parallelism.cp * parallelism.tp)
    destinations = spec.top_k
    remote_share = (parallelism.ep - 1) / parallelism.ep
    if kind == "fabric":  # what stays on a node goes over NVLink: only the other nodes' share crosses the NICs
        nodes = parallelism.ep // cluster.gpus_per_node
        if spec.routing_node_limit:  # one copy a node, forwarded over NVLink
            destinations = min(spec.top_k, spec.routing_node_limit, nodes)
        remote_share = (nodes - 1) / nodes
    seconds, sent = collectives.all_to_all(
        local_tokens * destinations * spec.hidden * job.model_bytes * remote_share, parallelism.ep, bandwidth, latency
    )
    count = (6 if parallelism.checkpointing == "full" else 4) * math.ceil(spec.moe_layers / parallelism.pp)
    if parallelism.schedule == "dualpipe":  # behind the compute of the micro-batch running beside it
        exposed = max(0.0, seconds * count - compute_s)
    else:  # behind the shared experts' half of a pass
        units = 2 if spec.gated_ffn else 1
        shared_gemms = (
            compute.Gemm(local_tokens, units * spec.shared_ffn, spec.hidden),
            compute.Gemm(local_tokens, spec.hidden, spec.shared_ffn),
        )
        # a pass's shared-expert GEMMs (forward or backward: half of the three passes' time)
        shared = sum(gemm.trained_s(cluster.gpu, 1.5) for gemm in shared_gemms) if spec.shared_ffn else 0.0
        exposed = max(0.0, seconds - shared) * count
    return MicroBatchTraffic("ep all-to-all", kind, seconds * count, sent * count, exposed)


def first_rank_sends(parallelism: Parallelism) -> int:
    """Sends per micro-batch of the first pipeline rank, whose figures the planner gives: each stage it holds
    sends its activations on and its input's gradient back, but the first stage has no gradient to send and
    the last no activation (a V holds both)."""
    if parallelism.schedule == "dualpipe":
        return 2
    return 2 * parallelism.virtual_stages - 1


def pipeline_traffic(job: Job, parallelism: Parallelism, dp: int, micro_batches: int) -> MicroBatchTraffic | None:
    """Activations forward and their gradients back, once per model chunk a rank holds: the time is a middle
    rank's (two sends a chunk), the bytes the first rank's."""
    if parallelism.pp <= 1:
        return None
    kind, bandwidth, latency = job.cluster.link(parallelism.pp, parallelism.tp * parallelism.cp * dp)
    activation = parallelism.micro_batch * job.seq_len / (parallelism.cp * parallelism.tp) * job.spec.hidden
    seconds, sent = collectives.send(activation * job.model_bytes, bandwidth, latency)
    count = 2 * parallelism.virtual_stages
    sent *= first_rank_sends(parallelism)
    if parallelism.schedule == "1f1b" or not job.software.p2p_overlap:
        return MicroBatchTraffic("pp send/recv", kind, seconds * count, sent, seconds * count)
    # overlapped but in the fill and drain, which expose (pp - 1) chunks' sends; worked out from the step's
    # total as the planner always has: another order of the same arithmetic moves figures in their last bit
    sends_per_step_s = seconds * count * micro_batches
    fill_and_drain = sends_per_step_s / micro_batches / parallelism.virtual_stages * (parallelism.pp - 1)
    return MicroBatchTraffic("pp send/recv", kind, seconds * count, sent, 0.0, fill_and_drain)


def tied_embedding_traffic(job: Job, parallelism: Parallelism, dp: int) -> Traffic | None:
    """With a tied embedding split into stages, the first and the last stage each hold it and sum its gradient
    once a step (an all-reduce of two, after the backward: exposed). A V holds both stages on one rank."""
    if parallelism.pp <= 1 or not job.spec.tied_embeddings or parallelism.schedule == "dualpipe":
        return None
    strategy = parallelism.data_parallel
    sharded_over = {"fsdp": dp * parallelism.cp, "hsdp": parallelism.shard_size, "zero3": dp * parallelism.cp}
    grad_bytes = 4 if strategy in ("ddp", "fsdp", "hsdp") else job.model_bytes
    size = grad_bytes * job.spec.vocab * job.spec.hidden / parallelism.tp / sharded_over.get(strategy, 1)
    kind, bandwidth, latency = job.cluster.link(parallelism.pp, parallelism.tp * parallelism.cp * dp)
    seconds, sent = collectives.all_reduce(size, 2, bandwidth, latency)
    return Traffic("pp tied-embedding all-reduce", kind, sent, seconds, seconds)


def data_parallel_traffic(
    job: Job, parallelism: Parallelism, dp: int, micro_batches: int, compute_s: float, forward_share: float
) -> list[Traffic]:
    """The dense and the expert parameters' gathers and gradient reductions over a step, as the data-parallel
    kind issues them, each hidden behind the compute of the phase it runs in (`compute_s` a micro-batch's,
    `forward_share` the forward's part of it)."""
    spec, strategy = job.spec, parallelism.data_parallel
    stage_layers = math.ceil(spec.layers / parallelism.pp)
    dense, experts = stage_params(spec, parallelism)
    grad_bytes = 4 if strategy in ("ddp", "fsdp", "hsdp") else job.model_bytes
    forward_window, backward_window = compute_s * forward_share, compute_s * (1 - forward_share)
    software = job.software

    def window(overlaps: bool, phase: str) -> tuple[float, int]:
        """(compute to hide behind, pieces issued) for a collective its software overlaps or, not, issues
        after the phase (a single exposed piece)."""
        if not overlaps:
            return 0.0, 1
        return (forward_window if phase == "f" else backward_window), stage_layers

    traffic = []
    compute_windows = {}  # per link: the compute left to hide sharded gathers and reductions behind
    groups = [("dense", dense, dp * parallelism.cp, parallelism.tp)]
    if experts:
        expert_stride = parallelism.ep if parallelism.ep > 1 else parallelism.tp
        groups.append(("experts", experts, expert_replicas(parallelism, dp), expert_stride))
    for what, params, ranks, stride in groups:
        if ranks <= 1 or not params:
            continue
        shard_ranks = parallelism.shard_size if strategy == "hsdp" else ranks
        kind, bandwidth, latency = job.cluster.link(shard_ranks, stride)
        # issued a layer at a time (FSDP's unit), or a module at a time (DeepSpeed ZeRO-3 fetches each
        # submodule's parameters): each piece pays its own latency
        pieces = stage_layers * (spec.matrices_per_layer if strategy == "zero3" else 1)
        gather = per_layer(collectives.all_gather, job.model_bytes * params, shard_ranks, bandwidth, latency, pieces)
        if strategy in ("ddp", "zero1", "zero2"):
            # DeepSpeed all-reduces the gradients at ZeRO-1/2 too (each rank then keeps its partition) and
            # all-gathers the updated parameters after its optimizer step, as measured on this trainer
            reduce = per_layer(collectives.all_reduce, grad_bytes * params, ranks, bandwidth, latency, stage_layers)
            traffic.append(
                overlapped(f"dp all-reduce ({what})", kind, *reduce, *window(software.gradient_overlap, "b"))
            )
            if strategy != "ddp":
                hidden = window(software.param_gather_overlap, "f")
                traffic.append(overlapped(f"dp all-gather ({what})", kind, *gather, *hidden))
            continue
        # fsdp / hsdp / zero3: gathers for each micro-batch's forward and backward
        reduce = per_layer(collectives.reduce_scatter, grad_bytes * params, shard_ranks, bandwidth, latency, pieces)
        windows = compute_windows.setdefault(
            kind, {"forward": forward_window, "backward": backward_window, "last backward": backward_window}
        )
        traffic += sharded_traffic(parallelism, what, kind, micro_batches, gather, reduce, windows, pieces, params)
        if strategy == "hsdp" and ranks > shard_ranks:
            replicas = ranks // shard_ranks
            kind, bandwidth, latency = job.cluster.link(replicas, stride * shard_ranks)
            seconds, sent = collectives.all_reduce(grad_bytes * params / shard_ranks, replicas, bandwidth, latency)
            traffic.append(overlapped(f"dp all-reduce across replicas ({what})", kind, seconds, sent, 0.0, 1))
    return traffic


def sharded_traffic(
    parallelism: Parallelism,
    what: str,
    kind: str,
    micro_batches: int,
    gather: tuple[float, float],
    reduce: tuple[float, float],
    windows: dict[str, float],
    pieces: int,
    params: float,
) -> list[Traffic]:
    """FSDP / ZeRO-3, phase by phase: each micro-batch's forward hides its gathers behind the forward's compute
    only, and its backward hides the backward's re-gathers and the gradient reduce-scatter behind the
    backward's compute (ZeRO-3 reduces in every micro-batch's backward, FSDP in the last one's only, so the
    last backward is a window of its own). Collectives on one link share its windows (`windows`, seconds per
    micro-batch, consumed here): what a phase's compute cannot cover is exposed, plus one piece of each
    collective, which has nothing to hide behind. `gather` and `reduce` are (seconds, bytes sent) of the
    `params` issued in `pieces`."""
    (gather_s, gather_sent), (reduce_s, reduce_sent) = gather, reduce
    zero3 = parallelism.data_parallel == "zero3"
    # DeepSpeed ZeRO-3 keeps what it gathered for the forward until the backward when the stage's
    # parameters are within its reuse distance (stage3_max_reuse_distance, 1e9): one gather, not two
    regathers = not (zero3 and params <= ZERO3_REUSE_DISTANCE)
    reduces_every_micro_batch = zero3
    # and it gathers ahead of the compute only its prefetch bucket: the rest of a larger piece on demand
    prefetched = min(1.0, ZERO3_PREFETCH_PARAMS / (params / pieces)) if zero3 else 1.0

    def behind(seconds: float, phase: str) -> float:
        exposed = max(0.0, seconds - windows[phase])
        windows[phase] = max(0.0, windows[phase] - seconds)
        return exposed

    def gathered_behind(seconds: float, phase: str) -> float:
        return seconds * (1 - prefetched) + behind(seconds * prefetched, phase)

    def in_every_backward(seconds: float, hide: Callable[[float, str], float] = behind) -> float:
        return (micro_batches - 1) * hide(seconds, "backward") + hide(seconds, "last backward")

    if parallelism.pp > 1 and parallelism.data_parallel in ("fsdp", "hsdp"):
        # Pipelined, the trainer (as torchtitan) keeps a stage's parameters gathered from the first micro-batch's
        # forward to the last one's backward (parallel.reshard_after_forward defaults to false under pp), and
        # torch's schedules reshard them after the last: one gather a step (measured).
        forward_gathers, backward_gathers = 1, 0
        gather_exposed = behind(gather_s, "forward")
    else:
        forward_gathers = micro_batches
        forward_exposed = micro_batches * gathered_behind(gather_s, "forward")
        # the backward's re-gathers are prefetched ahead of the compute that needs them: they take the window first
        if regathers:
            backward_gathers, backward_exposed = micro_batches, in_every_backward(gather_s, gathered_behind)
        else:
            backward_gathers, backward_exposed = 0, 0.0
        gather_exposed = forward_exposed + backward_exposed
    reduce_exposed = in_every_backward(reduce_s) if reduces_every_micro_batch else behind(reduce_s, "last backward")
    gathers = forward_gathers + backward_gathers
    reduces = micro_batches if reduces_every_micro_batch else 1
    return [
        Traffic(
            f"dp all-gather ({what})",
            kind,
            gathers * gather_sent,
            gathers * gather_s,
            min(gathers * gather_s, gather_exposed + gather_s / pieces),
        ),
        Traffic(
            f"dp reduce-scatter ({what})",
            kind,
            reduces * reduce_sent,
            reduces * reduce_s,
            min(reduces * reduce_s, reduce_exposed + reduce_s / pieces),
        ),
    ]


def per_layer(
    collective: Collective, size: float, ranks: int, bandwidth: float, latency: float, layers: int
) -> tuple[float, float]:
    seconds, sent = collective(size / layers, ranks, bandwidth, latency)
    return seconds * layers, sent * layers


def overlapped(name: str, kind: str, seconds: float, sent: float, window: float, pieces: int) -> Traffic:
    """A collective issued in `pieces` (per layer) behind `window` seconds of compute: what does not fit in the
    window is exposed, and so is the one piece that has nothing to hide behind."""
    exposed = max(0.0, seconds - window) + seconds / max(pieces, 1)
    return Traffic(name, kind, sent, seconds, min(seconds, exposed))
