"""Tensor parallelism (Megatron-style, with DTensor parallel styles): each matmul split over the ranks
of a tp group, which sit on one node's fast links.

Per block: q/k/v column-wise (each rank computes some heads; the model reads head counts from its
tensors), o row-wise; the GeGLU gate/up column-wise and down row-wise (a dense FFN and Grok-2's shared
FFN). Between them the residual stream is split over the sequence (sequence parallelism): the four
sandwich norms run on 1/tp of the tokens each, and the all-reduce of plain TP becomes a reduce-scatter
after each row-wise matmul and an all-gather before each column-wise one.

The tied embedding is split over the vocabulary: as input embedding each rank looks up the ids in its
rows and the partial sums are reduce-scattered to sequence shards; as output projection each rank
computes the logits of its slice of the vocabulary, and the loss is computed on those slices
(`loss_parallel`) without ever gathering B x T x V logits. An untied lm_head (Grok-2) is split the same
way, column-wise over the vocabulary.

Routed experts are not split: the router and experts see the whole micro-batch on every rank of the
group (the same routing, so the router statistics are exactly one process's), and each rank keeps its
sequence shard of the result. For MoE layers, expert parallelism is the way to split the work.
"""

import contextlib

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from model.grok import next_token_loss


class TiedEmbeddingParallel(ParallelStyle):
    """The embedding / output projection split over vocabulary rows (see the module's docstring)."""

    def _partition(self, name: str, module: nn.Module, mesh: DeviceMesh):
        weight = nn.Parameter(distribute_tensor(module.weight.data, mesh, [Shard(0)], src_data_rank=None))
        module.register_parameter("weight", weight)

    @staticmethod
    def _prepare_input(module: nn.Module, inputs: tuple, mesh: DeviceMesh):
        x, *rest = inputs
        if not isinstance(x, DTensor):  # token ids, the same on every rank of the group
            x = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        else:  # hidden states, sequence-split by the final norm: every rank needs all positions
            x = x.redistribute(placements=[Replicate()])
        return (x, *rest)

    @staticmethod
    def _prepare_output(module: nn.Module, output: DTensor, mesh: DeviceMesh):
        if any(placement.is_partial() for placement in output.placements):  # looked-up rows: sum and split
            return output.redistribute(placements=[Shard(1)]).to_local()
        return output  # logits sharded over the vocabulary, for loss_parallel

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, mesh, self._partition, self._prepare_input, self._prepare_output)


def _ffn_plan(prefix: str) -> dict:
    return {
        prefix: PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        f"{prefix}.w_gate": ColwiseParallel(),
        f"{prefix}.w_up": ColwiseParallel(),
        f"{prefix}.w_down": RowwiseParallel(output_layouts=Shard(1)),
    }


def block_plan(block: nn.Module) -> dict:
    plan = {
        "attn_norm_in": SequenceParallel(),
        "attn": PrepareModuleInput(
            input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None)
        ),
        "attn.q_proj": ColwiseParallel(),
        "attn.k_proj": ColwiseParallel(),
        "attn.v_proj": ColwiseParallel(),
        "attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
        "attn_norm_out": SequenceParallel(use_local_output=True),  # the residual stream stays plain tensors
        "ffn_norm_in": SequenceParallel(),
        "ffn_norm_out": SequenceParallel(use_local_output=True),
    }
    ffn = block.ffn
    if ffn.dense is not None:
        plan.update(_ffn_plan("ffn.dense"))
    if ffn.shared is not None:
        plan.update(_ffn_plan("ffn.shared"))
    if ffn.moe is not None:
        plan["ffn.moe"] = PrepareModuleInputOutput(
            input_layouts=(Shard(1),),
            desired_input_layouts=(Replicate(),),
            use_local_input=True,
            output_layouts=(Replicate(), None),
            desired_output_layouts=(Shard(1), None),
            use_local_output=True,
        )
    return plan


def vocab_parallel_loss(logits: torch.Tensor, targets: torch.Tensor):
    """The model's loss on vocabulary-split logits (under loss_parallel, see forward_context), returned as
    the plain tensor it is on every rank, so the router losses add to it as in one process."""
    loss = next_token_loss(logits, targets)
    return loss.to_local() if isinstance(loss, DTensor) else loss


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Split a GrokForCausalLM (or a pipeline stage of one) over tp_mesh in place, before activation
    checkpointing and FSDP wrap it."""
    ends = {"embed_tokens": TiedEmbeddingParallel(), "norm": SequenceParallel()}  # a pipeline stage may lack them
    parallelize_module(model.model, tp_mesh, {name: ends[name] for name in ends if getattr(model.model, name)})
    if model.lm_head is not None:  # vocabulary-split logits for loss_parallel, from the sequence-split norm
        parallelize_module(
            model,
            tp_mesh,
            {"lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False)},
        )
    for block in model.model.layers.children():  # a pipeline stage's are a ModuleDict
        parallelize_module(block, tp_mesh, block_plan(block))
    model.next_token_loss = vocab_parallel_loss


def forward_context(tensor_parallel: bool):
    """Around forward and backward: the vocabulary-parallel cross-entropy when the logits are split."""
    return loss_parallel() if tensor_parallel else contextlib.nullcontext()
