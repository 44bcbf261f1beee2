"""The Colossus planner: will a model fit, and how long will its training take, on N GPUs?

    python scripts/plan.py --model PRESET --gpus N --gpu h100|h200|b200|a100 --strategy S [--tp N] [--ep N]
                           [--seq-len T] [--global-batch-tokens B] [--micro-batch M] [--shard-size 8]
                           [--activation-checkpointing] [--mfu 0.4] [--token-budget 6e12] [--json]

S is ddp, fsdp, hsdp (shard inside a node of --shard-size GPUs, replicate across nodes), zero1, zero2 or
zero3. Per GPU it prints the bytes of parameters, gradients and optimizer state (the same accounting the
trainer logs as state_mib; a test checks the two agree within 10% on CPU for every strategy),
activations (an estimate, see `activation_bytes`), whether that fits, FLOPs per token (model/accounting),
and at the stated MFU the step time, tokens per day and days to the token budget.
`--gpu cpu --dtype fp32` describes this project's CPU runs.
"""

import json

import torch

from model import GrokForCausalLM, count_parameters, flops_per_token, preset_config
from model.presets import PRESETS

from .cli import ArgumentParser, integer, positive_number, run_main
from .metrics import PEAK_BF16_FLOPS

GIB = 2**30
# Memory per device (what the CUDA allocator can use, about the card's HBM) and the dense bf16 peak.
GPUS = {"h100": (80 * 1e9 / GIB, PEAK_BF16_FLOPS["H100"]), "h200": (141 * 1e9 / GIB, PEAK_BF16_FLOPS["H200"]),
        "b200": (180 * 1e9 / GIB, PEAK_BF16_FLOPS["B200"]), "a100": (80 * 1e9 / GIB, PEAK_BF16_FLOPS["A100"]),
        "cpu": (None, None)}
STRATEGIES = ("ddp", "fsdp", "hsdp", "zero1", "zero2", "zero3")


class PlanError(ValueError):
    """A plan that cannot be made from these arguments: the message names the flags."""


def tensor_parallel_split(model) -> tuple[int, int, int]:
    """(parameters tensor parallelism splits, routed experts' parameters, the rest): attention, the dense and
    shared FFN, the embedding and an untied lm_head are split by tp; norms and the router are kept whole; routed experts are
    kept whole by tp but spread over the ep ranks, which borrow tp's ranks."""
    split = experts = 0
    for name, p in model.named_parameters():
        if any(part in name for part in ("_proj.", ".dense.", ".shared.", "embed_tokens.", "lm_head.")):
            split += p.numel()
        elif ".moe.w_" in name:
            experts += p.numel()
    return split, experts, sum(p.numel() for p in model.parameters()) - split - experts


