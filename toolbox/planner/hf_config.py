"""A ModelSpec from a Hugging Face `config.json`: plan any model whose shapes a config states, not only the
presets. Read as data (JSON, bounded, never code), by the config's `model_type`:

  dense     llama, mistral, qwen2, qwen3, gemma, gemma2, olmo, olmo2, granite: GQA attention, a gated FFN
  mixtral   every layer's FFN routed to num_local_experts (Mixtral), top num_experts_per_tok
  qwen-moe  qwen2_moe / qwen3_moe: num_experts of moe_intermediate_size, a shared expert (Qwen2-MoE)
  deepseek  deepseek_v2 / deepseek_v3: multi-head latent attention, first_k_dense_replace dense layers,
            n_routed_experts + n_shared_experts, multi-token prediction (V3), routing to topk_group nodes
  gpt-oss   gpt_oss: num_local_experts, explicit head_dim
  grok      this project's exports (minicolossus_grok) and grok-1 conversions (num_experts)

Biases, norms and attention sinks are left out (they are rounding errors of the count), and so are
sliding windows (attention is costed over the whole context). Anything else stops in one line naming the file
and the field.
"""

from pathlib import Path

from groundwork.untrusted import UntrustedFileError, read_json_object

from .spec import ModelSpec

DENSE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "granite")
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss", "minicolossus_grok", "grok-1")
GROK_NORMS = 4  # Grok's sandwich norms around attention and FFN


class ConfigReader:
    """The fields of one config.json, each checked as it is read (one line naming the file and the field)."""

    def __init__(self, path: Path, fields: dict):
        self.path, self.fields = path, fields

    def fail(self, problem: str) -> UntrustedFileError:
        return UntrustedFileError(f"model config {self.path}: {problem}; pass a model's config.json or a preset")

    def whole(self, name: str, default: int | None = None, low: int = 1) -> int:
        value = self.fields.get(name, default)
        if value is None:
            raise self.fail(f"no {name!r}, which a {self.fields.get('model_type')} model needs")
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 2**40:
            raise self.fail(f"{name} is {value!r}, not a whole number from {low} to 2^40")
        return value

    def flag(self, name: str, default: bool) -> bool:
        value = self.fields.get(name, default)
        if not isinstance(value, bool):
            raise self.fail(f"{name} is {value!r}, not true or false")
        return value


def spec_from_hf_config(path: Path) -> ModelSpec:
    """The planner's spec of the model a config.json (or a folder holding one) describes."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    fields = read_json_object(path, "model config", "pass a model's config.json or a preset")
    read = ConfigReader(path, fields)
    model_type = fields.get("model_type")
    if model_type not in DENSE + MOE:
        raise read.fail(
            f"model_type {model_type!r} is not one the planner reads ({', '.join(DENSE + MOE)}); "
            f"write the shapes into one of those, or plan a preset"
        )
    hidden, heads = read.whole("hidden_size"), read.whole("num_attention_heads")
    common = dict(
        name=str(fields.get("_name_or_path") or path.parent.name or "config.json")[:80],
        layers=read.whole("num_hidden_layers"),
        hidden=hidden,
        heads=heads,
        kv_heads=read.whole("num_key_value_heads", heads),
        head_dim=read.whole("head_dim") if fields.get("head_dim") is not None else hidden // heads,
        vocab=read.whole("vocab_size"),
        context=read.whole("max_position_embeddings", 8192),
        # each config class's default: tied for Grok and Gemma (and transformers' base class), untied otherwise
        tied_embeddings=read.flag(
            "tie_word_embeddings", model_type in ("minicolossus_grok", "grok-1", "gemma", "gemma2")
        ),
    )
    if model_type in DENSE:
        return ModelSpec(**common, ffn=read.whole("intermediate_size"))
    if model_type in ("mixtral", "gpt_oss"):
        top_k = read.whole("num_experts_per_tok", fields.get("experts_per_token"))
        return ModelSpec(
            **common,
            ffn=0,
            experts=read.whole("num_local_experts"),
            top_k=top_k,
            expert_ffn=read.whole("intermediate_size"),
        )
    if model_type in ("minicolossus_grok", "grok-1"):
        experts = read.whole("num_local_experts" if model_type == "minicolossus_grok" else "num_experts", 8)
        moe = experts > 1
        width = read.whole("intermediate_size")
        return ModelSpec(
            **common,
            ffn=0 if moe else width,
            experts=experts,
            top_k=read.whole("num_experts_per_tok", 2) if moe else 1,
            expert_ffn=width if moe else 0,
            shared_ffn=read.whole("shared_intermediate_size", 0, low=0),
            norms_per_layer=GROK_NORMS,
        )
    if model_type in ("qwen2_moe", "qwen3_moe"):
        if read.whole("decoder_sparse_step", 1) != 1 or fields.get("mlp_only_layers"):
            raise read.fail("decoder_sparse_step / mlp_only_layers make some layers dense, which is not read yet")
        return ModelSpec(
            **common,
            ffn=0,
            experts=read.whole("num_experts"),
            top_k=read.whole("num_experts_per_tok"),
            expert_ffn=read.whole("moe_intermediate_size"),
            shared_ffn=read.whole("shared_expert_intermediate_size", 0, low=0),
        )
    return deepseek_spec(read, common)


def deepseek_spec(read: ConfigReader, common: dict) -> ModelSpec:
    """DeepSeek-V2/V3: MLA (q through a q_lora_rank bottleneck, or straight when it is null), shared experts of
    the routed experts' width, the first first_k_dense_replace layers dense; V3's node-limited routing."""
    expert_ffn = read.whole("moe_intermediate_size")
    groups = read.whole("n_group", 1)
    return ModelSpec(
        **{**common, "head_dim": read.whole("qk_nope_head_dim")},
        ffn=read.whole("intermediate_size"),
        experts=read.whole("n_routed_experts"),
        top_k=read.whole("num_experts_per_tok"),
        expert_ffn=expert_ffn,
        shared_ffn=read.whole("n_shared_experts", 0, low=0) * expert_ffn,
        dense_layers=read.whole("first_k_dense_replace", 0, low=0),
        routing_node_limit=read.whole("topk_group") if groups > 1 else 0,
        mtp_depth=read.whole("num_nextn_predict_layers", 0, low=0),
        q_lora_rank=read.whole("q_lora_rank", 0, low=0) if read.fields.get("q_lora_rank") is not None else 0,
        kv_lora_rank=read.whole("kv_lora_rank"),
        qk_rope_dim=read.whole("qk_rope_head_dim"),
        v_head_dim=read.whole("v_head_dim"),
    )
