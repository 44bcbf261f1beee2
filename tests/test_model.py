"""The architecture: shapes, causality, attention variants, RoPE, soft-caps, MoE, losses, init."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import small_config, small_model

from model import GrokForCausalLM, count_parameters, flops_per_token, preset_config
from model.attention import (
    Attention,
    RMSNormFunction,
    SoftcappedAttention,
    apply_rotary,
    attention_temperature,
    eager_logit_bias,
    make_attention_inputs,
    rotary_cos_sin,
    rotary_tables,
    softcap,
)
from model.moe import MoE, gated_gelu, geglu, grouped_geglu, load_balancing_loss

pytestmark = pytest.mark.compat  # every test: torch ops, eager and compiled, change between versions


def test_forward_shapes_and_losses():
    model = small_model()
    ids = torch.randint(0, 97, (3, 10))
    out = model(ids, labels=ids)
    assert out.logits.shape == (3, 10, 97)
    assert out.expert_token_counts.shape == (2, 4)
    # every token is assigned to top_k experts in every layer
    assert out.expert_token_counts.sum(dim=1).tolist() == [3 * 10 * 2] * 2
    expected = out.lm_loss + 0.01 * out.aux_loss + 0.001 * out.z_loss
    torch.testing.assert_close(out.loss, expected)
    # labels are shifted inside, targets are taken as aligned: the two must agree
    targets = F.pad(ids[:, 1:], (0, 1), value=-100)
    torch.testing.assert_close(model(ids, targets=targets).lm_loss, out.lm_loss)


def test_dense_model_has_no_router_and_zero_aux():
    model = small_model(num_local_experts=1, num_experts_per_tok=1)
    assert not any(isinstance(m, MoE) for m in model.modules())
    out = model(torch.randint(0, 97, (2, 8)), labels=torch.randint(0, 97, (2, 8)))
    assert out.aux_loss.item() == 0 and out.z_loss.item() == 0
    torch.testing.assert_close(out.loss, out.lm_loss)


@pytest.mark.parametrize("experts", [4, 1])
def test_bf16_autocast_trains_close_to_fp32(experts):
    """The GPU path of `none`/`ddp`: fp32 weights, bf16 autocast (CPU runs the same casts, slowly)."""
    model = small_model(num_local_experts=experts, num_experts_per_tok=min(2, experts)).train()
    ids = torch.randint(0, 97, (2, 16))
    reference = model(ids, labels=ids).lm_loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert abs(out.lm_loss.item() - reference.item()) < 0.05
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("backend,cap", [("eager", 30.0), ("sdpa", 0.0)])
def test_causality(backend, cap):
    model = small_model(attn_backend=backend, attn_logit_softcap=cap)
    ids = torch.randint(0, 97, (2, 12))
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 97
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    # Not bitwise: the changed token reroutes later tokens, so expert matmuls see other batch shapes.
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-4  # and the change is visible from position 7 on


def _mha_reference(x, attn: Attention, cos, sin):
    """Plain multi-head attention written out head by head, with Grok's soft-cap."""
    B, T, _ = x.shape
    hd = attn.head_dim
    q = attn.q_proj(x).view(B, T, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, -1, hd).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, -1, hd).transpose(1, 2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    heads = []
    for h in range(q.shape[1]):
        scores = softcap(q[:, h] @ k[:, h].transpose(-1, -2) / math.sqrt(hd), attn.config.attn_logit_softcap)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        heads.append(scores.softmax(-1) @ v[:, h])
    return attn.o_proj(torch.stack(heads, 1).transpose(1, 2).reshape(B, T, -1))


def test_attention_with_equal_kv_heads_is_plain_mha():
    config = small_config(num_key_value_heads=4)
    attn = Attention(config, 0)
    x = torch.randn(2, 9, 32)
    inputs = make_attention_inputs(config, torch.arange(9)[None], 9, 9, None)
    torch.testing.assert_close(attn(x, inputs), _mha_reference(x, attn, inputs.cos, inputs.sin))


def test_gqa_equals_mha_with_shared_kv_weights():
    gqa_config, mha_config = small_config(num_key_value_heads=2), small_config(num_key_value_heads=4)
    gqa, mha = Attention(gqa_config, 0), Attention(mha_config, 0)
    hd = gqa.head_dim
    with torch.no_grad():
        for name in ("q_proj", "o_proj"):
            getattr(mha, name).weight.copy_(getattr(gqa, name).weight)
        for name in ("k_proj", "v_proj"):  # query head h reads kv head h // 2
            w = getattr(gqa, name).weight.view(2, hd, -1).repeat_interleave(2, dim=0).reshape(4 * hd, -1)
            getattr(mha, name).weight.copy_(w)
    x = torch.randn(2, 9, 32)
    inputs = make_attention_inputs(gqa_config, torch.arange(9)[None], 9, 9, None)
    torch.testing.assert_close(gqa(x, inputs), mha(x, inputs))


def test_rope_depends_only_on_relative_position():
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        cos_m, sin_m = rotary_cos_sin(torch.tensor([[m]]), 16, 10000.0)
        cos_n, sin_n = rotary_cos_sin(torch.tensor([[n]]), 16, 10000.0)
        return (apply_rotary(q, cos_m, sin_m) * apply_rotary(k, cos_n, sin_n)).sum()

    torch.testing.assert_close(score(5, 2), score(105, 102), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(score(0, 0), (q * k).sum())  # position 0 is the identity
    assert not torch.allclose(score(5, 2), score(5, 3))
    # rotation preserves the norm
    cos, sin = rotary_cos_sin(torch.tensor([[37]]), 16, 10000.0)
    torch.testing.assert_close(apply_rotary(q, cos, sin).norm(), q.norm())


@pytest.mark.parametrize("cap,temperature_len", [(30.0, 0), (0.0, 0), (30.0, 3), (0.0, 2)])
def test_softcapped_attention_backward_equals_autograd_in_float64(cap, temperature_len):
    """The written-out backward against torch's numerical and analytical gradients of the plain formula."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = eager_logit_bias(None, 6, 6, "cpu").double()
    temperature = attention_temperature(torch.arange(6)[None], temperature_len)
    temperature = None if temperature is None else temperature.double()
    assert torch.autograd.gradcheck(lambda *t: SoftcappedAttention.apply(*t, bias, cap, temperature), (q, k, v))

    def plain(q, k, v):
        logits = softcap(q @ k.transpose(-1, -2) / math.sqrt(4), cap)
        if temperature is not None:
            logits = logits * temperature
        return (logits + bias).softmax(-1) @ v

    out_grad = torch.randn(2, 3, 6, 4, dtype=torch.float64)
    torch.testing.assert_close(SoftcappedAttention.apply(q, k, v, bias, cap, temperature), plain(q, k, v))
    ours = torch.autograd.grad(SoftcappedAttention.apply(q, k, v, bias, cap, temperature), (q, k, v), out_grad)
    for got, want in zip(ours, torch.autograd.grad(plain(q, k, v), (q, k, v), out_grad)):
        torch.testing.assert_close(got, want)


def test_gated_gelu_is_grok1s_tanh_gelu_in_float64():
    """The sigmoid form and its written-out backward against F.gelu(approximate="tanh") * up and autograd."""
    torch.manual_seed(0)
    gate = (torch.randn(4, 7, dtype=torch.float64) * 4).requires_grad_()
    up = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(gated_gelu, (gate, up))
    plain = F.gelu(gate, approximate="tanh") * up
    torch.testing.assert_close(gated_gelu(gate, up), plain)
    out_grad = torch.randn(4, 7, dtype=torch.float64)
    for got, want in zip(
        torch.autograd.grad(gated_gelu(gate, up), (gate, up), out_grad),
        torch.autograd.grad(plain, (gate, up), out_grad),
    ):
        torch.testing.assert_close(got, want)
    # fp32 in and out, as close to the exact value as ATen's own tanh form is
    g32, u32 = gate.detach().float(), up.detach().float()
    assert gated_gelu(g32, u32).dtype == torch.float32
    torch.testing.assert_close(gated_gelu(g32, u32).double(), plain.detach(), atol=1e-5, rtol=1e-5)


def test_compiled_norm_and_gated_gelu_give_the_eager_gradients():
    """Both autograd Functions, compiled: torch 2.11 silently gave zero gradients for a forward output written in
    place or aliased (the dense model then stopped learning after its first step)."""
    torch.manual_seed(0)
    x, up = torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(8, requires_grad=True)

    def block(x, up, weight):
        return gated_gelu(RMSNormFunction.apply(x, weight, 1e-5), up)

    try:
        grads = [
            torch.autograd.grad(fn(x, up, weight).square().sum(), (x, up, weight))
            for fn in (block, torch.compile(block, fullgraph=True))
        ]
    finally:
        torch._dynamo.reset()
    for eager, compiled in zip(*grads):
        assert compiled.abs().sum() > 0
        torch.testing.assert_close(compiled, eager)


def test_compiled_rotary_equals_eager():
    """Compiled, rotary is written on the two halves instead of a roll: the same values."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 8)
    cos, sin = rotary_cos_sin(torch.arange(5)[None], 8, 10000.0)
    torch.testing.assert_close(torch.compile(apply_rotary, fullgraph=True)(x, cos, sin), apply_rotary(x, cos, sin))


def test_a_compiled_forward_computes_the_rotary_tables_once_as_one_operator():
    """Traced as plain ops, inductor fused cos/sin into every layer's kernels and recomputed them per element
    in the backward; as one opaque operator the tables are computed once and saved."""
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    model = small_model(num_hidden_layers=3, num_local_experts=1, num_experts_per_tok=1)
    try:
        torch.compile(model, backend=record, fullgraph=True)(torch.randint(0, 97, (2, 6)))
    finally:
        torch._dynamo.reset()  # later compiles of the model should not start from this one's shapes
    (graph,) = graphs
    targets = [node.target for node in graph.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.minicolossus.rotary_tables) == 1
    assert not {torch.cos, torch.sin, torch.Tensor.cos, torch.Tensor.sin} & set(targets)
    cos, sin = rotary_cos_sin(torch.arange(6)[None], 8, 10000.0)  # the operator computes what its body does
    for got, want in zip((cos, sin), rotary_tables(torch.arange(6)[None], 8, 10000.0)):
        assert torch.equal(got, want)


def test_rms_norm_backward_equals_autograd_in_float64():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFunction.apply(x, w, 1e-5), (x, weight))
    plain = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight  # grok-1's hk_rms_norm
    torch.testing.assert_close(RMSNormFunction.apply(x, weight, 1e-5), plain)


def test_attention_temperature_is_grok2s_log_ratio_past_its_length():
    """xAI's Grok-2 kernels: factor log2(p) / log2(1024) for a query at 0-based position p > 1024, else 1."""
    factor = attention_temperature(torch.tensor([[0, 1, 1024, 1025, 2048, 131071]]), 1024)[0, 0, :, 0]
    torch.testing.assert_close(factor, torch.tensor([1.0, 1.0, 1.0, math.log2(1025) / 10, 1.1, math.log2(131071) / 10]))
    assert attention_temperature(torch.arange(5)[None], 0) is None


def test_attention_temperature_changes_only_queries_past_its_length():
    """With the temperature at 4, positions 0..4 are exactly the plain model's; later ones differ; eager and
    flex agree with it on."""
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 9))
    plain = GrokForCausalLM(small_config()).eval()
    tempered = GrokForCausalLM(small_config(attn_temperature_len=4)).eval()
    tempered.load_state_dict(plain.state_dict())
    with torch.no_grad():
        a, b = plain(ids).logits, tempered(ids).logits
        tempered.config.attn_backend = "flex"
        c = tempered(ids).logits
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=0)
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-4
    torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-4)


