"""Pipeline schedules: what a rank holds and keeps in flight, the bubble, and the pace of the busiest rank.

1F1B (Narayanan et al. 2021) keeps pp micro-batches in flight on its first stage and idles (pp - 1)
micro-batch times; interleaved with v chunks a rank (Megatron-LM) cuts the bubble to (pp - 1) / v for
(1 + (pp - 1) / (pp v)) times the activations; DualPipe (DeepSeek-V3, table 2) feeds micro-batches from both
ends, each rank holding a stage of each direction (twice the parameters, pp + 1 micro-batches in flight), and
idles (pp/2 - 1)(F&B + B - 3W).
"""

import math

from .spec import ModelSpec

SCHEDULES = ("1f1b", "interleaved", "dualpipe")


def stages_per_rank(schedule: str) -> int:
    """Whole stages' parameters a rank holds (an interleaved rank's v chunks add up to one stage)."""
    return 2 if schedule == "dualpipe" else 1


def micro_batches_in_flight(pp: int, schedule: str, virtual_stages: int) -> float:
    """Micro-batches whose activations for one stage's layers the busiest rank holds at once."""
    if pp == 1:
        return 1.0
    if schedule == "interleaved":
        return pp * (1 + (pp - 1) / (pp * virtual_stages))
    return pp + (1 if schedule == "dualpipe" else 0)


def bubble(pp: int, schedule: str, virtual_stages: int, forward: float, weights: float) -> float:
    """Idle time in micro-batch times, given a forward's and the weight gradients' shares of a micro-batch's
    work (a full backward is the rest). DualPipe's F&B, a forward beside a backward, is F + B when the
    compute, not the communication, sets their pace."""
    if pp == 1:
        return 0.0
    if schedule == "dualpipe":
        backward = 1 - forward
        return (pp / 2 - 1) * (forward + 2 * backward - 3 * weights)
    return (pp - 1) / (virtual_stages if schedule == "interleaved" else 1)


def slowest_stage(spec: ModelSpec, pp: int, schedule: str, seq_len: int) -> float:
    """How much longer the busiest pipeline rank computes than the average: layers are whole, and the output
    matrix (with any multi-token-prediction modules) sits on the last stage as a block of its own. Layers
    are placed to minimise the busiest rank (Llama 3 takes one layer off its first and last stages);
    DualPipe's ranks each hold a stage from each end, so it balances over pp / 2 pairs."""
    if pp == 1:
        return 1.0
    layer_attention = spec.attention_flops(seq_len, causal=True) / spec.layers
    layer = 6 * spec.layer_params_active + layer_attention
    end = (6 * (spec.vocab * spec.hidden + spec.mtp_params_active) + spec.mtp_depth * layer_attention) / layer
    ranks = pp // stages_per_rank(schedule)

    def places_every_layer(load: float) -> bool:  # the rank with the end block, and the others
        return load >= end and (ranks - 1) * math.floor(load + 1e-9) + math.floor(load - end + 1e-9) >= spec.layers

    # the busiest rank holds n whole layers, or the end block and n layers: the least such load that works
    loads = sorted({float(n) for n in range(1, spec.layers + 1)} | {n + end for n in range(spec.layers + 1)})
    busiest = next(load for load in loads if places_every_layer(load))
    return busiest / ((spec.layers + end) / ranks)
