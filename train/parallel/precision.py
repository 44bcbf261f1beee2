"""Precision, decided in one place: the compute dtype, and how it is applied.

On GPU the default is bf16 compute with fp32 master weights and fp32 gradient reduction: FSDP gathers
its parameters in bf16 through its MixedPrecisionPolicy, and every strategy runs the step under bf16
autocast (the only cast none / ddp get, whose weights stay fp32), while the model keeps its norms,
router and attention logits in fp32 regions of its own. CPUs mostly lack bf16 units, so CPU runs are
fp32 throughout.
"""

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy

from ..config import TrainConfig


def compute_dtype(config: TrainConfig, use_cuda: bool) -> torch.dtype:
    """precision.dtype resolved: "auto" is bf16 on GPU, fp32 on CPU (no bf16 units on most CPUs)."""
    if config.precision.dtype == "bf16" or (config.precision.dtype == "auto" and use_cuda):
        return torch.bfloat16
    return torch.float32


def fsdp_policy(dtype: torch.dtype) -> MixedPrecisionPolicy:
    """Parameters gathered in the compute dtype, gradients reduced in fp32."""
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
