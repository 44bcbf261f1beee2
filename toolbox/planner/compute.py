"""What one GPU's compute of a micro-batch costs, by the shape of the work: each GEMM by its dimensions, the
attention cores by their kernel, and the elementwise work (norms, activations, residuals, the softmax of unfused
attention, the loss, MoE token shuffles) as memory traffic at the GPU's bandwidth; and the optimizer step.

A GEMM of m x k by k x n takes its FLOPs, padded to whole 128-wide tiles, at the rate a GEMM of that size
sustains on the GPU (hardware.GPU.matmul_by_size), or its operands' bytes at HBM speed when that is longer
(skinny GEMMs). The backward's two GEMMs (input and weight gradients) have the
forward's dimensions permuted and cost the same.

Sources for the kernels:
  attention  FlashAttention-2 (Dao 2023, fig. 5-6): forward + backward 50-73% of an A100's peak, about 35% of an
             H100's (Shah et al. 2024, "FlashAttention-3", fig. 5: 325-335 TFLOP/s); FlashAttention-3 / cuDNN on
             Hopper: forward up to 75% (740 TFLOP/s), backward 1.5-1.75x FlashAttention-2's: about 55% for both.
             Head dimension 64 runs about a fifth slower than 128 (both papers' sweeps).
  HBM        elementwise kernels reach 85-90% of the data sheet's bandwidth (STREAM-like copies in the same
             ml-engineering notes): HBM_EFFICIENCY.
"""

import math
from typing import NamedTuple

from .hardware import GPU
from .job import Job, Parallelism
from .spec import ModelSpec

HBM_EFFICIENCY = 0.87
# The one constant fitted to published runs, on the held-out table's calibration runs only (heldout.py): what a
# training step keeps of the kernels' benchmarked rates (clocks under sustained power, operands cold in cache,
# launch gaps between kernels). The least median |error| of those 12 runs on a 0.01 grid, the least mean |error| of
# the ties: 0.81 (5.5% median).
SUSTAINED = 0.81
TILE = 128  # cuBLAS / CUTLASS tile edge: a GEMM dimension is computed in whole tiles
ATTENTION_EFFICIENCY = {  # forward + backward of the attention core, share of the bf16 peak, head dimension 128
    ("flash2", "ampere"): 0.55,
    ("flash2", "hopper"): 0.35,
    ("flash2", "blackwell"): 0.35,
    ("flash3", "ampere"): 0.55,  # FlashAttention-3 is Hopper's: an A100 runs FlashAttention-2
    ("flash3", "hopper"): 0.55,
    ("flash3", "blackwell"): 0.55,
}
# bytes a score of unfused attention moves (fp16): the QK^T GEMM writes it (2), the fused scale-mask-softmax reads
# and writes it (4), dropout reads it and writes it and a mask (5); the backward's dropout (5) and softmax (6)
UNFUSED_SCORE_BYTES = 22
ADAM_BYTES_PER_PARAM = 30  # fp32 parameter, gradient and two moments read, three written, a bf16 copy written


def matmul_efficiency(gpu: GPU, flops: float) -> float:
    """Share of peak a GEMM of `flops` sustains: the GPU's sweep (hardware.GPU.matmul_by_size) interpolated in
    log FLOPs; below it a fixed time, beyond it the largest size's share."""
    sweep = gpu.matmul_by_size
    if flops <= sweep[0][0]:
        return sweep[0][1] * flops / sweep[0][0]
    for (low, low_share), (high, high_share) in zip(sweep, sweep[1:]):
        if flops <= high:
            position = math.log(flops / low) / math.log(high / low)
            return low_share + position * (high_share - low_share)
    return sweep[-1][1]


def gemm_s(gpu: GPU, m: float, n: float, k: float, batch: float = 1.0, dtype_bytes: int = 2) -> float:
    """One (batched) GEMM: m x k times k x n, `batch` times over."""
    if m <= 0 or n <= 0 or k <= 0:
        return 0.0
    padded = math.ceil(m / TILE) * TILE * math.ceil(n / TILE) * TILE
    flops = 2 * padded * k
    compute = batch * flops / (gpu.peak_flops * matmul_efficiency(gpu, flops * batch))  # one batched kernel
    memory = dtype_bytes * (m * k + k * n + m * n) * batch / (gpu.hbm_bytes_per_s * HBM_EFFICIENCY)
    return max(compute, memory)


