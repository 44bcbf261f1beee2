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
from torch.autograd.function import FunctionCtx
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from transformers import Cache

from .config import GrokConfig


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """Grok's bound on logits: cap * tanh(x / cap); cap 0 leaves x alone."""
    return cap * torch.tanh(x / cap) if cap > 0 else x


def full_precision(x: torch.Tensor):
    """Region where autocast must not downcast: Grok computes norms, router and attention logits in fp32."""
    return torch.autocast(device_type=x.device.type, enabled=False)


class RMSNormFunction(torch.autograd.Function):
    """y = x * rsqrt(mean(x^2) + eps) * w in fp32. The backward is written out (autograd's takes ~twice the
    elementwise passes, which dominate a small model on a CPU). With n = x * r, r = rsqrt(mean(x^2) + eps):
    dw = sum_rows(dy * n); dx = r * (dy w - n * mean(dy w * n))."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, weight: torch.Tensor, eps: float):
        rstd = torch.rsqrt(x.square().mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, rstd, weight)
        if torch.compiler.is_compiling():
            # Out of place: torch 2.11's compiled autograd.Function silently gives zero gradients for an output
            # written in place or aliased (a no-op .to); inductor fuses the two products anyway.
            return x * rstd * weight
        return (x * rstd).mul_(weight)

    @staticmethod
    def backward(ctx: FunctionCtx, grad_y: torch.Tensor):
        x, rstd, weight = ctx.saved_tensors
        normed = x * rstd
        # summed over the leading dims in place, not flattened: a sequence-split DTensor cannot flatten its
        # split dim without a redistribution (torch 2.11 refuses it)
        grad_weight = (grad_y * normed).sum(dim=tuple(range(grad_y.dim() - 1)))
        grad_normed = grad_y * weight
        dot = (grad_normed * normed).mean(-1, keepdim=True)
        return grad_normed.addcmul_(normed, dot, value=-1.0).mul_(rstd), grad_weight, None


class RMSNorm(nn.Module):
    """Scale-only RMSNorm computed in fp32, output in the input's dtype (grok-1's hk_rms_norm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with full_precision(x):
            return RMSNormFunction.apply(x.float(), self.weight.float(), self.eps).to(x.dtype)


