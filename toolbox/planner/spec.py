"""What the planner needs of a model: its shapes, parameter counts and FLOPs per token.

A ModelSpec comes from one of the project's presets (its GrokConfig) or from a built-in reference spec of a
published run (Llama 3 405B, DeepSeek-V3, Megatron-LM's 1T GPT), which the planner only plans: the project does
not build those architectures. Counts are analytic (matrices only; norms are a rounding error) and agree with
`model.count_parameters` on the presets (tests/test_plan.py).
"""

from dataclasses import dataclass

from model import GrokConfig, preset_config
from model.presets import PRESETS


@dataclass(frozen=True)
class ModelSpec:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    ffn: int  # the dense FFN's width (dense layers, or every layer of a dense model)
    context: int = 8192  # the longest sequence it is trained on
    gated_ffn: bool = True  # GeGLU / SwiGLU: three matrices; False: GPT's two
    tied_embeddings: bool = False
    experts: int = 1  # routed experts per MoE layer; 1: dense
    top_k: int = 1
    expert_ffn: int = 0
    shared_ffn: int = 0  # width of the always-on FFN beside the routed experts
    norms_per_layer: int = 2  # pre-norm; Grok's sandwich norms: 4
    dense_layers: int = 0  # leading layers that stay dense in an MoE model (DeepSeek-V3: 3)
    routing_node_limit: int = 0  # DeepSeek-V3: a token's experts live on at most this many nodes (0: no limit)
    # multi-token prediction (DeepSeek-V3: 1): each module a projection of [hidden; next token's embedding],
    # one more MoE layer and the shared output head, beside the last layer
    mtp_depth: int = 0
    # Multi-head latent attention (DeepSeek-V3); 0 means grouped-query attention with the fields above
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_rope_dim: int = 0
    v_head_dim: int = 0

    @property
    def is_moe(self) -> bool:
        return self.experts > 1

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers if self.is_moe else 0

    @property
    def attention_params(self) -> int:
        h = self.hidden
        if self.kv_lora_rank:
            qk = self.head_dim + self.qk_rope_dim
            # queries through a low-rank bottleneck (V3), or projected straight when there is none (V2-Lite)
            q = h * self.q_lora_rank + self.q_lora_rank * self.heads * qk if self.q_lora_rank else h * self.heads * qk
            kv = h * (self.kv_lora_rank + self.qk_rope_dim) + self.kv_lora_rank * self.heads * (
                self.head_dim + self.v_head_dim
            )
            return q + kv + self.heads * self.v_head_dim * h
        return h * self.head_dim * (2 * self.heads + 2 * self.kv_heads)

    @property
    def matrices_per_layer(self) -> int:
        """Weight matrices of a layer as a framework holds them: fused q/k/v and the output (MLA: its down and up
        projections), the FFN's two or three (a MoE layer's experts counted as one grouped set)."""
        attention = 4 if self.kv_lora_rank else 2
        return attention + (3 if self.gated_ffn else 2)

    def ffn_params(self, width: int) -> int:
        return (3 if self.gated_ffn else 2) * self.hidden * width

    @property
    def expert_params(self) -> int:
        """All routed experts of all MoE layers."""
        return self.moe_layers * self.experts * self.ffn_params(self.expert_ffn)

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def dense_params(self) -> int:
        """Everything but the routed experts and the embedding / output matrices: what each layer holds."""
        moe = self.moe_layers * (self.ffn_params(self.shared_ffn) + self.hidden * self.experts)  # + the router
        dense = (self.layers - self.moe_layers) * self.ffn_params(self.ffn)
        return self.layers * self.attention_params + moe + dense

    @property
    def params_total(self) -> int:
        return self.dense_params + self.expert_params + self.embedding_params

    @property
    def params_active(self) -> int:
        """What one token multiplies: top_k of the routed experts; the output matrix (an input embedding that
        is not also the output is a lookup)."""
        routed = self.moe_layers * self.top_k * self.ffn_params(self.expert_ffn)
        return self.dense_params + routed + self.vocab * self.hidden

    @property
    def layer_params_active(self) -> float:
        """What a token multiplies in one average layer (the embedding and output matrices aside)."""
        return (self.params_active - self.vocab * self.hidden) / self.layers

    @property
    def mtp_params_active(self) -> float:
        """What a token multiplies in the multi-token-prediction modules; their compute is work, outside the
        model's FLOPs (the 37B active of DeepSeek-V3 leave them out)."""
        return self.mtp_depth * (2 * self.hidden * self.hidden + self.layer_params_active + self.vocab * self.hidden)

    @property
    def trained_params_active(self) -> float:
        """What a token multiplies in training: the model and its multi-token-prediction modules."""
        return self.params_active + self.mtp_params_active

    def trained_attention_flops(self, seq_len: int) -> float:
        """The causal attention cores of the model's layers and of each multi-token-prediction module's."""
        return self.attention_flops(seq_len, causal=True) * (1 + self.mtp_depth / self.layers)

    def attention_flops(self, seq_len: int, causal: bool) -> float:
        """Forward + backward FLOPs per token of the attention cores (QK^T and AV): 3 x 2 matmuls x 2 FLOPs per
        multiply-add over the context; a causal mask halves the context on average."""
        qk = self.head_dim + self.qk_rope_dim
        v = self.v_head_dim or self.head_dim
        context = seq_len / 2 if causal else seq_len
        return 3 * 2 * self.layers * self.heads * (qk + v) * context

    def model_flops_per_token(self, seq_len: int) -> float:
        """The project's MFU convention (model/accounting.py: 6N + 12 L H Q T, PaLM's, over the full context)."""
        return 6 * self.params_active + self.attention_flops(seq_len, causal=False)


