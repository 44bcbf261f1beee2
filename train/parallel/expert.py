"""Expert parallelism: each rank of an ep group owns E / ep of every MoE layer's experts.

The model routes as always (top-k softmax, dropless) and hands its rows, sorted by expert, to
`MoE.dispatch`. Here that becomes: tell every peer how many rows it will get for each of its experts,
send the rows with one all-to-all of uneven sizes, run the local experts as one grouped matmul,
send the outputs back with the reverse all-to-all. Both all-to-alls are differentiable, so the
backward pass swaps gradients the same way. Router statistics are computed before dispatch, on this
rank's tokens, exactly as one process computes them for the same micro-batch.

Expert weights keep their names and global shapes ([E, d, f]): they are DTensors sharded on the
expert dimension over the mesh's "ep" dimension, so checkpoints reshard to any other layout.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.autograd.function import FunctionCtx
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from model.moe import MoE, grouped_geglu

from .mesh import Layout, WorldMesh

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


def local_part(weight: torch.Tensor) -> torch.Tensor:
    return weight.to_local() if isinstance(weight, DTensor) else weight


def expert_major_order(counts: torch.Tensor) -> torch.Tensor:
    """Rows arrive grouped by source rank, each source's rows sorted by local expert: counts[s, j] rows
    of expert j from source s. The permutation that groups them by expert instead (stable in source)."""
    sources, experts = counts.shape
    chunk_of_row = torch.repeat_interleave(torch.arange(sources * experts, device=counts.device), counts.flatten())
    expert_of_row, source_of_row = chunk_of_row % experts, chunk_of_row // experts
    return (expert_of_row * sources + source_of_row).argsort(stable=True)


def chunk_sizes(rows: int, parts: int) -> list[int]:
    base, extra = divmod(rows, parts)
    return [base + (i < extra) for i in range(parts)]


def chunk_counts(counts: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Per-expert counts of rows [start, stop) of an expert-sorted array with these per-expert counts."""
    ends = counts.cumsum(0)
    return (ends.clamp(max=stop) - (ends - counts).clamp(min=start)).clamp(min=0)


def _gather_chunks(chunk: torch.Tensor, sizes: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    padded = chunk.new_zeros(max(sizes), *chunk.shape[1:])
    padded[: chunk.shape[0]] = chunk
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


class _TakeChunk(torch.autograd.Function):
    """Rows every rank of a tp group holds alike -> this rank's chunk. Each row's gradient is computed on one
    rank only, so the backward gathers the chunks' gradients: the whole, identical on every rank."""

    @staticmethod
    def forward(ctx: FunctionCtx, rows: torch.Tensor, sizes: list[int], rank: int, group: dist.ProcessGroup):
        ctx.sizes, ctx.group = sizes, group
        start = sum(sizes[:rank])
        return rows[start : start + sizes[rank]]

    @staticmethod
    def backward(ctx: FunctionCtx, grad: torch.Tensor):
        return _gather_chunks(grad.contiguous(), ctx.sizes, ctx.group), None, None, None


class _GatherChunks(torch.autograd.Function):
    """The reverse: every rank's chunk of outputs -> all rows on every rank. The loss is the same on every rank
    of the group, so the output gradient arrives whole and alike: keep this rank's slice (no sum)."""

    @staticmethod
    def forward(ctx: FunctionCtx, chunk: torch.Tensor, sizes: list[int], rank: int, group: dist.ProcessGroup):
        ctx.start, ctx.size = sum(sizes[:rank]), sizes[rank]
        return _gather_chunks(chunk.contiguous(), sizes, group)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: torch.Tensor):
        return grad[ctx.start : ctx.start + ctx.size], None, None, None


class ExpertParallelDispatch:
    """MoE.dispatch over an ep process group: rows out to the experts' owners, outputs back.

    Under tensor parallelism every rank of a tp group routes the same (whole) micro-batch; each then sends
    only its 1/tp chunk of the rows, and the outputs are gathered back, so every row is computed once."""

    def __init__(self, group: dist.ProcessGroup, num_experts: int, tp_group: dist.ProcessGroup | None = None):
        self.group = group
        self.ep = dist.get_world_size(group)
        self.local_experts = num_experts // self.ep
        self.tp_group = tp_group
        self.tp = dist.get_world_size(tp_group) if tp_group is not None else 1
        self.tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0

    def __call__(
        self, routed: torch.Tensor, counts: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor
    ) -> torch.Tensor:
        if self.tp == 1:
            return self.exchange(routed, counts, w_gate, w_up, w_down)
        sizes = chunk_sizes(routed.shape[0], self.tp)
        start = sum(sizes[: self.tp_rank])
        mine = _TakeChunk.apply(routed, sizes, self.tp_rank, self.tp_group)
        out = self.exchange(mine, chunk_counts(counts, start, start + sizes[self.tp_rank]), w_gate, w_up, w_down)
        return _GatherChunks.apply(out, sizes, self.tp_rank, self.tp_group)

    def exchange(
        self, routed: torch.Tensor, counts: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor
    ) -> torch.Tensor:
        # counts[e]: rows for expert e; experts are owned in order, so rank r gets experts [r*L, (r+1)*L).
        received_counts = torch.empty_like(counts)
        dist.all_to_all_single(received_counts, counts, group=self.group)  # not differentiable: sizes only
        received_counts = received_counts.view(self.ep, self.local_experts)
        send = counts.view(self.ep, self.local_experts).sum(1).tolist()
        receive = received_counts.sum(1).tolist()
        received = wait_tensor(all_to_all_single_autograd(routed, receive, send, self.group))
        order = expert_major_order(received_counts)
        computed = grouped_geglu(
            received[order], received_counts.sum(0), local_part(w_gate), local_part(w_up), local_part(w_down)
        )
        in_arrival_order = computed[order.argsort()]
        return wait_tensor(all_to_all_single_autograd(in_arrival_order, send, receive, self.group))


def moe_layers(model: nn.Module) -> list[MoE]:
    return [module for module in model.modules() if isinstance(module, MoE)]


def apply_expert_parallel(model: nn.Module, mesh: WorldMesh) -> None:
    """Shard every MoE layer's experts over the ep dimension and route its rows through the all-to-all.
    Every rank built the same full weights (same seed): each keeps its own slice, no communication."""
    ep_mesh = mesh.expert_parallel
    tp_group = mesh.tensor_parallel.get_group() if mesh.layout.tp > 1 else None
    for moe in moe_layers(model):
        for name in EXPERT_WEIGHTS:
            weight = getattr(moe, name)
            setattr(moe, name, nn.Parameter(distribute_tensor(weight.data, ep_mesh, [Shard(0)], src_data_rank=None)))
        moe.dispatch = ExpertParallelDispatch(ep_mesh.get_group(), moe.num_experts, tp_group)


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [getattr(moe, name) for moe in moe_layers(model) for name in EXPERT_WEIGHTS]


def expert_gradient_scale(layout: Layout) -> float:
    """FSDP averages expert gradients over the ranks holding the same experts; each rank's experts have
    already summed the contributions of its whole ep group through the all-to-all. The mean over all
    data-parallel and context-parallel ranks (what dense weights get) is that average times this factor."""
    return layout.dp_replicate * layout.expert_shard / (layout.dp_size * layout.cp)


def scale_expert_gradients(parameters: list[nn.Parameter], scale: float) -> None:
    if scale != 1.0:
        for param in parameters:
            if param.grad is not None:
                param.grad.mul_(scale)