class Gemm(NamedTuple):
    """A weight's GEMM on one rank: m tokens by k inputs by n outputs, `count` of them (a rank's experts), and
    whether tp splits it (its collectives run beside it under tp communication overlap)."""

    m: float
    n: float
    k: float
    count: float = 1.0
    tp_split: bool = True

    def trained_s(self, gpu: GPU, passes: float) -> float:
        """Over `passes` forward-equivalents: the forward, the backward's two GEMMs (input and weight gradients,
        the forward's dimensions permuted), and recomputed forwards."""
        return passes * self.count * gemm_s(gpu, self.m, self.n, self.k)


def attention_efficiency(kernel: str, gpu: GPU, head_dim: int) -> float:
    return ATTENTION_EFFICIENCY[(kernel, gpu.architecture)] * min(1.0, head_dim / 128) ** 0.3


def layer_gemms(spec: ModelSpec, parallelism: Parallelism, tokens: float, moe: bool) -> list[Gemm]:
    """A layer's weight GEMMs on one tp rank: the attention projections, then the FFN (dense, or a MoE layer's
    router, shared FFN and the rank's experts with the tokens routed to them)."""
    tp, hidden = parallelism.tp, spec.hidden
    projection_width = spec.attention_params / hidden  # q, k, v (or MLA's) and the output, as one k = hidden
    gemms = [Gemm(tokens, projection_width / tp, hidden)]
    units = 2 if spec.gated_ffn else 1
    if not moe:
        return gemms + [Gemm(tokens, units * spec.ffn / tp, hidden), Gemm(tokens, hidden, spec.ffn / tp)]
    gemms.append(Gemm(tokens, spec.experts, hidden, tp_split=False))
    if spec.shared_ffn:
        gemms += [Gemm(tokens, units * spec.shared_ffn / tp, hidden), Gemm(tokens, hidden, spec.shared_ffn / tp)]
    # each of the rank's experts sees what the ep ranks route to it of their tokens (a tp rank dispatches its
    # 1/tp share of the micro-batch's tokens); without ep a rank runs every expert on its own share
    local_experts = spec.experts / parallelism.ep
    expert_tokens = tokens / tp * parallelism.ep * spec.top_k / spec.experts
    return gemms + [
        Gemm(expert_tokens, units * spec.expert_ffn, hidden, local_experts, tp_split=False),
        Gemm(expert_tokens, hidden, spec.expert_ffn, local_experts, tp_split=False),
    ]


def elementwise_bytes_per_token(spec: ModelSpec, job: Job, parallelism: Parallelism, moe: bool) -> float:
    """HBM bytes of one layer's memory-bound work for one token on one tp rank, forward + backward (+ recompute):
    each norm reads and writes the stream (2 passes, backward 3), each residual add 3 (backward 2), the FFN's
    activation over its units (gated 3 + 5, GELU 2 + 3), MoE's permutation of top_k copies in and out (4 + 4);
    unfused attention's T x T scores. A full recompute repeats the forward's passes."""
    tp = parallelism.tp
    stream_split = tp if job.sequence_parallel else 1  # without sequence parallelism every tp rank does it all
    stream_forward, stream_backward = 2 * spec.norms_per_layer + 2 * 3, 3 * spec.norms_per_layer + 2 * 2
    forward = stream_forward * spec.hidden / stream_split
    backward = stream_backward * spec.hidden / stream_split
    activation_forward, activation_backward = (3, 5) if spec.gated_ffn else (2, 3)
    units = (spec.shared_ffn + spec.top_k * spec.expert_ffn) / tp if moe else spec.ffn / tp
    forward += activation_forward * units
    backward += activation_backward * units
    if moe:
        forward += 4 * spec.top_k * spec.hidden / tp
        backward += 4 * spec.top_k * spec.hidden / tp
    recomputed = forward if parallelism.checkpointing == "full" else 0.0
    total = (forward + backward + recomputed) * job.model_bytes
    if not job.fused_attention:  # every score of the (uncausal) T x T, once more if recomputed
        scores = spec.heads / tp * job.seq_len / parallelism.cp
        share_recomputed = 11 / UNFUSED_SCORE_BYTES if parallelism.checkpointing != "none" else 0.0
        total += scores * UNFUSED_SCORE_BYTES * (1 + share_recomputed)
    return total


