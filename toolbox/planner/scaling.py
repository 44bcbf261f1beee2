"""Where scaling stops paying: the best parallelism's throughput for one model at growing GPU counts."""

from .hardware import FABRICS, GPUS, Cluster
from .job import Job
from .layout import Estimate
from .search import search
from .spec import model_spec


def scaling(
    model: str,
    gpu_counts: list[int],
    gpu: str = "h100",
    fabric: str = "roce400",
    seq_len: int = 8192,
    global_batch_tokens: int = 16 * 2**20,
) -> list[tuple[int, Estimate | None]]:
    """(GPU count, the fastest parallelism that fits or None) for each count, at a fixed global batch."""
    spec = model_spec(model)
    cluster = Cluster(GPUS[gpu], FABRICS[fabric])
    rows = []
    for gpus in gpu_counts:
        best = search(Job(spec, cluster, gpus, min(seq_len, spec.context), global_batch_tokens), top=1)
        rows.append((gpus, best[0] if best else None))
    return rows
