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


class ExpertParallelDispatch:
    """MoE.dispatch over an ep process group: rows out to the experts' owners, outputs back."""

    def __init__(self, group: dist.ProcessGroup, num_experts: int):
        self.group = group
        self.ep = dist.get_world_size(group)
        self.local_experts = num_experts // self.ep

    def __call__(self, routed: torch.Tensor, counts: torch.Tensor, w_gate, w_up, w_down) -> torch.Tensor:
        # counts[e]: rows for expert e; experts are owned in order, so rank r gets experts [r*L, (r+1)*L).
        received_counts = torch.empty_like(counts)
        dist.all_to_all_single(received_counts, counts, group=self.group)  # not differentiable: sizes only
        received_counts = received_counts.view(self.ep, self.local_experts)
        send = counts.view(self.ep, self.local_experts).sum(1).tolist()
        receive = received_counts.sum(1).tolist()
        received = wait_tensor(all_to_all_single_autograd(routed, receive, send, self.group))
        order = expert_major_order(received_counts)
        computed = grouped_geglu(received[order], received_counts.sum(0), local_part(w_gate), local_part(w_up),
                                 local_part(w_down))
        in_arrival_order = computed[order.argsort()]
        return wait_tensor(all_to_all_single_autograd(in_arrival_order, send, receive, self.group))


def moe_layers(model: nn.Module) -> list[MoE]:
    return [module for module in model.modules() if isinstance(module, MoE)]


def apply_expert_parallel(model: nn.Module, mesh: WorldMesh) -> None:
    """Shard every MoE layer's experts over the ep dimension and route its rows through the all-to-all.
    Every rank built the same full weights (same seed): each keeps its own slice, no communication."""
    ep_mesh = mesh.expert["ep"]
    for moe in moe_layers(model):
        for name in EXPERT_WEIGHTS:
            weight = getattr(moe, name)
            setattr(moe, name, nn.Parameter(distribute_tensor(weight.data, ep_mesh, [Shard(0)], src_data_rank=None)))
        moe.dispatch = ExpertParallelDispatch(ep_mesh.get_group(), moe.num_experts)


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [getattr(moe, name) for moe in moe_layers(model) for name in EXPERT_WEIGHTS]


def expert_gradient_scale(layout: Layout) -> float:
    """FSDP averages expert gradients over the ranks holding the same experts; each rank's experts have
    already summed the contributions of its whole ep group through the all-to-all. The mean over all
    data-parallel ranks (what dense weights get) is that average times this factor (1 / ep)."""
    return layout.dp_replicate * layout.expert_shard / layout.dp_size


def scale_expert_gradients(parameters: list[nn.Parameter], scale: float) -> None:
    if scale != 1.0:
        for param in parameters:
            if param.grad is not None:
                param.grad.mul_(scale)