def rotary_tables(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape [B, 1, T, head_dim] for rotate-half RoPE over the full head dim.

    The sine's first half is negated here, once per forward, so that every layer's rotation is a roll:
    rotate_half(x) * sin == roll(x, head_dim / 2) * signed_sin, exactly (only signs move)."""
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    phase = position_ids.float()[:, None, :, None] * inv_freq  # [B, 1, T, head_dim/2]
    cos, sin = phase.cos(), phase.sin()
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)  # grok-1 tiles: halves share frequencies


# The tables as one opaque operator, so that torch.compile computes them once per forward: as plain ops,
# inductor fuses the pow and cos into every layer's rotary kernels and recomputes them per element in the
# backward (about 5% of a compiled step at nanoGPT's shape on a CPU). The copy of this file in an export, loaded
# with trust_remote_code into a process that has already imported it, finds the operator registered.
if not hasattr(torch.ops.minicolossus, "rotary_tables"):

    @torch.library.register_fake(torch.library.custom_op("minicolossus::rotary_tables", rotary_tables, mutates_args=()))
    def _rotary_tables_shapes(position_ids: torch.Tensor, head_dim: int, theta: float):
        shape = (position_ids.shape[0], 1, position_ids.shape[1], head_dim)
        return position_ids.new_empty(shape, dtype=torch.float32), position_ids.new_empty(shape, dtype=torch.float32)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """rotary_tables, computed once per forward even under torch.compile."""
    return torch.ops.minicolossus.rotary_tables(position_ids, head_dim, theta)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] (grok-1's rotate_half)."""
    x32 = x.float()
    if torch.compiler.is_compiling():
        # The same products on the two halves (bitwise the same result): inductor cannot vectorise the roll's
        # wrapped index, while eagerly the roll is the cheaper of the two.
        half = x.shape[-1] // 2
        x1, x2, c, s = x32[..., :half], x32[..., half:], cos[..., :half], signed_sin[..., half:]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)
    return (x32 * cos + x32.roll(x.shape[-1] // 2, dims=-1) * signed_sin).to(x.dtype)


@dataclass
class AttentionInputs:
    """What every layer's attention needs for one forward pass, built once by the model.

    Queries are the last `query_len` of `key_len` positions (the earlier ones come from the KV cache).
    `allowed` is None for plain causal attention, else a bool mask [B, 1, query_len, key_len]
    combining causality with key padding.
    """

    cos: torch.Tensor
    sin: torch.Tensor  # sign-folded: see rotary_cos_sin
    query_len: int
    key_len: int
    allowed: torch.Tensor | None
    block_mask: BlockMask | None  # flex only
    logit_bias: torch.Tensor | None = None  # eager only: 0 where allowed, -inf elsewhere, [B|1, 1, q, k]
    logit_temperature: torch.Tensor | None = None  # Grok-2's per-query factor [B|1, 1, q, 1]; None when off

    def to(self, device: torch.device | str | int, non_blocking: bool = False) -> "AttentionInputs":
        """These inputs on `device`: Accelerate calls this when a device_map puts blocks on several devices."""
        cos = self.cos.to(device, non_blocking=non_blocking)
        if cos is self.cos:  # already there (every block on one device)
            return self
        allowed = None if self.allowed is None else self.allowed.to(device, non_blocking=non_blocking)
        # flex's mask reads `allowed` through a closure: rebuild it around the moved tensor
        block_mask = (
            None if self.block_mask is None else flex_block_mask(allowed, self.query_len, self.key_len, cos.device)
        )
        bias, temperature = (
            None if t is None else t.to(device, non_blocking=non_blocking)
            for t in (self.logit_bias, self.logit_temperature)
        )
        return AttentionInputs(
            cos,
            self.sin.to(device, non_blocking=non_blocking),
            self.query_len,
            self.key_len,
            allowed,
            block_mask,
            bias,
            temperature,
        )


def causal_allowed(
    query_len: int, key_len: int, key_keep: torch.Tensor | None, device: torch.device | str
) -> torch.Tensor:
    """Bool mask [B|1, 1, query_len, key_len]: causal (bottom-right aligned) and not a padding key.

    Each query may always see itself, so a padding query never has an all-masked (NaN) row.
    """
    q_pos = torch.arange(key_len - query_len, key_len, device=device)[:, None]
    k_pos = torch.arange(key_len, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None]
    if key_keep is not None:
        allowed = (allowed & key_keep.bool()[:, None, None, :]) | (k_pos == q_pos)[None, None]
    return allowed


def flex_block_mask(
    allowed: torch.Tensor | None, query_len: int, key_len: int, device: torch.device | str
) -> BlockMask:
    """flex_attention's block-sparse mask: causal as a function of positions, or read from `allowed`."""
    if allowed is None:
        offset = key_len - query_len

        def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            return kv <= q + offset

        return create_block_mask(mask_mod, None, None, query_len, key_len, device=device)

    per_sequence = allowed.shape[0] > 1  # padding differs by sequence; else one mask for the batch

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return allowed[b if per_sequence else 0, 0, q, kv]

    return create_block_mask(
        mask_mod, allowed.shape[0] if per_sequence else None, None, query_len, key_len, device=device
    )


def eager_logit_bias(
    allowed: torch.Tensor | None, query_len: int, key_len: int, device: torch.device | str
) -> torch.Tensor:
    """0 where a query may attend, -inf elsewhere: added to the eager backend's logits."""
    keep = allowed if allowed is not None else causal_allowed(query_len, key_len, None, device)
    return torch.zeros(keep.shape, device=device).masked_fill_(~keep, float("-inf"))


def attention_temperature(position_ids: torch.Tensor, length: int) -> torch.Tensor | None:
    """Grok-2's factor on the soft-capped logits of each query: log2(p) / log2(length) at 0-based position
    p > length, 1 up to it (as xAI's published inference kernels apply it); None when length is 0."""
    if length <= 0:
        return None
    positions = position_ids.float()
    factor = torch.where(positions > length, torch.log2(positions.clamp(min=1)) / math.log2(length), 1.0)
    return factor[:, None, :, None]


def same_document(document_ids: torch.Tensor, query_len: int) -> torch.Tensor:
    """Bool mask [B, 1, query_len, key_len]: a query and a key of one document of a packed sequence."""
    return document_ids[:, None, -query_len:, None] == document_ids[:, None, None, :]


def flex_document_mask(document_ids: torch.Tensor, query_len: int, key_len: int) -> BlockMask:
    """flex_attention's causal block-diagonal mask, as a function of the document ids: blocks that straddle
    no document boundary are skipped whole or computed without a mask."""
    offset = key_len - query_len

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return (kv <= q + offset) & (document_ids[b, q + offset] == document_ids[b, kv])

    return create_block_mask(mask_mod, document_ids.shape[0], None, query_len, key_len, device=document_ids.device)


def make_attention_inputs(
    config: GrokConfig,
    position_ids: torch.Tensor,
    query_len: int,
    key_len: int,
    key_keep: torch.Tensor | None,
    document_ids: torch.Tensor | None = None,
) -> AttentionInputs:
    """What every layer's attention needs. `document_ids` [B, key_len], when given, keeps each token's
    attention inside its own document of a packed sequence (causal and block-diagonal)."""
    cos, sin = rotary_cos_sin(position_ids, config.head_dim, config.rope_theta)
    device = position_ids.device
    needs_mask = key_keep is not None or (query_len != key_len and query_len > 1) or document_ids is not None
    allowed = causal_allowed(query_len, key_len, key_keep, device) if needs_mask else None
    if document_ids is not None:
        allowed = allowed & same_document(document_ids, query_len)
    if config.attn_backend != "flex":
        block_mask = None
    elif document_ids is not None and key_keep is None:
        block_mask = flex_document_mask(document_ids, query_len, key_len)
    else:
        block_mask = flex_block_mask(allowed, query_len, key_len, device)
    # eager: one additive mask for every layer
    logit_bias = eager_logit_bias(allowed, query_len, key_len, device) if config.attn_backend == "eager" else None
    temperature = attention_temperature(position_ids, config.attn_temperature_len)
    return AttentionInputs(cos, sin, query_len, key_len, allowed, block_mask, logit_bias, temperature)


class SoftcappedAttention(torch.autograd.Function):
    """Grok's attention core in fp32: softmax(f * tanh(q k^T / (sqrt(d) cap)) + bias) v, where f is the cap,
    times Grok-2's per-query temperature when there is one (cap 0: no tanh, f = 1 or the temperature).

    tanh(x) = 2 sigmoid(2x) - 1, and a softmax ignores what is added to a whole row, so with
    g = sigmoid(2 q k^T / (sqrt(d) cap)) the probabilities are softmax(2 f g + bias): the same function, within
    fp32 rounding, without a tanh (a CPU's vectorised tanh costs ~10x its sigmoid). The backward is written out
    because autograd's would keep every intermediate and run ~twice the elementwise passes. With
    p = softmax(2 f g + bias): dv = p^T dout; dz = softmax_backward(dout v^T, p);
    ds = 4 f g (1 - g) dz / (sqrt(d) cap); dq = ds k; dk = ds^T q. Checked against autograd
    of the tanh form in float64 (tests/test_model.py)."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        logit_bias: torch.Tensor,
        cap: float,
        temperature: torch.Tensor | None,
    ):
        # scores -> g = sigmoid(2 s / cap) with the cap, else s; the factor then multiplies g (or s)
        scale = (2.0 / cap if cap > 0 else 1.0) / math.sqrt(q.shape[-1])
        scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
        if cap > 0:
            scores = scores.sigmoid_()
        factor = 2 * cap if cap > 0 else 1.0
        if temperature is not None:  # [B|1, 1, query_len, 1]
            factor = temperature * factor
            probs = torch.softmax(torch.addcmul(logit_bias, scores, factor), dim=-1)
        else:
            probs = torch.softmax(torch.add(logit_bias, scores, alpha=factor), dim=-1)
        ctx.save_for_backward(q, k, v, scores, probs, factor if temperature is not None else None)
        ctx.cap, ctx.scale, ctx.factor = cap, scale, factor if temperature is None else None
        return probs.to(v.dtype) @ v

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor):
        q, k, v, scores, probs, factor = ctx.saved_tensors
        factor = ctx.factor if factor is None else factor
        grad_v = probs.to(v.dtype).transpose(-1, -2) @ grad_out
        grad_probs = (grad_out @ v.transpose(-1, -2)).to(probs.dtype)
        grad_z = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype).mul_(factor * ctx.scale)
        grad_s = torch.ops.aten.sigmoid_backward(grad_z, scores) if ctx.cap > 0 else grad_z
        return grad_s @ k, grad_s.transpose(-1, -2) @ q, grad_v, None, None, None


def own_keys(
    k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs
) -> tuple[torch.Tensor, torch.Tensor, AttentionInputs]:
    """Attention.gather_keys in one process: every key of the sequence is already here. (Context parallelism,
    train/parallel/context.py, replaces it with a gather of the keys and values other ranks hold.)"""
    return k, v, inputs


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
        self.gather_keys = own_keys  # (k, v, inputs) -> the sequence's keys, values, and the inputs that fit them

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, cache: Cache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        # Head counts come from the projections' outputs: split over tensor-parallel ranks, each holds some heads.
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, inputs.cos, inputs.sin)
        k = apply_rotary(k, inputs.cos, inputs.sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        k, v, inputs = self.gather_keys(k, v, inputs)
        backend = {"eager": self._eager, "sdpa": self._sdpa, "flex": self._flex}[self.config.attn_backend]
        out = backend(q, k, v, inputs)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def _eager(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        with full_precision(q):
            bias = inputs.logit_bias
            if bias is None:  # inputs made for another backend
                bias = eager_logit_bias(inputs.allowed, inputs.query_len, inputs.key_len, q.device)
            return SoftcappedAttention.apply(
                q.float(), k.float(), v, bias, float(self.config.attn_logit_softcap), inputs.logit_temperature
            )

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        is_causal = inputs.allowed is None and inputs.query_len > 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=inputs.allowed, is_causal=is_causal, enable_gqa=True)

    def _flex(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        cap = self.config.attn_logit_softcap
        temperature = inputs.logit_temperature

        def score_mod(
            score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
        ) -> torch.Tensor:
            score = cap * torch.tanh(score / cap) if cap > 0 else score
            if temperature is not None:
                score = score * temperature[b if temperature.shape[0] > 1 else 0, 0, q_idx, 0]
            return score

        return flex_attention(
            q,
            k,
            v,
            score_mod=score_mod,
            block_mask=inputs.block_mask,
            scale=1.0 / math.sqrt(self.head_dim),
            enable_gqa=True,
        )
