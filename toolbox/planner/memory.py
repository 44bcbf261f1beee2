"""Bytes per GPU of one layout: parameters, gradients and optimizer state as each data-parallel kind keeps them,
activations (Korthikanti et al. 2022) for the micro-batches the schedule keeps in flight, and buffers."""

import math

from .hardware import GIB
from .job import Job, Layout
from .pipeline import micro_batches_in_flight, stages_per_rank
from .spec import ModelSpec

DDP_BUCKET_BYTES = 25 * 2**20  # DistributedDataParallel's bucket_cap_mb


def stage_params(s: ModelSpec, L: Layout) -> tuple[float, float]:
    """(dense, routed-expert) parameters one GPU of the first stage holds before data-parallel sharding: its
    layers' share split by tp (experts by ep instead), plus the embedding (and, without pp, the output).
    DualPipe's GPUs each hold two stages, one of each direction: the first and the last."""
    embedding = s.vocab * s.hidden * (2 if L.pp == 1 and not s.tied_embeddings else 1)
    copies = stages_per_rank(L.schedule)
    dense = (copies * math.ceil(s.layers / L.pp) * s.dense_params / s.layers + copies * embedding) / L.tp
    experts = copies * math.ceil(s.moe_layers / L.pp) * s.expert_params / max(s.moe_layers, 1) / L.ep
    return dense, experts


def expert_replicas(L: Layout, dp: int) -> int:
    """The ranks that hold the same experts. ep borrows dp x cp x tp ranks; without ep the experts are whole
    on every tp rank (this trainer splits only attention and the dense FFN) and replicated over dp x cp."""
    return dp * L.cp * L.tp // L.ep if L.ep > 1 else dp * L.cp


def memory(job: Job, L: Layout, dp: int) -> dict:
    """Bytes per GPU on the busiest (first) pipeline stage, in GiB."""
    s = job.spec
    stage_layers, moe_stage_layers = math.ceil(s.layers / L.pp), math.ceil(s.moe_layers / L.pp)
    dense, experts = stage_params(s, L)
    expert_data_parallel = expert_replicas(L, dp)
    shard_dense, shard_experts = {
        "ddp": (1, 1),
        "hsdp": (L.shard_size, max(1, expert_data_parallel * L.shard_size // dp)),
    }.get(L.data_parallel, (dp * L.cp, expert_data_parallel))
    held = dense / shard_dense + experts / shard_experts  # parameters whose optimizer state this GPU keeps
    if L.data_parallel in ("ddp", "fsdp", "hsdp"):  # this trainer: fp32 parameters and gradients (autocast)
        params = grads = 4 * held
        optim = 8 * held
    else:  # DeepSpeed ZeRO: model-dtype parameters and gradients, fp32 master + moments sharded
        whole = dense + experts
        stage = int(L.data_parallel[-1])
        params = job.model_bytes * (held if stage == 3 else whole)
        grads = job.model_bytes * (held if stage >= 2 else whole)
        optim = 12 * held
    layer = (dense / stage_layers + experts / max(moe_stage_layers, 1)) / stages_per_rank(L.schedule)
    if L.data_parallel in ("fsdp", "hsdp", "zero3"):  # two gathered bf16 layers (one prefetched) + a full-size grad
        buffers = 2 * job.model_bytes * layer + 4 * layer
    else:
        buffers = 2 * DDP_BUCKET_BYTES
    return {
        "params": params / GIB,
        "grads": grads / GIB,
        "optimizer": optim / GIB,
        "activations": activations(job, L) / GIB,
        "buffers": buffers / GIB,
    }


def activations(job: Job, L: Layout) -> float:
    """Saved tensors, bf16, after Korthikanti et al. (2022): with fused attention no T x T scores, and with
    sequence parallelism all of it split by tp but the routed experts (which see whole tokens). Per token and layer:
    each norm's input (2h), the q/k/v projection's input, q, k and v, the attention output; the FFN's input
    and, gated, its gate, up and product (2 bytes each per unit; ungated: up and activation) -- for the dense
    or shared FFN and for each of the top_k routed experts. Selective checkpointing recomputes the attention
    core with q, k, v and the FFN's product from what it keeps; full keeps only each layer's input (and
    recomputes one layer at a time). The busiest rank holds its stage's layers for as many micro-batches
    as the schedule keeps in flight (pipeline.micro_batches_in_flight)."""
    s = job.spec
    tokens = L.micro_batch * job.seq_len / L.cp
    kv = 2 * (s.kv_lora_rank + s.qk_rope_dim) if s.kv_lora_rank else 2 * 2 * s.kv_heads * s.head_dim
    q = 2 * s.heads * (s.head_dim + s.qk_rope_dim)
    # the residual stream's tensors (norm inputs, the q/k/v and FFN inputs) are split by tp only under
    # sequence parallelism; the heads' and the FFN units' always are
    stream = (2 * s.norms_per_layer + 2 + 2) * s.hidden / (L.tp if job.sequence_parallel else 1)
    attention = q + kv + 2 * s.hidden  # q, k, v and the attention output
    if not job.fused_attention:  # the T x T scores: softmax output, dropout mask and output (5 bytes each)
        attention += 5 * s.heads * job.seq_len / L.cp
    tensors_per_unit = 3 if s.gated_ffn else 2
    if L.checkpointing == "selective":
        attention = 0.0
        tensors_per_unit -= 1
    split_units = s.shared_ffn if s.is_moe else s.ffn
    routed_units = s.top_k * s.expert_ffn if s.is_moe else 0
    per_layer = stream + (attention + 2 * tensors_per_unit * split_units) / L.tp + 2 * tensors_per_unit * routed_units
    stage_layers = math.ceil(s.layers / L.pp)
    in_flight = micro_batches_in_flight(L.pp, L.schedule, L.virtual_stages)
    if L.checkpointing == "full":
        kept = stage_layers * in_flight * tokens * 2 * s.hidden / L.tp + tokens * per_layer
    else:
        kept = stage_layers * in_flight * tokens * per_layer
    logits = tokens * 10 * s.vocab / L.tp  # fp32 logits and their gradient, on the last stage
    return kept + logits
