"""Pipeline parallelism on torch.distributed.pipelining: the model's blocks cut into stages over the ranks of a
pp group, micro-batches flowing through them under a schedule.

  1f1b         one stage per rank (Narayanan et al. 2021)
  interleaved  parallel.pp_virtual_stages stages per rank, round-robin (Megatron-LM's interleaved 1F1B)
  zero-bubble  two stages per rank in a V, rank r holding stages r and 2pp-1-r (ScheduleZBVZeroBubble)
  dualpipev    the same V, DeepSeek's DualPipe schedule for it (ScheduleDualPipeV)

A stage holds whole blocks; the first also the embedding, the last the final norm, the output projection and
the loss. Blocks are placed so that the busiest stage is as light as it can be, the output projection counting
as the blocks its FLOPs are worth. Every stage keeps the whole model's parameter names (model.layers.5.attn...),
so checkpoints reshard between any layouts. With a tied embedding (Grok-1) the last stage holds a copy of it
whose gradient is summed with the first stage's before the update, so both copies stay equal.

The router's load-balancing and z losses are computed inside each stage. Each MoE layer's term is attached to its
block's output by an autograd function that hands the term gradient 1 in the backward (Megatron's
MoEAuxLossAutoScaler), so their gradients are one process's, while the schedule's loss function is the
language-model loss; the terms themselves are summed over the stages for the metrics.
"""

import copy
from collections.abc import Callable
from dataclasses import fields

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.autograd.function import FunctionCtx
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import PipelineStage, schedules
from torch.distributed.tensor import DTensor

from model import GrokForCausalLM, count_parameters
from model.attention import make_attention_inputs, softcap
from model.grok import GrokPreTrainedModel
from model.moe import RouterStats, router_loss

from .context import chunk_positions
from .mesh import WorldMesh
from .pipeline_plan import V_SHAPED, output_cost, rank_stages, stage_layer_counts, stages_per_rank


class RouterLossGradient(torch.autograd.Function):
    """Passes `hidden` through; in the backward, gives `router_loss` the gradient 1, as if it were added to the
    schedule's loss (the micro-batch's, weighted by its share of the step)."""

    @staticmethod
    def forward(ctx: FunctionCtx, hidden: torch.Tensor, router_loss: torch.Tensor) -> torch.Tensor:
        ctx.loss_shape, ctx.loss_dtype, ctx.loss_device = router_loss.shape, router_loss.dtype, router_loss.device
        return hidden.clone()  # not a view: the zero-bubble schedules detach the stage's tensors in place

    @staticmethod
    def backward(ctx: FunctionCtx, grad: torch.Tensor):
        return grad, torch.ones(ctx.loss_shape, dtype=ctx.loss_dtype, device=ctx.loss_device)


