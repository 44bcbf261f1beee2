"""Auxiliary-loss-free expert balancing (DeepSeek-V3), applied from outside the model.

After every optimizer step, each MoE layer's routing bias moves toward an even load:
b_e += router_bias_update_rate * sign(mean load - load_e). The load is that of the whole global batch: the
token counts summed over the step's micro-batches and over every rank (data, expert, context and pipeline
parallel ranks see different tokens; tensor-parallel replicas count the same tokens again, which scales every
expert's load alike and changes no sign). So every rank applies the same update to the same bias, and a run's
biases do not depend on its layout or its gradient accumulation. The biases are the MoE modules' `expert_bias`
buffers: checkpoints save and restore them with the model, and exports carry them.
"""

import re

import torch
import torch.nn as nn

LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class ExpertBias:
    def __init__(self, models: list[nn.Module], rate: float, layers: int, holders: int):
        """`models`: this rank's model, or its pipeline stages; `holders`: how many ranks hold each layer (the
        world size over the pipeline stages)."""
        self.rate, self.layers, self.holders = rate, layers, holders
        self.biases: dict[int, torch.Tensor] = {}  # global layer index -> this rank's buffer of it
        for model in models:
            for name, module in model.named_modules():
                bias = getattr(module, "expert_bias", None)
                found = LAYER.search(name + ".")
                if isinstance(bias, torch.Tensor) and found:
                    self.biases[int(found.group(1))] = bias

    def update(self, load: torch.Tensor) -> None:
        """One optimizer step's update, from the global [layers, experts] token counts."""
        load = load.double()
        with torch.no_grad():
            for layer, bias in self.biases.items():
                bias.add_(torch.sign(load[layer].mean() - load[layer]).to(bias.dtype), alpha=self.rate)

    def local_rows(self, experts: int, device: torch.device) -> torch.Tensor:
        """[layers, experts]: this rank's biases divided by the ranks that hold them, zeros elsewhere: summed over
        every rank, the whole model's biases."""
        rows = torch.zeros(self.layers, experts, dtype=torch.float64, device=device)
        for layer, bias in self.biases.items():
            rows[layer] = bias.double() / self.holders
        return rows
