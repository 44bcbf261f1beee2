"""Initial weights without any rank holding the whole model.

The trainer builds the model on the meta device (shapes only), splits it (tensor, expert and data
parallelism), then allocates each rank's shards and fills them here. Every parameter is drawn whole
from a generator seeded with (run.seed, its name) and each rank keeps its own slice: one parameter is
transiently whole, never the model, and every layout (1 process, fsdp x 8, tp x ep x dp) starts from
the same numbers, which is what lets tests compare layouts step for step.
"""

import zlib

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor

WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")  # activation checkpointing, torch.compile


def canonical_name(name: str) -> str:
    """A parameter's name in the plain model, whatever wraps its block."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def parameter_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, seed: int) -> None:
    """Allocate the parameters of a meta-device model on `device` (its shards, if split) and initialise them
    with the model's own rules (initial_std)."""
    model.to_empty(device=device)
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            std = model.initial_std(module, name)  # the GrokForCausalLM's rule
            if std is None:
                whole = torch.ones(param.shape)
            else:
                full_name = canonical_name(f"{module_name}.{name}" if module_name else name)
                generator = torch.Generator().manual_seed(parameter_seed(seed, full_name))
                whole = torch.empty(param.shape).normal_(0.0, std, generator=generator)
            if isinstance(param, DTensor):  # keep this rank's slice, however the layouts nest
                whole = distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None).to_local()
                param.to_local().copy_(whole)
            else:
                param.copy_(whole)
        for buffer in module.buffers(recurse=False):  # state, not weights: the routing bias starts even
            buffer.zero_()