def attention_core_s(spec: ModelSpec, job: Job, parallelism: Parallelism, tokens: float) -> float:
    """A layer's attention cores (QK^T, softmax, AV) on one tp rank, forward and backward (and recomputed)."""
    gpu, tp = job.cluster.gpu, parallelism.tp
    heads = spec.heads / tp
    qk, v = spec.head_dim + spec.qk_rope_dim, spec.v_head_dim or spec.head_dim
    recompute = 1 if parallelism.checkpointing != "none" else 0
    if job.fused_attention:
        # causal: half the scores; cp splits the queries, each seeing on average half the context
        flops = 2 * tokens * heads * (qk + v) * job.seq_len / 2 * (3 + recompute)
        return flops / (gpu.peak_flops * attention_efficiency(job.software.attention_kernel, gpu, spec.head_dim))
    sequences = tokens / (job.seq_len / parallelism.cp)
    rows = job.seq_len / parallelism.cp
    # batched over sequences x heads, the full T x T computed and masked afterwards
    scores = gemm_s(gpu, rows, job.seq_len, qk, batch=sequences * heads)
    outputs = gemm_s(gpu, rows, v, job.seq_len, batch=sequences * heads)
    return (scores + outputs) * (3 + recompute)


def passes(parallelism: Parallelism) -> int:
    """Forward-equivalents of a weight's GEMMs in a micro-batch: the forward, the backward's two, a recompute."""
    return 3 + (1 if parallelism.checkpointing == "full" else 0)


def layer_kinds(spec: ModelSpec) -> list[tuple[bool, int]]:
    """(MoE or not, how many layers) of the model's dense and MoE layers, those it has."""
    return [(moe, count) for moe, count in ((False, spec.layers - spec.moe_layers), (True, spec.moe_layers)) if count]


def micro_batch_s(job: Job, parallelism: Parallelism) -> float:
    """One micro-batch's forward and backward (recomputation included) of the whole model on one tp x cp rank,
    as if it held every layer: the pipeline's split and its balance are layout.py's."""
    spec, gpu = job.spec, job.cluster.gpu
    tokens = parallelism.micro_batch * job.seq_len / parallelism.cp
    memory_rate = gpu.hbm_bytes_per_s * HBM_EFFICIENCY
    total = 0.0
    for moe, count in layer_kinds(spec):
        layer = sum(gemm.trained_s(gpu, passes(parallelism)) for gemm in layer_gemms(spec, parallelism, tokens, moe))
        layer += attention_core_s(spec, job, parallelism, tokens)
        layer += tokens * elementwise_bytes_per_token(spec, job, parallelism, moe) / memory_rate
        total += count * layer
    depth = 1 + spec.mtp_depth / spec.layers  # multi-token prediction: about one more layer each
    output = Gemm(tokens, spec.vocab / parallelism.tp, spec.hidden).trained_s(gpu, 3)
    loss = tokens * spec.vocab / parallelism.tp * 20 / memory_rate  # fp32 softmax cross-entropy, both ways
    return (total * depth + (1 + spec.mtp_depth) * (output + loss)) / SUSTAINED


def tensor_parallel_gemm_s(job: Job, parallelism: Parallelism) -> float:
    """A micro-batch's GEMMs of the tp-split blocks (attention projections, dense or shared FFN) on one stage,
    which tp's chunked collectives run beside."""
    spec, gpu = job.spec, job.cluster.gpu
    tokens = parallelism.micro_batch * job.seq_len / parallelism.cp
    total = 0.0
    for moe, count in layer_kinds(spec):
        gemms = layer_gemms(spec, parallelism, tokens, moe)
        total += count * sum(gemm.trained_s(gpu, passes(parallelism)) for gemm in gemms if gemm.tp_split)
    return total / parallelism.pp


def optimizer_step_s(gpu: GPU, params: float) -> float:
    """Adam over the parameters whose optimizer state this GPU keeps: memory-bound."""
    return params * ADAM_BYTES_PER_PARAM / (gpu.hbm_bytes_per_s * HBM_EFFICIENCY)


def gemm_efficiency(gpu: GPU, m: float, n: float, k: float) -> float:
    """Share of the peak a GEMM of this shape sustains (what the tables and tests read)."""
    return 2 * m * n * k / gpu.peak_flops / gemm_s(gpu, m, n, k)