def test_untied_output_projection_is_a_separate_lm_head():
    config = small_config(tie_word_embeddings=False)
    model = GrokForCausalLM(config)
    assert model.get_output_embeddings() is model.lm_head
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    tied = count_parameters(GrokForCausalLM(small_config()))
    assert count_parameters(model).total == tied.total + config.vocab_size * config.hidden_size
    assert count_parameters(model).active == tied.active  # the lookup is free; lm_head is the output matmul
    ids = torch.randint(0, 64, (2, 7))
    out = model(ids, targets=ids)
    out.loss.backward()
    assert model.lm_head.weight.grad is not None
    h = model.model(ids).last_hidden_state
    torch.testing.assert_close(out.logits, model.lm_head(h) * config.output_multiplier)


def test_grok1_is_tied_and_grok2_untied_with_the_temperature():
    assert preset_config("grok-1").tie_word_embeddings and preset_config("grok-1").attn_temperature_len == 0
    grok2 = preset_config("grok-2")
    assert not grok2.tie_word_embeddings and grok2.attn_temperature_len == 1024


def test_softcap_bounds():
    x = torch.linspace(-1e4, 1e4, 1001)
    assert softcap(x, 30.0).abs().max() <= 30.0
    small = torch.linspace(-0.1, 0.1, 11)
    torch.testing.assert_close(softcap(small, 30.0), small, rtol=1e-5, atol=1e-6)
    assert torch.equal(softcap(x, 0.0), x)
    # the final-logit cap bounds what the model emits, even with huge output weights
    model = small_model(final_logit_softcap=5.0, output_multiplier=1e3)
    assert model(torch.randint(0, 97, (2, 6))).logits.abs().max() <= 5.0


