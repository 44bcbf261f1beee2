"""Cost of one collective: the alpha-beta model of ring and tree algorithms, as NCCL's tuning model uses.

`size` is the bytes of the whole tensor (the gathered result for an all-gather, the input of a reduce-scatter or
all-reduce), `ranks` the group size, `bandwidth` a GPU's bytes/s on the group's slowest link, `latency` one hop.
Each returns (seconds, bytes this GPU sends).
"""

import math

RING_RANKS = 8  # NCCL all-reduces on a ring inside a node; on larger groups on a tree, log2(n) deep
# a tree hop across nodes costs about two ring steps: ~30 us fitted to NCCL's all-reduce bandwidth by message size
# (hardware.py) against its tuning model's 14 us a ring step over the network (src/graph/tuning.cc, hwLat)
TREE_HOP_STEPS = 2


def all_reduce_steps(ranks: int) -> int:
    ring = 2 * (ranks - 1)
    return ring if ranks <= RING_RANKS else min(ring, TREE_HOP_STEPS * 2 * math.ceil(math.log2(ranks)))


def all_reduce(size: float, ranks: int, bandwidth: float, latency: float) -> tuple[float, float]:
    """A ring all-reduce (reduce-scatter + all-gather) moves 2 (n-1)/n of the tensor in 2 (n-1) steps; on
    large groups NCCL switches to a tree at about the same bandwidth term."""
    if ranks <= 1:
        return 0.0, 0.0
    sent = 2 * size * (ranks - 1) / ranks
    return sent / bandwidth + all_reduce_steps(ranks) * latency, sent


def all_gather(size: float, ranks: int, bandwidth: float, latency: float) -> tuple[float, float]:
    """Every rank receives the ranks - 1 shards it lacks (size / ranks each), on a ring of ranks - 1 steps
    (NCCL has no tree for these: on large groups their latency is what limits small pieces)."""
    if ranks <= 1:
        return 0.0, 0.0
    sent = size * (ranks - 1) / ranks
    return sent / bandwidth + (ranks - 1) * latency, sent


reduce_scatter = all_gather


def all_to_all(sent_bytes: float, ranks: int, bandwidth: float, latency: float) -> tuple[float, float]:
    """Each rank sends `sent_bytes` spread over the others; all pairs run at once, so a GPU's own link bounds it."""
    if ranks <= 1:
        return 0.0, 0.0
    return sent_bytes / bandwidth + latency * math.ceil(math.log2(ranks)), sent_bytes


def send(size: float, bandwidth: float, latency: float) -> tuple[float, float]:
    return size / bandwidth + latency, size