def state_bytes(params: tuple[int, int, int], strategy: str, ranks: int, shard_size: int, dtype: str,
                tp: int = 1, ep: int = 1) -> dict[str, float]:
    """Parameters, gradients and AdamW state one rank holds, as the trainer counts them. `params` is
    (tensor-parallel-split, routed experts, the rest), as tensor_parallel_split returns.

    torch strategies keep fp32 parameters (bf16 compute through autocast / FSDP's mixed-precision policy)
    and fp32 gradients; FSDP shards all three over its shard group, after tensor parallelism split what
    it splits. Routed experts are sharded over all dp-shard x tp ranks when ep > 1 (ep borrows the tp
    ranks), over the dp-shard ranks only otherwise. Without tp, ep moves experts between ranks but not the
    bytes per rank. DeepSpeed ZeRO keeps the model in the compute dtype plus an fp32 master partition:
    ZeRO-1 shards the optimizer state, ZeRO-2 also the gradients, ZeRO-3 also the parameters.
    """
    split, experts, rest = map(float, params)
    if strategy in ("ddp", "fsdp", "hsdp"):
        shards = {"ddp": 1, "fsdp": ranks // tp, "hsdp": shard_size // tp}[strategy]
        p = (split / tp + rest + experts / (tp if ep > 1 else 1)) / shards
        return {"params": 4 * p, "grads": 4 * p, "optim": 8 * p}
    whole = experts + rest
    p = split + whole
    model_bytes = 2 if dtype == "bf16" else 4
    stage = int(strategy[-1])
    return {"params": model_bytes * p / (ranks if stage == 3 else 1),
            "grads": model_bytes * p / (ranks if stage >= 2 else 1),
            "optim": 12 * p / ranks}  # fp32 master partition + AdamW's two moments


def activation_bytes(config, seq_len: int, micro_batch: int, checkpointing: bool, dtype: str, tp: int = 1) -> float:
    """Estimate after Korthikanti et al. (2022), adapted: fused attention keeps no T x T scores; per token
    and layer ~29 d bytes for attention and the four sandwich norms plus 8 bytes per GeGLU unit of the
    routed experts (top_k of them) and the shared FFN; the fp32 logits add ~10 bytes per vocab entry. With
    activation checkpointing a layer keeps only its input, and one layer is recomputed at a time. Tensor
    (and sequence) parallelism divides all of it by tp but the routed experts, which see the whole batch."""
    scale = 1 if dtype == "bf16" else 2
    d, tokens = config.hidden_size, seq_len * micro_batch
    routed = config.intermediate_size * config.num_experts_per_tok if config.is_moe else 0
    split_ffn = config.shared_intermediate_size + (0 if config.is_moe else config.intermediate_size)
    per_layer = tokens * scale * ((29 * d + 8 * split_ffn) / tp + 8 * routed)
    layers = config.num_hidden_layers
    stored = layers * tokens * scale * 2 * d / tp + per_layer if checkpointing else layers * per_layer
    return stored + tokens * 10 * config.vocab_size / tp


def plan(model: str, gpus: int, gpu: str, strategy: str, seq_len: int | None = None,
         global_batch_tokens: int = 16 * 2**20, micro_batch: int = 1, shard_size: int = 8,
         activation_checkpointing: bool = False, mfu: float = 0.4, token_budget: float | None = None,
         dtype: str = "bf16", vocab_size: int | None = None, tp: int = 1, ep: int = 1) -> dict:
    config = preset_config(model, **({"vocab_size": vocab_size} if vocab_size else {}))
    with torch.device("meta"):
        meta_model = GrokForCausalLM(config)
    counts = count_parameters(meta_model)
    seq_len = seq_len or config.max_position_embeddings
    shard_size = min(shard_size, gpus)
    if strategy == "hsdp" and gpus % shard_size:
        raise PlanError(f"--gpus {gpus} is not a multiple of --shard-size {shard_size}: pass whole shard groups")
    check_split(config, strategy, gpus, shard_size, tp, ep)
    state = state_bytes(tensor_parallel_split(meta_model), strategy, gpus, shard_size, dtype, tp, ep)
    activations = activation_bytes(config, seq_len, micro_batch, activation_checkpointing, dtype, tp)
    memory_gib, peak = GPUS[gpu]
    total_gib = (sum(state.values()) + activations) / GIB
    flops = flops_per_token(config, counts.active, seq_len)
    result = {
        "model": model, "params_total": counts.total, "params_active": counts.active, "gpus": gpus, "gpu": gpu,
        "strategy": strategy, "tp": tp, "ep": ep, "seq_len": seq_len, "micro_batch": micro_batch, "dtype": dtype,
        "activation_checkpointing": activation_checkpointing,
        "params_gib": state["params"] / GIB, "grads_gib": state["grads"] / GIB, "optim_gib": state["optim"] / GIB,
        "state_gib": sum(state.values()) / GIB, "activations_gib": activations / GIB, "total_gib": total_gib,
        "gpu_memory_gib": memory_gib, "fits": None if memory_gib is None else total_gib <= 0.9 * memory_gib,
        "flops_per_token": flops, "requested_batch_tokens": global_batch_tokens,
    }
    # Every data-parallel rank (a tp group counts once) takes at least one micro-batch per step.
    smallest_batch = gpus // tp * micro_batch * seq_len
    result["min_global_batch_tokens"] = smallest_batch
    if peak:
        tokens_per_s = gpus * peak * mfu / flops
        batch = max(global_batch_tokens, smallest_batch)
        result.update({"mfu": mfu, "global_batch_tokens": batch,
                       "step_s": batch / tokens_per_s, "tokens_per_day": tokens_per_s * 86400})
        if token_budget:
            result.update({"token_budget": token_budget, "days": token_budget / result["tokens_per_day"]})
    return result


def check_split(config, strategy: str, gpus: int, shard_size: int, tp: int, ep: int) -> None:
    """The trainer's layout rules (train/parallel/mesh.py), for flags."""
    if (tp > 1 or ep > 1) and strategy not in ("fsdp", "hsdp"):
        raise PlanError(f"--tp / --ep need --strategy fsdp or hsdp, not {strategy}")
    group = shard_size if strategy == "hsdp" else gpus
    if group % tp:
        raise PlanError(f"--tp {tp} does not divide the {group} GPUs of a shard group")
    if ep > 1 and (config.num_local_experts % ep or group % ep):  # ep borrows dp-shard x tp ranks
        raise PlanError(f"--ep {ep} must divide the model's {config.num_local_experts} experts and the {group} GPUs "
                        f"of a shard group")
    for name, size in (("attention heads", config.num_attention_heads), ("KV heads", config.num_key_value_heads),
                       ("vocabulary", config.vocab_size)):
        if size % tp:
            raise PlanError(f"--tp {tp} does not divide the model's {size} {name}")


def human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def size(gib: float) -> str:
    return f"{gib:.2f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"


def report(r: dict) -> str:
    split = "".join(f" x {name} {r[name]}" for name in ("tp", "ep") if r[name] > 1)
    lines = [f"{r['model']}: {human(r['params_total'])} params ({human(r['params_active'])} active), {r['strategy']}{split} on "
             f"{r['gpus']:,} x {r['gpu']} ({r['dtype']}, seq {r['seq_len']}, micro-batch {r['micro_batch']}"
             f"{', activation checkpointing' if r['activation_checkpointing'] else ''})",
             f"  per GPU: params {size(r['params_gib'])} + grads {size(r['grads_gib'])} + optimizer "
             f"{size(r['optim_gib'])} + activations ~{size(r['activations_gib'])} = {size(r['total_gib'])}"]
    if r["fits"] is not None:
        verdict = "fits" if r["fits"] else "DOES NOT FIT"
        lines.append(f"  {verdict} in {r['gpu_memory_gib']:.0f} GiB (90% usable)")
    lines.append(f"  training FLOPs per token {human(r['flops_per_token'])}")
    if r.get("global_batch_tokens", 0) > r["requested_batch_tokens"]:
        lines.append(f"  note: {r['gpus'] // r['tp']:,} data-parallel ranks need a global batch of at least "
                     f"{r['gpus'] // r['tp']:,} x {r['micro_batch']} x {r['seq_len']} = "
                     f"{human(r['min_global_batch_tokens'])} tokens (asked: {human(r['requested_batch_tokens'])}); "
                     f"a larger --tp or pipeline parallelism (not modelled) lowers it")
    if "step_s" in r:
        lines.append(f"  at {r['mfu']:.0%} MFU: {r['step_s']:.2f} s per {human(r['global_batch_tokens'])}-token step, "
                     f"{human(r['tokens_per_day'])} tokens/day"
                     + (f", {r['days']:.1f} days for {human(r['token_budget'])} tokens" if "days" in r else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = ArgumentParser(prog="scripts/plan.py", description=__doc__)
    parser.add_argument("--model", required=True, choices=list(PRESETS))
    parser.add_argument("--gpus", type=integer(1), required=True)
    parser.add_argument("--gpu", default="h100", choices=list(GPUS))
    parser.add_argument("--strategy", required=True, choices=STRATEGIES)
    parser.add_argument("--seq-len", type=integer(1), help="default: the preset's context")
    parser.add_argument("--global-batch-tokens", type=positive_number, default=16 * 2**20)
    parser.add_argument("--micro-batch", type=integer(1), default=1, help="sequences per GPU per forward")
    parser.add_argument("--shard-size", type=integer(1), default=8, help="hsdp: GPUs per shard group (a node)")
    parser.add_argument("--tp", type=integer(1), default=1, help="tensor-parallel GPUs (inside a node)")
    parser.add_argument("--ep", type=integer(1), default=1, help="expert-parallel GPUs")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--mfu", type=positive_number, default=0.4, help="in (0, 1]")
    parser.add_argument("--token-budget", type=positive_number)
    parser.add_argument("--dtype", default=None, choices=("bf16", "fp32"), help="default: bf16 on GPUs, fp32 on cpu")
    parser.add_argument("--vocab-size", type=integer(1), help="override the preset's vocabulary")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.mfu > 1:
        parser.error(f"argument --mfu: {args.mfu} is above 1 (a fraction of the peak, e.g. 0.4)")

    def work() -> int:
        result = plan(args.model, args.gpus, args.gpu, args.strategy, args.seq_len, int(args.global_batch_tokens),
                      args.micro_batch, args.shard_size, args.activation_checkpointing, args.mfu, args.token_budget,
                      args.dtype or ("fp32" if args.gpu == "cpu" else "bf16"), args.vocab_size, args.tp, args.ep)
        print(json.dumps(result) if args.json else report(result))
        return 0 if result["fits"] in (True, None) else 1
    return run_main(work, (PlanError,))
