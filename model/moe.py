"""Grok's feed-forward: GeGLU experts behind a top-k softmax router.

Each token is computed only by the experts it is routed to: assignments are sorted by expert, the
experts run as grouped matmuls (one kernel for all of them, each on its contiguous slice), and the
results are scattered back weighted by their gates. There is no dense all-experts computation.

`MoE.dispatch` is the one seam for expert parallelism: it takes the token rows sorted by expert and
returns the expert outputs in the same order. Here the experts are local; a trainer that spreads them
over ranks replaces it (train/parallel/expert.py) without the model knowing. `MoE.count_tokens` is the seam
for context parallelism, whose ranks share each sequence and so the load-balancing loss's token counts.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx

from .attention import full_precision, softcap
from .config import GrokConfig

# gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2 / pi) (g + a g^3))) = g * sigmoid(GELU_TANH_SCALE (g + GELU_A g^3))
GELU_TANH_SCALE = 2.0 * math.sqrt(2.0 / math.pi)
GELU_A = 0.044715


def at_least_fp32(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


class GatedGelu(torch.autograd.Function):
    """gelu_tanh(gate) * up, the GeGLU's activation, computed in fp32 through the identity
    0.5 (1 + tanh(u)) = sigmoid(2u): the same function (within 1e-6 of F.gelu's tanh form, as close as that is to
    the exact value), but a CPU's vectorised tanh costs ~10x its sigmoid and dominated the step of a small model.
    With s = sigmoid(z), z = c (g + a g^3): d/dup = g s; d/dgate = up (s + g s (1 - s) c (1 + 3 a g^2)).
    Only gate and up are kept for the backward: s is recomputed (cheap), not stored. In-place steps: on a CPU
    each fresh temporary of this size costs more in page faults than the arithmetic done in it."""

    @staticmethod
    def forward(ctx: FunctionCtx, gate: torch.Tensor, up: torch.Tensor):
        ctx.save_for_backward(gate, up)
        g = gate.to(at_least_fp32(gate))
        if torch.compiler.is_compiling():  # out of place, and no alias: see RMSNormFunction.forward
            out = gelu_sigmoid(g) * g * up
            return out if out.dtype == up.dtype else out.to(up.dtype)
        return gelu_sigmoid(g).mul_(g).mul_(up).to(up.dtype)

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor):
        gate, up = ctx.saved_tensors
        g, grad = gate.to(at_least_fp32(gate)), grad_out.to(at_least_fp32(gate))
        s = gelu_sigmoid(g)
        grad_up = (grad * g).mul_(s)
        dz_dg = (g * g).mul_(3 * GELU_A).add_(1.0).mul_(GELU_TANH_SCALE)
        slope = torch.sub(1.0, s).mul_(s).mul_(g).mul_(dz_dg).add_(s)  # s + g s (1 - s) dz/dg
        return slope.mul_(grad).mul_(up).to(gate.dtype), grad_up.to(up.dtype)


def gelu_sigmoid(g: torch.Tensor) -> torch.Tensor:
    """sigmoid(c (g + a g^3)), so that gelu_tanh(g) = g * this."""
    return (g * g).mul_(g).mul_(GELU_A).add_(g).mul_(GELU_TANH_SCALE).sigmoid_()


def gated_gelu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return GatedGelu.apply(gate, up)


def geglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor):
    """grok-1's expert: W1(gelu_tanh(x W) * (x V)) with W=w_gate, V=w_up, W1=w_down."""
    return gated_gelu(x @ w_gate, x @ w_up) @ w_down