@pytest.mark.parametrize("backend,cap", [("sdpa", 0.0), ("flex", 30.0), ("flex", 0.0)])
def test_attention_backends_agree_with_eager(backend, cap):
    ids = torch.randint(3, 97, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    reference = small_model(attn_backend="eager", attn_logit_softcap=cap)
    other = small_model(attn_backend=backend, attn_logit_softcap=cap)
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            torch.testing.assert_close(
                other(ids, **kwargs).logits, reference(ids, **kwargs).logits, rtol=1e-5, atol=1e-5
            )
        # and with a KV cache: a prefix, then the rest of the sequence
        for model in (reference, other):
            first = model(ids[:, :6], use_cache=True)
            model.rest = model(ids[:, 6:], past_key_values=first.past_key_values).logits
        torch.testing.assert_close(other.rest, reference.rest, rtol=1e-5, atol=1e-5)


def _dense_moe_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, then keep the routed ones with their gates."""
    tokens = x.reshape(-1, x.shape[-1])
    probs = softcap(tokens @ moe.router.weight.T, moe.router_softcap).softmax(-1)
    gates, index = probs.topk(moe.top_k, dim=-1)
    if moe.normalize_gates:
        gates = gates / gates.sum(-1, keepdim=True)
    all_experts = torch.stack(
        [geglu(tokens, moe.w_gate[e], moe.w_up[e], moe.w_down[e]) for e in range(moe.num_experts)], dim=1
    )  # [N, E, d]
    picked = all_experts.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))  # [N, k, d]
    return (picked * gates[..., None]).sum(1).view(x.shape)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"normalize_router_gates": True, "router_logit_softcap": 2.0},
        {"num_local_experts": 8, "num_experts_per_tok": 1},
    ],
)
def test_moe_selected_experts_equal_dense_reference(overrides):
    model = small_model(**overrides)
    moe = model.model.layers[0].ffn.moe
    with torch.no_grad():
        for p in (moe.w_gate, moe.w_up, moe.w_down):
            p.normal_(0, 0.2)
        moe.router.weight.normal_(0, 1.0)  # decisive routing, so some experts get no tokens at all
    x = torch.randn(3, 7, 32)
    out, stats = moe(x)
    torch.testing.assert_close(out, _dense_moe_reference(moe, x), rtol=1e-5, atol=1e-5)
    assert stats.expert_token_counts.sum().item() == 21 * moe.top_k


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 10, 0], [0, 0, 0, 0]])
def test_grouped_geglu_equals_the_per_expert_loop_bitwise(counts):
    E, d, f = 4, 32, 48
    w_gate, w_up, w_down = (torch.randn(E, *shape, requires_grad=True) for shape in ((d, f), (d, f), (f, d)))
    x = torch.randn(sum(counts), d, requires_grad=True)
    grouped = grouped_geglu(x, torch.tensor(counts), w_gate, w_up, w_down)
    loop = torch.cat([geglu(chunk, w_gate[e], w_up[e], w_down[e]) for e, chunk in enumerate(x.split(counts))])
    assert grouped.shape == (sum(counts), d) and torch.equal(grouped, loop)
    upstream = torch.randn_like(loop)  # the backward kernels sum in another order: equal to rounding
    for a, b in zip(
        torch.autograd.grad(grouped, (x, w_gate, w_up, w_down), upstream),
        torch.autograd.grad(loop, (x, w_gate, w_up, w_down), upstream),
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _loop_moe_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE as it was computed before grouped matmuls: sort by expert, one matmul per expert's slice."""
    tokens = x.reshape(-1, x.shape[-1])
    probs = softcap(moe.router(tokens), moe.router_softcap).softmax(-1)
    gates, index = probs.topk(moe.top_k, dim=-1)
    if moe.normalize_gates:
        gates = gates / gates.sum(-1, keepdim=True)
    order = index.flatten().argsort(stable=True)
    slices = torch.bincount(index.flatten(), minlength=moe.num_experts).tolist()
    out = torch.cat(
        [
            geglu(chunk, moe.w_gate[e], moe.w_up[e], moe.w_down[e])
            for e, chunk in enumerate(tokens[order // moe.top_k].split(slices))
        ]
    )
    weighted = out * gates.flatten()[order, None]
    return torch.zeros_like(tokens).index_add_(0, order // moe.top_k, weighted).view(x.shape)


def test_local_dispatch_equals_the_per_expert_loop_with_empty_experts():
    moe = small_model(num_local_experts=8, num_experts_per_tok=2).model.layers[0].ffn.moe
    with torch.no_grad():
        moe.router.weight.normal_(0, 2.0)
        moe.router.weight[5:] = -1.0  # with positive inputs, experts 5..7 are never chosen: zero-row groups
    x = torch.randn(3, 7, 32).abs()
    out, stats = moe(x)
    assert stats.expert_token_counts[5:].tolist() == [0, 0, 0]
    torch.testing.assert_close(out, _loop_moe_reference(moe, x), rtol=1e-6, atol=1e-9)


def test_every_parameter_gets_a_gradient_even_unused_experts():
    model = small_model(num_local_experts=8, num_experts_per_tok=1)
    with torch.no_grad():  # route every token to expert 0: experts 1..7 see no tokens
        for layer in model.model.layers:
            layer.ffn.moe.router.weight.zero_()
            layer.ffn.moe.router.weight[0] = 10.0
    ids = torch.randint(0, 97, (2, 8))
    model.train()(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters())  # DDP requires it


def test_shared_ffn_is_averaged_with_experts():
    model = small_model(shared_intermediate_size=40)
    ffn = model.model.layers[0].ffn
    x = torch.randn(2, 5, 32)
    out, _ = ffn(x)
    moe_out, _ = ffn.moe(x)
    torch.testing.assert_close(out, (ffn.shared(x) + moe_out) / math.sqrt(2))


def test_aux_losses_closed_forms():
    E, k, N = 8, 2, 64
    # uniform router probabilities: E * sum_e f_e * (1/E) = sum_e f_e = 1, whatever top-k picks
    uniform = torch.full((N, E), 1.0 / E)
    counts = torch.bincount(uniform.topk(k).indices.flatten(), minlength=E)
    assert load_balancing_loss(uniform, counts).item() == pytest.approx(1.0)
    # fully collapsed routing: every token to experts 0 and 1 with probability 1/2 each -> E/2
    collapsed = torch.zeros(N, E)
    collapsed[:, :2] = 0.5
    counts = torch.bincount(collapsed.topk(k).indices.flatten(), minlength=E)
    assert load_balancing_loss(collapsed, counts).item() == pytest.approx(E / 2)
    # through the model: a zero router gives uniform probabilities, aux 1 and z-loss log(E)^2
    model = small_model(num_local_experts=E)
    for layer in model.model.layers:
        layer.ffn.moe.router.weight.data.zero_()
    out = model(torch.randint(0, 97, (2, 8)))
    assert out.aux_loss.item() == pytest.approx(1.0)
    assert out.z_loss.item() == pytest.approx(math.log(E) ** 2, rel=1e-6)


def test_init_trains():
    model = small_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 97, (4, 16))
    first = model(ids, labels=ids).lm_loss.item()
    assert first == pytest.approx(math.log(97), abs=0.5)  # near-uniform predictions at init
    for _ in range(30):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert model(ids, labels=ids).lm_loss.item() < 0.5 * first


def test_residual_projections_are_depth_scaled():
    config = small_config(num_hidden_layers=8, hidden_size=128, intermediate_size=256)
    model = GrokForCausalLM(config)
    block = model.model.layers[0]
    assert block.attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert block.attn.o_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.1)
    assert block.ffn.moe.w_down.std().item() == pytest.approx(0.02 / 4, rel=0.1)
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(128**-0.5, rel=0.1)


def test_config_errors_name_the_field():
    with pytest.raises(Exception, match="attn_logit_softcap"):
        small_config(attn_backend="sdpa", attn_logit_softcap=30.0)
    with pytest.raises(Exception, match="num_key_value_heads"):
        small_config(num_key_value_heads=3)
    with pytest.raises(Exception, match="num_experts_per_tok"):
        small_config(num_experts_per_tok=5)
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        preset_config("huge")


def test_accounting_of_a_small_model_by_hand():
    config = small_config()
    counts = count_parameters(GrokForCausalLM(config))
    d, f, E, k, L, V, hd = 32, 48, 4, 2, 2, 97, 8
    attention = d * 4 * hd + 2 * d * 2 * hd + 4 * hd * d
    experts = E * 3 * d * f
    per_layer = attention + experts + d * E + 4 * d
    assert counts.total == V * d + L * per_layer + d
    assert counts.active == counts.total - L * experts * (E - k) // E
    assert flops_per_token(config, counts.active, seq_len=16) == 6 * counts.active + 12 * L * 4 * hd * 16


def test_grok1_preset_counts_on_meta_device():
    with torch.device("meta"):
        model = GrokForCausalLM(preset_config("grok-1"))
    counts = count_parameters(model)
    assert next(model.parameters()).is_meta
    assert abs(counts.total - 314e9) / 314e9 < 0.02
    assert 83e9 <= counts.active <= 87e9  # tied embedding (0.8B) counted once


def test_every_preset_builds_on_meta_and_small_ones_are_sized_as_named():
    sizes = {}
    for name in ("tiny", "small", "125m", "350m", "1b", "grok-2"):
        with torch.device("meta"):
            sizes[name] = count_parameters(GrokForCausalLM(preset_config(name)))
    assert 1e6 <= sizes["tiny"].total <= 2e6 and sizes["tiny"].active < sizes["tiny"].total
    assert 10e6 <= sizes["small"].total <= 20e6
    assert 110e6 <= sizes["125m"].total <= 140e6 and sizes["125m"].active == sizes["125m"].total
    assert 300e6 <= sizes["350m"].total <= 400e6
    assert 0.9e9 <= sizes["1b"].total <= 1.1e9
    assert sizes["grok-2"].total > 250e9
