"""The Grok decoder: sandwich-normed blocks of GQA attention and a mixture of experts.

GrokForCausalLM *is* the model, not a wrapper: it trains, saves/loads with save_pretrained and
from_pretrained (safetensors), and generates with the transformers KV cache.
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import Cache, DynamicCache, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .attention import Attention, AttentionInputs, RMSNorm, make_attention_inputs, softcap
from .config import GrokConfig
from .moe import FeedForward, MoE, RouterStats, router_loss

# transformers 5.24 renamed the KV cache from `past_key_values` to `cache` (argument and output field);
# both are accepted, and outputs use the name of the installed version.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (in fp32) over the targets that are not -100."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


class TiedEmbedding(nn.Embedding):
    """Token embedding that is also the output projection (grok-1 ties them): forward(h, as_output=True)
    gives logits h @ E^T. Both uses go through forward, so tools that manage weights per module
    (Accelerate's device_map dispatch and disk offload, DeepSpeed ZeRO-3) see and place both."""

    def forward(self, x: torch.Tensor, as_output: bool = False) -> torch.Tensor:
        return F.linear(x, self.weight) if as_output else super().forward(x)


class GrokBlock(nn.Module):
    """grok-1's DecoderLayer: h = h + norm(attn(norm(h))); h = h + norm(ffn(norm(h)))."""

    def __init__(self, config: GrokConfig, layer_idx: int):
        super().__init__()
        eps = config.rms_norm_eps
        self.attn_norm_in = RMSNorm(config.hidden_size, eps)
        self.attn = Attention(config, layer_idx)
        self.attn_norm_out = RMSNorm(config.hidden_size, eps)
        self.ffn_norm_in = RMSNorm(config.hidden_size, eps)
        self.ffn = FeedForward(config)
        self.ffn_norm_out = RMSNorm(config.hidden_size, eps)

    def forward(
        self, h: torch.Tensor, attention_inputs: AttentionInputs, cache: Cache | None = None
    ) -> tuple[torch.Tensor, RouterStats | None]:
        h = h + self.attn_norm_out(self.attn(self.attn_norm_in(h), attention_inputs, cache))
        ffn_out, router_stats = self.ffn(self.ffn_norm_in(h))
        return h + self.ffn_norm_out(ffn_out), router_stats


@dataclass
class GrokModelOutput(BaseModelOutputWithPast):
    router_stats: list[RouterStats] | None = None


@dataclass
class GrokCausalLMOutput(CausalLMOutputWithPast):
    """`loss` = lm_loss + router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss
    + router_seq_aux_loss_coef * seq_aux_loss.

    aux_loss, z_loss and seq_aux_loss are averaged over the MoE layers (0 for a dense model); dropped is the
    assignments over capacity, summed over them; expert_token_counts is [num_layers, num_experts] (empty for a
    dense model).
    """

    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    seq_aux_loss: torch.Tensor | None = None
    dropped: torch.Tensor | None = None
    expert_token_counts: torch.Tensor | None = None


class GrokPreTrainedModel(PreTrainedModel):
    config: GrokConfig
    config_class = GrokConfig
    base_model_prefix = "model"
    _no_split_modules = ["GrokBlock"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    supports_gradient_checkpointing = False  # the trainer applies activation checkpointing from outside

    def initial_std(self, module: nn.Module, name: str) -> float | None:
        """How parameter `name` of `module` starts: normal(0, std), or None for ones (the norms' scales).
        transformers' init and the trainer's sharded init (train/initialization.py) both read it."""
        std = self.config.initializer_range
        # Residual-branch outputs get std / sqrt(2 * layers) (GPT-2 / nanoGPT), so depth does not grow them.
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        if isinstance(module, RMSNorm):
            return None
        if isinstance(module, nn.Embedding):
            # Scaled by embedding_multiplier = sqrt(d) on input, this gives unit-RMS input activations.
            return 1.0 / math.sqrt(self.config.hidden_size)
        if isinstance(module, nn.Linear):
            return residual_std if getattr(module, "is_residual_projection", False) else std
        if isinstance(module, MoE):
            return residual_std if name == "w_down" else std
        raise TypeError(f"no initialisation rule for {type(module).__name__}.{name}")

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        for name, param in module.named_parameters(recurse=False):
            std = self.initial_std(module, name)
            if std is None:
                init.ones_(param)
            else:
                init.normal_(param, 0.0, std)


class GrokModel(GrokPreTrainedModel):
    """Embedding, blocks and final norm; returns hidden states (no logits)."""

    def __init__(self, config: GrokConfig):
        super().__init__(config)
        self.embed_tokens = TiedEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GrokBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        cache: Cache | None = None,
        document_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> GrokModelOutput:
        """`document_ids` [batch, key length] numbers the documents of packed sequences: a token attends only
        to earlier tokens of its own document (None: to every earlier token)."""
        batch, query_len = input_ids.shape
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_len = cache.get_seq_length() if cache is not None else 0
        key_len = past_len + query_len

        key_keep = None  # which key positions are real tokens; None when there is no padding
        if attention_mask is not None and not bool(attention_mask.all()):
            key_keep = attention_mask[:, -key_len:].bool()
        if position_ids is None:
            if key_keep is not None:  # left padding: positions count real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -query_len:]
            else:
                position_ids = torch.arange(past_len, key_len, device=input_ids.device)[None]
        if document_ids is not None and tuple(document_ids.shape) != (batch, key_len):
            raise ValueError(
                f"document_ids has shape {tuple(document_ids.shape)}; it numbers every key position: pass "
                f"[{batch}, {key_len}]"
            )
        attention_inputs = make_attention_inputs(self.config, position_ids, query_len, key_len, key_keep, document_ids)

        h = self.embed_tokens(input_ids) * self.config.embedding_multiplier
        router_stats = []
        for block in self.layers:
            h, stats = block(h, attention_inputs, cache)
            if stats is not None:
                router_stats.append(stats)
        return GrokModelOutput(last_hidden_state=self.norm(h), router_stats=router_stats, **{CACHE_FIELD: cache})


class GrokForCausalLM(GrokPreTrainedModel, GenerationMixin):
    """Grok decoder. Grok-1 ties the output projection to the embedding (no lm_head); Grok-2 has a separate
    lm_head (tie_word_embeddings=False)."""

    def __init__(self, config: GrokConfig):
        super().__init__(config)
        self.model = GrokModel(config)
        self.lm_head = (
            None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        # (logits, targets) -> mean loss; a trainer whose logits are split over ranks replaces it.
        self.next_token_loss = next_token_loss
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head  # None when tied: the logits use the input embedding matrix directly

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        labels: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        cache: Cache | None = None,
        document_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> GrokCausalLMOutput:
        """`labels` follow transformers (same positions as input_ids, shifted here); `targets` are
        already aligned with the logits (nanoGPT style, what the trainer passes). -100 is ignored.
        `document_ids` keeps attention inside each document of packed sequences (GrokModel.forward)."""
        out = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            use_cache=use_cache,
            document_ids=document_ids,
        )
        h = out.last_hidden_state
        if logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        # The multiplier scales h (d wide) rather than the logits (vocabulary wide): the same product. (Public
        # Grok-2 loaders fold it into lm_head's weights instead: the same function again.)
        h = h * self.config.output_multiplier
        logits = self.model.embed_tokens(h, as_output=True) if self.lm_head is None else self.lm_head(h)
        logits = softcap(logits, self.config.final_logit_softcap)

        result = GrokCausalLMOutput(logits=logits, **{CACHE_FIELD: getattr(out, CACHE_FIELD)})
        self._attach_router_losses(result, out.router_stats, h)
        if labels is not None:
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)
        if targets is not None:
            result.lm_loss = self.next_token_loss(logits, targets)
            result.loss = result.lm_loss + router_loss(self.config, result.aux_loss, result.z_loss, result.seq_aux_loss)
        return result

    def _attach_router_losses(self, result: GrokCausalLMOutput, router_stats: list[RouterStats], h: torch.Tensor):
        if router_stats:
            # Each layer's stats live where its block ran: one device, except under a multi-GPU device_map.
            def gather(values: Iterable[torch.Tensor]) -> torch.Tensor:
                return torch.stack([v.to(h.device) for v in values])

            result.aux_loss = gather(s.aux_loss for s in router_stats).mean()
            result.z_loss = gather(s.z_loss for s in router_stats).mean()
            result.seq_aux_loss = gather(s.seq_aux_loss for s in router_stats).mean()
            result.dropped = gather(s.dropped for s in router_stats).sum()
            result.expert_token_counts = gather(s.expert_token_counts for s in router_stats)
        else:
            zero = torch.zeros((), dtype=torch.float32, device=h.device)
            result.aux_loss, result.z_loss, result.seq_aux_loss, result.dropped = zero, zero, zero, zero
            result.expert_token_counts = torch.zeros(0, 0, dtype=torch.long, device=h.device)