def from_config(name: str, config: GrokConfig) -> ModelSpec:
    moe = config.num_local_experts > 1
    return ModelSpec(
        name=name,
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        vocab=config.vocab_size,
        ffn=0 if moe else config.intermediate_size,
        tied_embeddings=config.tie_word_embeddings,
        experts=config.num_local_experts,
        top_k=config.num_experts_per_tok if moe else 1,
        expert_ffn=config.intermediate_size if moe else 0,
        shared_ffn=config.shared_intermediate_size,
        norms_per_layer=4,
        context=config.max_position_embeddings,
    )


REFERENCES = {
    # Llama 3 405B (Dubey et al. 2024, table 3): dense, SwiGLU, GQA, untied output
    "llama3-405b": ModelSpec(
        "llama3-405b", layers=126, hidden=16384, heads=128, kv_heads=8, head_dim=128, vocab=128256, ffn=53248
    ),
    # DeepSeek-V3 (DeepSeek-AI 2024): 61 layers, the first 3 dense; 256 routed experts top-8 + 1 shared;
    # MLA attention; routing limited to 4 nodes a token; one multi-token-prediction module.
    "deepseek-v3": ModelSpec(
        "deepseek-v3",
        layers=61,
        hidden=7168,
        heads=128,
        kv_heads=128,
        head_dim=128,
        vocab=129280,
        ffn=18432,
        experts=256,
        top_k=8,
        expert_ffn=2048,
        shared_ffn=2048,
        dense_layers=3,
        routing_node_limit=4,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_rope_dim=64,
        v_head_dim=128,
        mtp_depth=1,
    ),
    # Megatron-LM's 1T GPT (Narayanan et al. 2021, table 1): GPT-3 style, 4h MLP, tied embedding
    "megatron-1t": ModelSpec(
        "megatron-1t",
        layers=128,
        hidden=25600,
        heads=160,
        kv_heads=160,
        head_dim=160,
        vocab=51200,
        ffn=4 * 25600,
        gated_ffn=False,
        tied_embeddings=True,
    ),
}
MODELS = (*PRESETS, *REFERENCES)


def model_spec(name: str) -> ModelSpec:
    if name in REFERENCES:
        return REFERENCES[name]
    return from_config(name, preset_config(name))
