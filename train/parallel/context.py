"""Context parallelism, as Llama 3 trained at long context: the ranks of a cp group share each sequence.

Each sequence is cut into 2 x cp chunks and rank r of the group keeps chunks r and 2cp-1-r, a head and a
tail: under the causal mask an early chunk attends to few keys and its mirror to many, so every rank does
the same attention work. Queries stay where they are. Before attention, each layer all-gathers the keys and
values of the group (after RoPE, which each rank applied at its tokens' true positions); the backward
reduce-scatters their gradients to the chunks' owners. The mask is by true position: a key is visible to a
query when its position is not later. Everything else in a block (norms, projections, experts) takes the
tokens one at a time and needs nothing.

Every rank of a group has as many tokens as the others, so the mean of the ranks' mean losses is the whole
sequence's mean loss, and FSDP, which averages gradients over dp_shard x cp, gives its gradient. The
router's load-balancing loss is a product of two means over the tokens (Switch: E sum_e f_e P_e): the
counts f_e are summed over the group before the product, so that each rank's term, averaged, is the
whole sequence's loss and gradient (the z-loss is a plain mean and needs nothing).
"""

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.autograd.function import FunctionCtx
from torch.distributed.device_mesh import DeviceMesh

from model.attention import Attention, AttentionInputs, flex_block_mask
from model.moe import MoE

from .mesh import Layout


def chunk_positions(cp_rank: int, cp_size: int, seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The positions of the tokens rank `cp_rank` keeps of a `seq_len` sequence: its head chunk, then its tail."""
    chunk = seq_len // (2 * cp_size)
    head = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    tail_start = (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([head, torch.arange(tail_start, tail_start + chunk, device=device)])


class SequenceChunks:
    """What the trainer's step and validation hand the model under context parallelism: this rank's chunks
    of each sequence, the targets that go with them and their true positions (for RoPE)."""

    def __init__(self, cp_rank: int, cp_size: int):
        self.cp_rank, self.cp_size = cp_rank, cp_size

    def __call__(
        self, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        positions = chunk_positions(self.cp_rank, self.cp_size, inputs.shape[1], inputs.device)
        return inputs[:, positions], targets[:, positions], positions[None]


def whole_sequence(inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
    """Without context parallelism: every token, at positions 0.. (the model's default)."""
    return inputs, targets, None


def sequence_split(layout: Layout, rank: int) -> SequenceChunks | Callable:
    """(inputs, targets) -> (this rank's inputs, targets, positions or None), for this rank of `layout`."""
    return SequenceChunks(layout.cp_rank(rank), layout.cp) if layout.cp > 1 else whole_sequence


# torch 2.13 renamed the single-tensor collectives (the old names warn); 2.11 has only the old ones.
ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherSequence(torch.autograd.Function):
    """[..., chunk, D] on each rank -> [..., cp x chunk, D], rank 0's chunk first; the backward sums the
    gradients of every rank's copy and keeps this rank's part (a reduce-scatter)."""

    @staticmethod
    def forward(ctx: FunctionCtx, local: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        rows = local.movedim(dim, 0).contiguous()  # collectives gather along the first dimension
        gathered = rows.new_empty(dist.get_world_size(group) * rows.shape[0], *rows.shape[1:])
        ALL_GATHER(gathered, rows, group=group)
        return gathered.movedim(0, dim)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: torch.Tensor):
        rows = grad.movedim(ctx.dim, 0).contiguous()
        mine = rows.new_empty(rows.shape[0] // dist.get_world_size(ctx.group), *rows.shape[1:])
        REDUCE_SCATTER(mine, rows, group=ctx.group)
        return mine.movedim(0, ctx.dim), None, None


class GatheredKeys:
    """Attention.gather_keys over a cp group: the keys and values of the whole sequence, and attention inputs
    whose mask compares true positions (this rank's queries against every rank's keys, in gather order)."""

    def __init__(self, group: dist.ProcessGroup, backend: str):
        self.group, self.backend = group, backend
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.masks: dict[tuple, tuple] = {}  # (local length, device) -> (allowed, logit bias, flex block mask)

    def __call__(
        self, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionInputs]:
        keys_and_values = _GatherSequence.apply(torch.stack([k, v]), 3, self.group)  # one collective for both
        allowed, bias, block_mask = self.mask(k.shape[2], k.device)
        gathered = replace(
            inputs,
            query_len=k.shape[2],
            key_len=keys_and_values.shape[3],
            allowed=allowed,
            logit_bias=bias,
            block_mask=block_mask,
        )
        return keys_and_values[0], keys_and_values[1], gathered

    def mask(self, local_len: int, device: torch.device) -> tuple:
        key = (local_len, str(device))
        if key not in self.masks:
            seq_len = local_len * self.size
            queries = chunk_positions(self.rank, self.size, seq_len, device)
            keys = torch.cat([chunk_positions(rank, self.size, seq_len, device) for rank in range(self.size)])
            allowed = (keys[None, :] <= queries[:, None])[None, None]  # [1, 1, local, whole]
            bias = torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, float("-inf"))
            block_mask = flex_block_mask(allowed, local_len, seq_len, device) if self.backend == "flex" else None
            self.masks[key] = (allowed, bias if self.backend == "eager" else None, block_mask)
        return self.masks[key]


class GroupTokenCounts:
    """MoE.count_tokens over a cp group: the experts' token counts of the whole sequence."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group

    def __call__(self, counts: torch.Tensor) -> torch.Tensor:
        counts = counts.clone()
        dist.all_reduce(counts, group=self.group)
        return counts


def apply_context_parallel(model: nn.Module, cp_mesh: DeviceMesh) -> None:
    """Every attention layer gathers the group's keys and values; every MoE balances over the group's tokens."""
    group = cp_mesh.get_group()
    for module in model.modules():
        if isinstance(module, Attention):
            module.gather_keys = GatheredKeys(group, module.config.attn_backend)
        elif isinstance(module, MoE):
            module.count_tokens = GroupTokenCounts(group)
