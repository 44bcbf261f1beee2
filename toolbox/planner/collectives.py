"""Cost of one collective: the alpha-beta model of ring and tree algorithms, as NCCL's tuning model uses.

`size` is the bytes of the whole tensor (the gathered result for an all-gather, the input of a reduce-scatter or
all-reduce), `ranks` the group size, `bandwidth` a GPU's bytes/s on the group's slowest link, `latency` one hop.
Each returns (seconds, bytes this GPU sends).
"""

import math


def all_reduce(size: float, ranks: int, bandwidth: float, latency: float) -> tuple[float, float]:
    """A ring all-reduce (reduce-scatter + all-gather) moves 2 (n-1)/n of the tensor; on large groups NCCL
    switches to a tree, whose latency grows with log2(n) instead of n at about the same bandwidth term."""
    if ranks <= 1:
        return 0.0, 0.0
    sent = 2 * size * (ranks - 1) / ranks
    hops = min(2 * (ranks - 1), 2 * math.ceil(math.log2(ranks)))
    return sent / bandwidth + hops * latency, sent


def all_gather(size: float, ranks: int, bandwidth: float, latency: float) -> tuple[float, float]:
    """Every rank receives the ranks - 1 shards it lacks (size / ranks each); the latency term is a tree's
    (PAT / hierarchical on large groups), not a ring's n hops."""
    if ranks <= 1:
        return 0.0, 0.0
    sent = size * (ranks - 1) / ranks
    return sent / bandwidth + min(ranks - 1, 2 * math.ceil(math.log2(ranks))) * latency, sent


reduce_scatter = all_gather


def all_to_all(sent_bytes: float, ranks: int, bandwidth: float, latency: float) -> tuple[float, float]:
    """Each rank sends `sent_bytes` spread over the others; all pairs run at once, so a GPU's own link bounds it."""
    if ranks <= 1:
        return 0.0, 0.0
    return sent_bytes / bandwidth + latency * math.ceil(math.log2(ranks)), sent_bytes


def send(size: float, bandwidth: float, latency: float) -> tuple[float, float]:
    return size / bandwidth + latency, size
