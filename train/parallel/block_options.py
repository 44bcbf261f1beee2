"""What is applied to each transformer block before the model is split: activation checkpointing
(recompute a block's activations in the backward instead of keeping them) and torch.compile."""

import os
from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from ..config import TrainConfig


def use_persistent_compile_cache() -> None:
    """Inductor's compiled kernels and graphs go to a per-user cache that outlives /tmp cleanups and reboots
    (a TORCHINDUCTOR_CACHE_DIR of the user's own wins): a re-run loads them instead of compiling again."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # Importing parts of torch (flex attention among them) already writes inductor's /tmp default into the
    # environment, so a setdefault would never take: only that default, or nothing, is replaced.
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not current or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(persistent_compile_cache_dir())


def persistent_compile_cache_dir() -> Path:
    return Path.home() / ".cache" / "minicolossus" / "inductor"


def apply_block_options(model: nn.Module, config: TrainConfig, device: torch.device, one_graph: bool = False) -> None:
    """Activation checkpointing per block, and torch.compile: per block, or with one_graph (a single process,
    nothing hooked in between blocks) the whole model as one graph. One graph saves each block's call overhead
    and compiles the embedding, final norm and loss too (+4-8% a step at nanoGPT's shape on a CPU); under DDP,
    FSDP and DeepSpeed each block stays its own graph, so that their per-block hooks overlap communication
    with compute."""
    if config.parallel.compile:
        use_persistent_compile_cache()
        if device.type == "cpu":
            # Compiled graphs call their kernels from C++ rather than Python: on a CPU that per-kernel overhead
            # is a visible part of a small model's step (+1-3% at nanoGPT's shape).
            from torch._inductor import config as inductor_config  # only when compiling: not at every start-up

            inductor_config.cpp_wrapper = True
    whole_model = config.parallel.compile and one_graph and not config.parallel.activation_checkpointing
    blocks = model.model.layers  # a ModuleList, or a pipeline stage's ModuleDict: the same names either way
    for name, block in list(blocks.named_children()):
        if config.parallel.activation_checkpointing:
            block = checkpoint_wrapper(block)
        if config.parallel.compile and not whole_model:
            block.compile()
        blocks.register_module(name, block)
    if whole_model:
        model.compile()  # in place: parameter names and state_dict keys stay the plain model's