class StageModel(nn.Module):
    """One pipeline stage of a GrokForCausalLM, its parameters under the whole model's names. Its input is the
    token ids (first stage) or the residual stream; its output the residual stream or, last, the logits."""

    def __init__(self, whole: GrokForCausalLM, stage: int, stages: int, layers: list[int]):
        super().__init__()
        self.config = whole.config
        self.stage, self.first, self.last = stage, stage == 0, stage == stages - 1
        self.model = nn.Module()  # the names of GrokForCausalLM.model's parts
        self.model.layers = nn.ModuleDict({str(index): whole.model.layers[index] for index in layers})
        tied = whole.lm_head is None
        embed = whole.model.embed_tokens
        self.model.embed_tokens = embed if self.first else copy.deepcopy(embed) if self.last and tied else None
        self.model.norm = whole.model.norm if self.last else None
        self.lm_head = whole.lm_head if self.last else None
        self.next_token_loss = whole.next_token_loss  # tensor parallelism replaces it, as on the whole model
        self.moe_layers = whole.config.num_hidden_layers if whole.config.is_moe else 0
        self.sequence_shards = 1  # tensor parallelism: the residual stream between blocks holds 1/tp of the tokens
        self.cp_rank, self.cp_size = 0, 1  # context parallelism: which chunks of each sequence the tokens are
        self.loss_weight = 1.0  # a micro-batch's share of the step's loss: 1 / micro-batches a step
        self.router_records: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def initial_std(self, module: nn.Module, name: str) -> float | None:
        return GrokPreTrainedModel.initial_std(self, module, name)  # the whole model's rule (reads self.config)

    def positions(self, local_len: int, device: torch.device) -> torch.Tensor:
        if self.cp_size == 1:
            return torch.arange(local_len, device=device)[None]
        return chunk_positions(self.cp_rank, self.cp_size, local_len * self.cp_size, device)[None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        config = self.config
        if self.first:
            local_len = x.shape[1]
            h = self.model.embed_tokens(x) * config.embedding_multiplier
        else:
            local_len = x.shape[1] * self.sequence_shards
            h = x
        positions = self.positions(local_len, h.device)
        inputs = make_attention_inputs(config, positions, local_len, local_len, None)
        for index, block in self.model.layers.items():
            h, stats = block(h, inputs)
            if stats is not None:
                layer_loss = router_loss(config, stats.aux_loss, stats.z_loss, stats.seq_aux_loss)
                h = RouterLossGradient.apply(h, layer_loss * self.loss_weight / self.moe_layers)
                self.router_records.append(
                    (int(index), RouterStats(*(getattr(stats, f.name).detach() for f in fields(stats))))
                )
        if not self.last:
            return h
        h = self.model.norm(h) * config.output_multiplier
        logits = self.model.embed_tokens(h, as_output=True) if self.lm_head is None else self.lm_head(h)
        return softcap(logits, config.final_logit_softcap)


def split_into_stages(
    whole: GrokForCausalLM, pp_rank: int, pp: int, schedule: str, virtual_stages: int | None, seq_len: int
) -> list[StageModel]:
    """This pipeline rank's stages of `whole` (on the meta device: each is split further and allocated later)."""
    stages = pp * stages_per_rank(schedule, virtual_stages)
    extra = output_cost(whole.config, count_parameters(whole).active, seq_len)
    counts = stage_layer_counts(whole.config.num_hidden_layers, stages, extra)
    starts = [sum(counts[:index]) for index in range(stages)]
    return [
        StageModel(whole, index, stages, list(range(starts[index], starts[index] + counts[index])))
        for index in rank_stages(pp_rank, pp, schedule, virtual_stages)
    ]


class Pipeline:
    """This rank's stages (`parts`, the split and wrapped StageModels) under a schedule: a training step over the
    micro-batches (`micro_batches` a step, in passes of `pass_size`), a forward-only pass for evaluation, and the
    tied embedding's gradient sum."""

    def __init__(
        self,
        parts: list[nn.Module],
        stages: int,
        schedule: str,
        micro_batches: int,
        pass_size: int,
        group: dist.ProcessGroup,
        tie_group: dist.ProcessGroup | None,
        device: torch.device,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ):
        self.parts, self.stages, self.group, self.tie_group = parts, stages, group, tie_group
        self.pp, self.pp_rank = dist.get_world_size(group), dist.get_rank(group)
        self.by_stage = {part.stage: part for part in parts}
        self.holds_first, self.holds_last = 0 in self.by_stage, stages - 1 in self.by_stage
        self.loss_fn, self.v_shaped = loss_fn, schedule in V_SHAPED
        self.micro_batches, self.passes = micro_batches, micro_batches // pass_size
        self.lm_losses: list[torch.Tensor] = []  # each micro-batch's, as the last stage computed it
        for part in parts:
            part.loss_weight = 1 / micro_batches
        pipeline_stages = [PipelineStage(part, part.stage, stages, device, group=group) for part in parts]

        def schedule_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            # Weighted here, not by the schedule (scale_grads=False), which would divide the gradients that
            # earlier passes accumulated again: the step's gradient is the mean over its micro-batches, as
            # without pp. (A new tensor, not a view: the zero-bubble schedules detach the loss in place.)
            loss = loss_fn(logits, targets)
            self.lm_losses.append(loss.detach())
            return loss / micro_batches

        options = dict(loss_fn=schedule_loss, scale_grads=False)
        if schedule == "1f1b":
            self.schedule = schedules.Schedule1F1B(pipeline_stages[0], pass_size, **options)
        else:
            kind = {
                "interleaved": schedules.ScheduleInterleaved1F1B,
                "zero-bubble": schedules.ScheduleZBVZeroBubble,
                "dualpipev": schedules.ScheduleDualPipeV,
            }[schedule]
            self.schedule = kind(pipeline_stages, pass_size, **options)
        config = parts[0].config
        self.router_shape = (config.num_hidden_layers, config.num_local_experts) if config.is_moe else (0, 0)
        self.config = config
        self.tied = config.tie_word_embeddings

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of every micro-batch, pass after pass. Returns this rank's part of the step's sums
        over micro-batches (loss, lm_loss, aux_loss, z_loss, seq_aux_loss, dropped: summed over the pp group they
        are the whole model's) and of the experts' token counts per layer."""
        rows = inputs.shape[0] // self.passes
        for first in range(0, inputs.shape[0], rows):
            # contiguous: the loader's windows are views of a wider buffer, and torch 2.11's schedules check that
            # every micro-batch has the strides the first one had
            args = (inputs[first : first + rows].contiguous(),) if self.holds_first else ()
            kwargs = {"target": targets[first : first + rows].contiguous()} if self.holds_last else {}
            self.schedule.step(*args, **kwargs)
        # the schedule's first step infers the shapes of the stages' outputs and gradients with a pass of its own,
        # through the loss too (on empty tensors): those come first, and are not the step's
        losses, self.lm_losses = self.lm_losses[len(self.lm_losses) - self.micro_batches :], []
        lm_loss = torch.stack(losses).sum().float() if losses else torch.zeros((), device=inputs.device)
        return self.router_sums(lm_loss)

    def router_sums(self, lm_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = lm_loss.device
        router = torch.zeros(4, device=device)  # aux_loss, z_loss, seq_aux_loss: each a mean over layers; dropped
        counts = torch.zeros(self.router_shape, dtype=torch.long, device=device)
        layers = max(self.router_shape[0], 1)
        for part in self.parts:
            # The schedule's first step first infers the stages' shapes with a forward of its own (on empty
            # tensors, past the first stage): its records come first, and are not the step's.
            expected = self.micro_batches * sum(1 for _ in part.model.layers.children()) * (self.router_shape[0] > 0)
            for index, stats in part.router_records[-expected:] if expected else ():
                losses = torch.stack([stats.aux_loss, stats.z_loss, stats.seq_aux_loss]).detach().float() / layers
                router += torch.cat([losses, stats.dropped.detach().float().view(1)])
                counts[index] += stats.expert_token_counts.detach()
            part.router_records.clear()
        aux, z, seq_aux, dropped = router
        loss = lm_loss + router_loss(self.config, aux, z, seq_aux)
        return torch.stack([loss, lm_loss, aux, z, seq_aux, dropped]), counts

    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """The language-model loss of one batch, forward only, stage after stage (evaluation has no micro-batches
        to overlap): on the ranks that hold the last stage; None on the others."""
        hidden, loss = inputs, None
        for stage in range(self.stages):
            part = self.by_stage.get(stage)
            if part is None:
                continue
            if stage > 0 and stage - 1 not in self.by_stage:
                hidden = self._receive(self._owner(stage - 1), hidden.device)
            hidden = part(hidden)
            part.router_records.clear()
            if stage == self.stages - 1:
                loss = self.loss_fn(hidden, targets)
            elif stage + 1 not in self.by_stage:
                self._send(hidden, self._owner(stage + 1))
        for module in (module for part in self.parts for module in part.modules()):
            if isinstance(module, FSDPModule):
                module.reshard()  # they stay gathered after a forward under pp; training regathers them anyway
        return loss

    def _owner(self, stage: int) -> int:
        """The pp rank holding `stage`: round-robin, or down and back up a V."""
        if self.v_shaped and stage >= self.pp:
            return 2 * self.pp - 1 - stage
        return stage % self.pp

    def _send(self, tensor: torch.Tensor, pp_rank: int) -> None:
        peer = dist.get_global_rank(self.group, pp_rank)
        header = torch.tensor([tensor.dim(), *tensor.shape], dtype=torch.long, device=tensor.device)
        dist.send(torch.tensor([header.numel()], device=tensor.device), peer)
        dist.send(header, peer)
        dist.send(tensor.contiguous().float(), peer)

    def _receive(self, pp_rank: int, device: torch.device) -> torch.Tensor:
        peer = dist.get_global_rank(self.group, pp_rank)
        size = torch.zeros(1, dtype=torch.long, device=device)
        dist.recv(size, peer)
        header = torch.zeros(int(size), dtype=torch.long, device=device)
        dist.recv(header, peer)
        tensor = torch.empty(header[1:].tolist(), device=device)
        dist.recv(tensor, peer)
        return tensor

    def sum_tied_embedding_gradients(self) -> None:
        """The first stage's embedding and the last stage's copy (the tied output projection) each got part of
        the gradient: both get the sum, so that one update keeps them equal."""
        if not self.tied:
            return
        weights = [part.model.embed_tokens.weight for part in self.parts if part.model.embed_tokens is not None]
        grads = []
        for weight in weights:
            if weight.grad is None:
                continue
            if isinstance(weight.grad, DTensor) and weight.grad.placements != weight.placements:
                # tensor parallelism: the lookup's gradient may come back partial; the copies must match shard for shard
                weight.grad = weight.grad.redistribute(weight.device_mesh, weight.placements)
            grads.append(local_tensor(weight.grad))
        if len(grads) == 2:  # both on this rank (rank 0 of a V-shaped schedule)
            grads[0].add_(grads[1])
            grads[1].copy_(grads[0])
        elif len(grads) == 1 and self.tie_group is not None:
            dist.all_reduce(grads[0], group=self.tie_group)

    def norm_parameters(self, parameters: list[nn.Parameter]) -> list[nn.Parameter]:
        """The parameters whose gradients make the model's norm: the last stage's copy of a tied embedding is the
        first stage's parameter again, counted once."""
        copies = {
            id(part.model.embed_tokens.weight) for part in self.parts if self.tied and part.last and not part.first
        }
        return [param for param in parameters if id(param) not in copies]


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def tied_embedding_group(mesh: WorldMesh, tied: bool) -> dist.ProcessGroup | None:
    """The two ranks of each pipeline that hold its first and last stage (and so the two copies of a tied
    embedding), as one process group; None for the other ranks, or when nothing is tied across ranks. Every
    rank takes part in making every group."""
    if not tied or mesh.layout.pp == 1:
        return None
    pipelines = mesh.dense.mesh.reshape(mesh.layout.pp, -1).T.tolist()  # a column: one pipeline, stage by stage
    group, _ = dist.new_subgroups_by_enumeration([[ranks[0], ranks[-1]] for ranks in pipelines])
    return group
