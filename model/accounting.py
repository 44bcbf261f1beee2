"""Parameter counts and training FLOPs per token, the numbers behind MFU and the planner."""

from dataclasses import dataclass

import torch.nn as nn

from .config import GrokConfig
from .moe import MoE


@dataclass
class ParamCounts:
    total: int  # every parameter (the tied embedding once)
    active: int  # parameters one token uses: routed experts count top_k / num_experts of theirs

    @property
    def expert(self) -> int:
        return self.total - self.active


def count_parameters(model: nn.Module) -> ParamCounts:
    """Counts from the module itself (works on the meta device).

    The tied embedding is counted once in both totals: the lookup is free, but the same matrix is
    the output projection, a real matmul every token pays for. With an untied lm_head (Grok-2) the
    embedding is not active: the lm_head is that matmul.
    """
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for module in model.modules():
        if getattr(module, "lm_head", None) is not None:
            inactive += module.model.embed_tokens.weight.numel()
        if isinstance(module, MoE):
            expert_params = module.w_gate.numel() + module.w_up.numel() + module.w_down.numel()
            inactive += expert_params * (module.num_experts - module.top_k) // module.num_experts
    return ParamCounts(total=total, active=total - inactive)


def flops_per_token(config: GrokConfig, params_active: int, seq_len: int | None = None) -> int:
    """Training FLOPs per token: 6 * N_active + 12 * L * H * Q * T (PaLM appendix B, as nanoGPT/torchtitan).

    6N is forward+backward of the matmuls; the second term is attention's QK^T and AV over a causal
    context of T tokens (counted as full T, as the references do).
    """
    seq_len = seq_len or config.max_position_embeddings
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6 * params_active + attention
