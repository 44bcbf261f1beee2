"""GrokConfig: every number that defines the architecture, as a transformers config.

Field names follow the transformers conventions (hidden_size, num_hidden_layers, ...) so that
generic Hugging Face code (generate, DynamicCache, pipelines, device_map) understands the model.
The Grok-specific knobs are named after what they do in xai-org/grok-1's model.py.
"""

import math
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

ATTENTION_BACKENDS = ("eager", "sdpa", "flex")
# The GrokConfig fields that fix the parameters' shapes: what a checkpoint's config.json must agree on to resume.
SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "num_local_experts",
    "shared_intermediate_size",
    "tie_word_embeddings",
)


@strict
class GrokConfig(PreTrainedConfig):
    model_type = "minicolossus_grok"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 131072
    hidden_size: int = 6144
    num_hidden_layers: int = 64
    num_attention_heads: int = 48
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 8192
    rope_theta: int | float = 10000.0
    rms_norm_eps: int | float = 1e-5

    # Mixture of experts. num_local_experts == 1 is a dense GeGLU FFN (no router).
    intermediate_size: int = 32768  # per expert
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    normalize_router_gates: bool = False  # grok-1 uses the raw top-k softmax probabilities
    shared_intermediate_size: int = 0  # >0: Grok-2's dense FFN beside the experts
    router_aux_loss_coef: int | float = 0.01  # Switch/Mixtral load-balancing loss
    router_z_loss_coef: int | float = 0.001  # ST-MoE router z-loss
    router_seq_aux_loss_coef: int | float = 0.0  # DeepSeek-V3's sequence-wise balance loss (0 = off)
    # Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias added to the routing probabilities for the
    # top-k choice only (the gates stay the probabilities), moved by this much toward an even load after every
    # optimizer step, from the load of the whole global batch. 0 = off (no bias).
    router_bias_update_rate: int | float = 0.0
    # Each expert takes at most ceil(capacity_factor * tokens * k / experts) of a batch's assignments, its
    # highest gates first; the rest are dropped (counted) and the residual carries those tokens. 0 = dropless.
    capacity_factor: int | float = 0.0

    # Grok's scalings and tanh soft-caps (0 turns a cap off).
    embedding_multiplier: int | float | None = None  # None: sqrt(hidden_size), as grok-1
    output_multiplier: int | float = 1.0 / math.sqrt(3.0)
    attn_logit_softcap: int | float = 30.0
    # Grok-2's long-context attention temperature: the soft-capped logits of the query at (0-based) position
    # p > attn_temperature_len are multiplied by log2(p) / log2(attn_temperature_len). 0 turns it off.
    attn_temperature_len: int = 0
    router_logit_softcap: int | float = 0.0
    final_logit_softcap: int | float = 0.0

    attn_backend: str = "eager"
    initializer_range: int | float = 0.02

    use_cache: bool = True
    tie_word_embeddings: bool = True  # grok-1: the embedding is the output projection; False: a separate lm_head
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    def __post_init__(self, **kwargs: Any):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.embedding_multiplier is None:
            self.embedding_multiplier = math.sqrt(self.hidden_size)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Called by transformers' strict validation; every message names the field to fix."""
        positive = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "intermediate_size",
            "num_local_experts",
            "num_experts_per_tok",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"GrokConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"GrokConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"GrokConfig.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(
                f"GrokConfig.num_experts_per_tok ({self.num_experts_per_tok}) cannot exceed "
                f"num_local_experts ({self.num_local_experts})"
            )
        if self.attn_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"GrokConfig.attn_backend must be one of {ATTENTION_BACKENDS}, got {self.attn_backend!r}")
        if self.attn_temperature_len == 1:
            raise ValueError("GrokConfig.attn_temperature_len must be 0 (off) or >= 2 (log2(1) = 0 divides)")
        if self.attn_backend == "sdpa" and self.attn_temperature_len > 0:
            raise ValueError("GrokConfig.attn_backend='sdpa' cannot apply attn_temperature_len: use 'eager' or 'flex'")
        if self.attn_backend == "sdpa" and self.attn_logit_softcap > 0:
            raise ValueError(
                "GrokConfig.attn_backend='sdpa' cannot apply attn_logit_softcap: set attn_logit_softcap=0 "
                "or use attn_backend='flex' (GPU) / 'eager'"
            )
        for name in (
            "attn_logit_softcap",
            "router_logit_softcap",
            "final_logit_softcap",
            "shared_intermediate_size",
            "router_aux_loss_coef",
            "router_z_loss_coef",
            "router_seq_aux_loss_coef",
            "router_bias_update_rate",
            "capacity_factor",
            "attn_temperature_len",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"GrokConfig.{name} must be >= 0 (0 turns it off), got {getattr(self, name)}")

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 1