def _grouped_mm_fits(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """grouped_mm needs every row stride to be a multiple of 16 bytes (so hidden and expert sizes that are
    multiples of 4 in fp32, of 8 in bf16); other shapes take the per-expert loop, which computes the same."""
    return (
        all(w.shape[-1] * w.element_size() % 16 == 0 and w.shape[-2] * w.element_size() % 16 == 0 for w in weights)
        and x.shape[-1] * x.element_size() % 16 == 0
    )


def grouped_geglu(
    x: torch.Tensor, counts: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """Every expert's GeGLU on its slice of x: rows [0, counts[0]) go to expert 0, the next counts[1] rows to
    expert 1, and so on (counts may hold zeros). Bitwise equal to geglu() on each slice."""
    if torch.is_autocast_enabled(x.device.type):  # grouped_mm is not on autocast's list: cast as it would
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w_gate, w_up, w_down = (t.to(dtype) for t in (x, w_gate, w_up, w_down))
    if not _grouped_mm_fits(x, w_gate, w_up, w_down):
        return torch.cat(
            [geglu(chunk, w_gate[e], w_up[e], w_down[e]) for e, chunk in enumerate(x.split(counts.tolist()))]
        )
    ends = counts.cumsum(0).to(torch.int32)  # grouped_mm's offsets: where each expert's rows end
    if x.dtype != torch.bfloat16 and torch.compiler.is_compiling():
        return _grouped_geglu_uncompiled(x, ends, w_gate, w_up, w_down)
    return _grouped_geglu(x, ends, w_gate, w_up, w_down)


def _grouped_geglu(x: torch.Tensor, ends: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor):
    hidden = gated_gelu(F.grouped_mm(x, w_gate, offs=ends), F.grouped_mm(x, w_up, offs=ends))
    return F.grouped_mm(hidden, w_down, offs=ends)


# torch.compile traces grouped_mm with a shape check that admits only bf16 (torch 2.13), while the eager kernel
# also runs fp32 (CPU): a compiled fp32 block runs its experts eagerly, the rest of the block compiled.
_grouped_geglu_uncompiled = torch.compiler.disable(_grouped_geglu)


def local_dispatch(
    routed: torch.Tensor, counts: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """All experts live in this process: compute them where the tokens are."""
    return grouped_geglu(routed, counts, w_gate, w_up, w_down)


class DenseFFN(nn.Module):
    """One GeGLU block: the FFN of a dense model (num_local_experts == 1) and Grok-2's shared FFN."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.w_gate = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w_up = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w_down = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.w_down.is_residual_projection = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(gated_gelu(self.w_gate(x), self.w_up(x)))


class Router(nn.Linear):
    """Expert logits in fp32 whatever the weights' dtype: grok-1 routes in full precision.

    The router goes through its own forward (not a read of its weight from MoE.forward) so that tools
    managing weights per module (Accelerate's offload, DeepSpeed ZeRO-3) see the use.
    """

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__(hidden_size, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with full_precision(x):
            return F.linear(x.float(), self.weight.float())


@dataclass
class RouterStats:
    """Per-layer router outputs for the training losses and for logging expert load."""

    aux_loss: torch.Tensor  # Switch load-balancing loss; 1.0 for perfectly uniform routing
    z_loss: torch.Tensor  # mean squared logsumexp of the router logits
    expert_token_counts: torch.Tensor  # [num_experts] token-to-expert assignments in this batch (before any drop)
    seq_aux_loss: torch.Tensor  # the same balance within each sequence, averaged (0 when its coefficient is 0)
    dropped: torch.Tensor  # assignments over an expert's capacity (0 without capacity_factor)


def router_loss(
    config: GrokConfig, aux_loss: torch.Tensor, z_loss: torch.Tensor, seq_aux_loss: torch.Tensor
) -> torch.Tensor:
    """What the routers add to the training loss (a layer's, or the layers' mean from their means: it is linear)."""
    return (
        config.router_aux_loss_coef * aux_loss
        + config.router_z_loss_coef * z_loss
        + config.router_seq_aux_loss_coef * seq_aux_loss
    )


def load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Switch Transformer / Mixtral form: E * sum_e f_e * P_e.

    f_e is the fraction of the assignments that went to expert e (`counts`, not differentiable),
    P_e the mean router probability of e (differentiable). Uniform routing gives exactly 1.
    """
    fraction = counts.float() / counts.sum()
    return probs.shape[-1] * (fraction * probs.mean(dim=0)).sum()


def sequence_balance_loss(probs: torch.Tensor, expert_index: torch.Tensor, sequences: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss: the Switch form over each sequence's own tokens, averaged over
    the sequences (so that no single sequence overloads an expert). Uniform routing gives exactly 1."""
    experts = probs.shape[-1]
    probs, expert_index = probs.view(sequences, -1, experts), expert_index.view(sequences, -1)
    counts = F.one_hot(expert_index, experts).sum(dim=1).float()  # [sequences, experts]
    fraction = counts / counts.sum(dim=-1, keepdim=True)
    return experts * (fraction * probs.mean(dim=1)).sum(dim=-1).mean()


def within_capacity(
    expert_index: torch.Tensor, gates: torch.Tensor, counts: torch.Tensor, capacity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The assignment slots grouped by expert, each expert's highest gates first and at most `capacity` of them;
    and how many each expert keeps."""
    by_gate = gates.flatten().argsort(descending=True, stable=True)
    order = by_gate[expert_index.flatten()[by_gate].argsort(stable=True)]
    starts = (counts.cumsum(0) - counts).repeat_interleave(counts)
    keep = torch.arange(order.numel(), device=order.device) - starts < capacity
    return order[keep], counts.clamp(max=capacity)


def own_token_counts(counts: torch.Tensor) -> torch.Tensor:
    """MoE.count_tokens in one process: the batch's tokens are all here. (Context parallelism sums them over the
    ranks that share each sequence, whose load-balancing loss is the whole sequence's.)"""
    return counts


class MoE(nn.Module):
    """Top-k routed GeGLU experts, stored as stacked [E, ...] weights."""

    def __init__(self, config: GrokConfig):
        super().__init__()
        d, f, E = config.hidden_size, config.intermediate_size, config.num_local_experts
        self.num_experts = E
        self.top_k = config.num_experts_per_tok
        self.normalize_gates = config.normalize_router_gates
        self.router_softcap = config.router_logit_softcap
        self.router = Router(d, E)
        self.capacity_factor = config.capacity_factor
        self.sequence_balance = config.router_seq_aux_loss_coef > 0
        # routing bias of auxiliary-loss-free balancing: state (checkpointed, exported), moved by the trainer
        # once per optimizer step (train/balance.py), never by gradients
        self.register_buffer("expert_bias", torch.zeros(E) if config.router_bias_update_rate > 0 else None)
        self.w_gate = nn.Parameter(torch.empty(E, d, f))
        self.w_up = nn.Parameter(torch.empty(E, d, f))
        self.w_down = nn.Parameter(torch.empty(E, f, d))
        self.dispatch = local_dispatch  # (routed rows, counts per expert, expert weights) -> expert outputs
        self.count_tokens = own_token_counts  # this batch's assignments per expert -> those the balance is over

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        with full_precision(x):
            logits = softcap(self.router(tokens), self.router_softcap)
            probs = torch.softmax(logits, dim=-1)
            if self.expert_bias is None:
                gates, expert_index = probs.topk(self.top_k, dim=-1)  # [N, k]
            else:  # the bias steers the choice only: the gates stay the router's probabilities
                expert_index = (probs + self.expert_bias).topk(self.top_k, dim=-1).indices
                gates = probs.gather(-1, expert_index)
            if self.normalize_gates:
                gates = gates / gates.sum(dim=-1, keepdim=True)
            counts = torch.bincount(expert_index.flatten(), minlength=self.num_experts)
            zero = torch.zeros((), device=x.device)
            sequences = shape[0] if len(shape) == 3 else 1
            stats = RouterStats(
                aux_loss=load_balancing_loss(probs, self.count_tokens(counts)),
                z_loss=torch.logsumexp(logits, dim=-1).pow(2).mean(),
                expert_token_counts=counts,
                seq_aux_loss=sequence_balance_loss(probs, expert_index, sequences) if self.sequence_balance else zero,
                dropped=zero,
            )

        # Group the N*k (token, expert) assignments by expert so each expert sees one contiguous slice.
        if self.capacity_factor > 0:
            capacity = math.ceil(self.capacity_factor * tokens.shape[0] * self.top_k / self.num_experts)
            order, kept = within_capacity(expert_index, gates, counts, capacity)
            stats.dropped = (counts - kept).sum().float()
        else:
            order, kept = expert_index.flatten().argsort(stable=True), counts
        token_of_slot = order // self.top_k
        # Experts without tokens still get a (zero) gradient for all of w_*: DDP needs every parameter used.
        expert_out = self.dispatch(tokens[token_of_slot], kept, self.w_gate, self.w_up, self.w_down)
        weighted = expert_out * gates.flatten()[order, None].to(expert_out.dtype)
        # Summed in the residual stream's dtype: under autocast the experts compute in bf16, the stream is fp32.
        # Filled through a flat view but returned whole: FSDP2 warns that a wrapped module returning a view can
        # lose its pre-backward hook if someone edits the output in place.
        out = x.new_zeros(shape)
        out.view_as(tokens).index_add_(0, token_of_slot, weighted.to(tokens.dtype))
        return out, stats


class FeedForward(nn.Module):
    """The FFN of one block: dense GeGLU, routed experts, or Grok-2's experts plus a shared FFN."""

    def __init__(self, config: GrokConfig):
        super().__init__()
        self.dense = None if config.is_moe else DenseFFN(config.hidden_size, config.intermediate_size)
        self.moe = MoE(config) if config.is_moe else None
        self.shared = None
        if config.is_moe and config.shared_intermediate_size > 0:
            self.shared = DenseFFN(config.hidden_size, config.shared_intermediate_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats | None]:
        if self.moe is None:
            return self.dense(x), None
        out, stats = self.moe(x)
        if self.shared is not None:
            # Grok-2: average the two branches so the residual scale matches a single FFN.
            out = (self.shared(x) + out) / math.sqrt(2.0)
        return out, stats
