"""Named model sizes, from a 2-core CPU demo to the published Grok-1 and a Grok-2-like spec.

Each preset is a dict of GrokConfig fields; `preset_config(name, **overrides)` builds the config.
Train configs select a preset by name and may override fields (e.g. vocab_size to match a tokenizer).
"""

from typing import Any

from .config import GrokConfig

PRESETS: dict[str, dict] = {
    # ~1.6M params, 8 experts top-2: trains on 2 CPU cores in minutes (the README's main job).
    # Few wide heads and narrow experts: on a CPU the T x T attention elementwise work scales with the
    # head count, and narrow experts keep active FLOPs low at the same parameter count.
    "tiny": dict(
        vocab_size=2048,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=96,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        router_bias_update_rate=0.01,  # with the auxiliary loss: measured in the README's MoE section
    ),
    # ~15M params, 8 experts top-2: a CPU/one-GPU model that produces recognisable text.
    "small": dict(
        vocab_size=8192,
        hidden_size=256,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=384,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
        router_bias_update_rate=0.01,
    ),
    # GPU sizes. 125m and 350m are dense (num_local_experts=1) for MFU comparisons with GPT/Llama;
    # no soft-cap so the fused sdpa kernel can be used.
    "125m": dict(
        vocab_size=32768,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        intermediate_size=3072,
        num_local_experts=1,
        num_experts_per_tok=1,
        max_position_embeddings=2048,
        attn_logit_softcap=0.0,
        attn_backend="sdpa",
    ),
    "350m": dict(
        vocab_size=32768,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=4,
        intermediate_size=3328,
        num_local_experts=1,
        num_experts_per_tok=1,
        max_position_embeddings=2048,
        attn_logit_softcap=0.0,
        attn_backend="sdpa",
    ),
    # ~1B total / ~0.3B active MoE with Grok's soft-capped attention (flex on GPU).
    "1b": dict(
        vocab_size=32768,
        hidden_size=1024,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        intermediate_size=2304,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=2048,
        attn_backend="flex",
    ),
    # xai-org/grok-1 (run.py): 314B total, 8 experts top-2, ffn = widening 8 * 6144 * 2/3 -> 32768.
    "grok-1": dict(
        vocab_size=131072,
        hidden_size=6144,
        num_hidden_layers=64,
        num_attention_heads=48,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=32768,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=8192,
        attn_logit_softcap=30.0,
        attn_backend="flex",
    ),
    # Grok-2 (the released config): experts plus a shared dense FFN, three soft-caps, the long-context
    # attention temperature past position 1024, and an output projection of its own (lm_head, untied).
    "grok-2": dict(
        vocab_size=131072,
        hidden_size=8192,
        num_hidden_layers=64,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=16384,
        num_local_experts=8,
        num_experts_per_tok=2,
        shared_intermediate_size=32768,
        max_position_embeddings=131072,
        rope_theta=208533496.0,
        output_multiplier=0.5,
        attn_logit_softcap=30.0,
        router_logit_softcap=30.0,
        final_logit_softcap=50.0,
        attn_temperature_len=1024,
        tie_word_embeddings=False,
        attn_backend="flex",
    ),
}


def preset_config(name: str, **overrides: Any) -> GrokConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)}")
    return GrokConfig(**{**PRESETS[name], **overrides})
