"""Bytes per GPU of one parallelism: parameters, gradients and optimizer state as each data-parallel kind keeps
them, activations (Korthikanti et al. 2022) for the micro-batches the schedule keeps in flight, and buffers."""

import math

from .hardware import GIB
from .job import Job, Parallelism
from .pipeline import micro_batches_in_flight, stages_per_rank
from .spec import ModelSpec

DDP_BUCKET_BYTES = 25 * 2**20  # DistributedDataParallel's bucket_cap_mb


def stage_params(spec: ModelSpec, parallelism: Parallelism) -> tuple[float, float]:
    """(dense, routed-expert) parameters one GPU of the first stage holds before data-parallel sharding: its
    layers' share split by tp (experts by ep instead), plus the embedding (and, without pp, the output).
    DualPipe's GPUs each hold two stages, one of each direction: the first and the last."""
    pp = parallelism.pp
    embedding = spec.vocab * spec.hidden * (2 if pp == 1 and not spec.tied_embeddings else 1)
    copies = stages_per_rank(parallelism.schedule)
    dense = (
        copies * math.ceil(spec.layers / pp) * spec.dense_params / spec.layers + copies * embedding
    ) / parallelism.tp
    experts = copies * math.ceil(spec.moe_layers / pp) * spec.expert_params / max(spec.moe_layers, 1) / parallelism.ep
    return dense, experts


def expert_replicas(parallelism: Parallelism, dp: int) -> int:
    """The ranks that hold the same experts. ep borrows dp x cp x tp ranks; without ep the experts are whole
    on every tp rank (this trainer splits only attention and the dense FFN) and replicated over dp x cp."""
    if parallelism.ep > 1:
        return dp * parallelism.cp * parallelism.tp // parallelism.ep
    return dp * parallelism.cp


def optimizer_params(job: Job, parallelism: Parallelism, dp: int) -> float:
    """The parameters whose optimizer state one GPU of the first stage keeps: its stage's, sharded as the
    data-parallel kind shards them."""
    dense, experts = stage_params(job.spec, parallelism)
    expert_data_parallel = expert_replicas(parallelism, dp)
    shard_dense, shard_experts = {
        "ddp": (1, 1),
        "hsdp": (parallelism.shard_size, max(1, expert_data_parallel * parallelism.shard_size // dp)),
    }.get(parallelism.data_parallel, (dp * parallelism.cp, expert_data_parallel))
    return dense / shard_dense + experts / shard_experts


def memory(job: Job, parallelism: Parallelism, dp: int) -> dict[str, float]:
    """Bytes per GPU on the busiest (first) pipeline stage, in GiB."""
    spec, strategy = job.spec, parallelism.data_parallel
    stage_layers = math.ceil(spec.layers / parallelism.pp)
    moe_stage_layers = math.ceil(spec.moe_layers / parallelism.pp)
    dense, experts = stage_params(spec, parallelism)
    held = optimizer_params(job, parallelism, dp)
    whole = dense + experts
    if job.software.fp32_main_grads and strategy in ("ddp", "zero1"):
        # Megatron: model-dtype parameters, an fp32 gradient buffer for the whole local model, fp32 master weights
        # and moments (sharded by the distributed optimizer): 18 bytes a parameter unsharded
        params, grads, optim = job.model_bytes * whole, 4 * whole, 12 * held
    elif strategy in ("ddp", "fsdp", "hsdp"):  # this trainer: fp32 parameters and gradients (autocast)
        params = grads = 4 * held
        optim = 8 * held
    else:  # DeepSpeed ZeRO: model-dtype parameters and gradients, fp32 master + moments sharded
        stage = int(strategy[-1])
        params = job.model_bytes * (held if stage == 3 else whole)
        grads = job.model_bytes * (held if stage >= 2 else whole)
        optim = 12 * held
    layer = (dense / stage_layers + experts / max(moe_stage_layers, 1)) / stages_per_rank(parallelism.schedule)
    if strategy in ("fsdp", "hsdp") and parallelism.pp > 1:
        # the stage's parameters gathered for the whole step, and their gradients accumulated at full size until
        # the schedule reduce-scatters them after the last micro-batch
        buffers = (job.model_bytes + 4) * (dense + experts)
    elif strategy in ("fsdp", "hsdp", "zero3"):  # two gathered bf16 layers (one prefetched) + a full-size grad
        buffers = 2 * job.model_bytes * layer + 4 * layer
    else:
        buffers = 2 * DDP_BUCKET_BYTES
    return {
        "params": params / GIB,
        "grads": grads / GIB,
        "optimizer": optim / GIB,
        "activations": activations(job, parallelism) / GIB,
        "buffers": buffers / GIB,
    }


def activations(job: Job, parallelism: Parallelism) -> float:
    """Saved tensors, bf16, after Korthikanti et al. (2022): with fused attention no T x T scores, and with
    sequence parallelism all of it split by tp but the routed experts (which see whole tokens). Per token and layer:
    each norm's input (2h), the q/k/v projection's input, q, k and v, the attention output; the FFN's input
    and, gated, its gate, up and product (2 bytes each per unit; ungated: up and activation) -- for the dense
    or shared FFN and for each of the top_k routed experts. Selective checkpointing recomputes the attention
    core with q, k, v and the FFN's product from what it keeps; full keeps only each layer's input (and
    recomputes one layer at a time; without sequence parallelism every tp rank keeps the whole input). The busiest rank holds its stage's layers for as many micro-batches
    as the schedule keeps in flight (pipeline.micro_batches_in_flight)."""
    spec, tp = job.spec, parallelism.tp
    tokens = parallelism.micro_batch * job.seq_len / parallelism.cp
    kv = 2 * (spec.kv_lora_rank + spec.qk_rope_dim) if spec.kv_lora_rank else 2 * 2 * spec.kv_heads * spec.head_dim
    q = 2 * spec.heads * (spec.head_dim + spec.qk_rope_dim)
    # the residual stream's tensors (norm inputs, the q/k/v and FFN inputs) are split by tp only under
    # sequence parallelism; the heads' and the FFN units' always are
    stream = (2 * spec.norms_per_layer + 2 + 2) * spec.hidden / (tp if job.sequence_parallel else 1)
    attention = q + kv + 2 * spec.hidden  # q, k, v and the attention output
    if not job.fused_attention:  # the T x T scores: softmax output, dropout mask and output (5 bytes each)
        attention += 5 * spec.heads * job.seq_len / parallelism.cp
    tensors_per_unit = 3 if spec.gated_ffn else 2
    if parallelism.checkpointing == "selective":
        attention = 0.0
        tensors_per_unit -= 1
    split_units = spec.shared_ffn if spec.is_moe else spec.ffn
    routed_units = spec.top_k * spec.expert_ffn if spec.is_moe else 0
    per_layer = stream + (attention + 2 * tensors_per_unit * split_units) / tp + 2 * tensors_per_unit * routed_units
    stage_layers = math.ceil(spec.layers / parallelism.pp)
    in_flight = micro_batches_in_flight(parallelism.pp, parallelism.schedule, parallelism.virtual_stages)
    if parallelism.checkpointing == "full":
        # each layer's input, split over tp ranks only where the stream is (sequence parallelism)
        checkpoint = tokens * 2 * spec.hidden / (tp if job.sequence_parallel else 1)
        kept = stage_layers * in_flight * checkpoint + tokens * per_layer
    else:
        kept = stage_layers * in_flight * tokens * per_layer
    logits = tokens * 10 * spec.vocab / tp  # fp32 logits and their gradient, on the last stage
    return kept + logits
