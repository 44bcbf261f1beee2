"""RMSNorm, rotary embeddings and grouped-query attention with Grok's soft-capped logits.

Three interchangeable attention backends compute the same function:
  eager  reference math, fp32 logits, soft-cap, mask, softmax;
  sdpa   torch's fused scaled_dot_product_attention (cannot soft-cap, so only with cap 0);
  flex   torch flex_attention with the soft-cap as a score_mod (fused when compiled, on GPU).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .config import GrokConfig


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """Grok's bound on logits: cap * tanh(x / cap); cap 0 leaves x alone."""
    return cap * torch.tanh(x / cap) if cap > 0 else x


def full_precision(x: torch.Tensor):
    """Region where autocast must not downcast: Grok computes norms, router and attention logits in fp32."""
    return torch.autocast(device_type=x.device.type, enabled=False)


class RMSNorm(nn.Module):
    """Scale-only RMSNorm computed in fp32, output in the input's dtype (grok-1's hk_rms_norm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with full_precision(x):
            x32 = x.float()
            normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
            return (normed * self.weight.float()).to(x.dtype)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float):
    """cos/sin tables of shape [B, 1, T, head_dim] for rotate-half RoPE over the full head dim."""
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    phase = position_ids.float()[..., None] * inv_freq  # [B, T, head_dim/2]
    phase = torch.cat([phase, phase], dim=-1)[:, None]  # grok-1 tiles the phase: halves share frequencies
    return phase.cos(), phase.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


@dataclass
class AttentionInputs:
    """What every layer's attention needs for one forward pass, built once by the model.

    Queries are the last `query_len` of `key_len` positions (the earlier ones come from the KV cache).
    `allowed` is None for plain causal attention, else a bool mask [B, 1, query_len, key_len]
    combining causality with key padding.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    query_len: int
    key_len: int
    allowed: torch.Tensor | None
    block_mask: BlockMask | None  # flex only

    def to(self, device, non_blocking: bool = False) -> "AttentionInputs":
        """These inputs on `device`: Accelerate calls this when a device_map puts blocks on several devices."""
        cos = self.cos.to(device, non_blocking=non_blocking)
        if cos is self.cos:  # already there (every block on one device)
            return self
        allowed = None if self.allowed is None else self.allowed.to(device, non_blocking=non_blocking)
        # flex's mask reads `allowed` through a closure: rebuild it around the moved tensor
        block_mask = None if self.block_mask is None else flex_block_mask(allowed, self.query_len, self.key_len,
                                                                         cos.device)
        return AttentionInputs(cos, self.sin.to(device, non_blocking=non_blocking), self.query_len, self.key_len,
                               allowed, block_mask)


def causal_allowed(query_len: int, key_len: int, key_keep: torch.Tensor | None, device) -> torch.Tensor:
    """Bool mask [B|1, 1, query_len, key_len]: causal (bottom-right aligned) and not a padding key.

    Each query may always see itself, so a padding query never has an all-masked (NaN) row.
    """
    q_pos = torch.arange(key_len - query_len, key_len, device=device)[:, None]
    k_pos = torch.arange(key_len, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None]
    if key_keep is not None:
        allowed = (allowed & key_keep.bool()[:, None, None, :]) | (k_pos == q_pos)[None, None]
    return allowed


def flex_block_mask(allowed: torch.Tensor | None, query_len: int, key_len: int, device) -> BlockMask:
    """flex_attention's block-sparse mask: causal as a function of positions, or read from `allowed`."""
    if allowed is None:
        offset = key_len - query_len

        def mask_mod(b, h, q, kv):
            return kv <= q + offset
        return create_block_mask(mask_mod, None, None, query_len, key_len, device=device)

    per_sequence = allowed.shape[0] > 1  # padding differs by sequence; else one mask for the batch

    def mask_mod(b, h, q, kv):
        return allowed[b if per_sequence else 0, 0, q, kv]
    return create_block_mask(mask_mod, allowed.shape[0] if per_sequence else None, None, query_len, key_len,
                             device=device)


def make_attention_inputs(config: GrokConfig, position_ids, query_len, key_len, key_keep) -> AttentionInputs:
    cos, sin = rotary_cos_sin(position_ids, config.head_dim, config.rope_theta)
    device = position_ids.device
    needs_mask = key_keep is not None or (query_len != key_len and query_len > 1)
    allowed = causal_allowed(query_len, key_len, key_keep, device) if needs_mask else None
    block_mask = flex_block_mask(allowed, query_len, key_len, device) if config.attn_backend == "flex" else None
    return AttentionInputs(cos, sin, query_len, key_len, allowed, block_mask)


class Attention(nn.Module):
    """Grouped-query attention: num_attention_heads queries share num_key_value_heads keys/values."""

    def __init__(self, config: GrokConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        d, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.q_proj = nn.Linear(d, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, d, bias=False)
        self.o_proj.is_residual_projection = True  # initialised with a depth-scaled std

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        # Head counts come from the projections' outputs: split over tensor-parallel ranks, each holds some heads.
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, inputs.cos, inputs.sin)
        k = apply_rotary(k, inputs.cos, inputs.sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        backend = {"eager": self._eager, "sdpa": self._sdpa, "flex": self._flex}[self.config.attn_backend]
        out = backend(q, k, v, inputs)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def _eager(self, q, k, v, inputs: AttentionInputs) -> torch.Tensor:
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        cap = self.config.attn_logit_softcap
        with full_precision(q):
            # cap * tanh(qk / (sqrt(d) * cap)), with both divisions folded into q: q is T x d, logits T x T.
            q_scale = 1.0 / (math.sqrt(self.head_dim) * (cap if cap > 0 else 1.0))
            logits = (q.float() * q_scale) @ k.float().transpose(-1, -2)
            if cap > 0:
                logits = torch.tanh(logits) * cap
            allowed = inputs.allowed
            if allowed is None:
                allowed = causal_allowed(inputs.query_len, inputs.key_len, None, q.device)
            logits = logits.masked_fill_(~allowed, float("-inf"))  # tanh*cap made a fresh tensor
            probs = torch.softmax(logits, dim=-1)
        return probs.to(v.dtype) @ v

    def _sdpa(self, q, k, v, inputs: AttentionInputs) -> torch.Tensor:
        is_causal = inputs.allowed is None and inputs.query_len > 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=inputs.allowed, is_causal=is_causal,
                                              enable_gqa=True)

    def _flex(self, q, k, v, inputs: AttentionInputs) -> torch.Tensor:
        cap = self.config.attn_logit_softcap

        def score_mod(score, b, h, q_idx, kv_idx):
            return cap * torch.tanh(score / cap) if cap > 0 else score

        return flex_attention(q, k, v, score_mod=score_mod, block_mask=inputs.block_mask,
                              scale=1.0 / math.sqrt(self.head_dim), enable_gqa=True)
