import pytest
import torch

from model import GrokConfig, GrokForCausalLM


def small_config(**overrides) -> GrokConfig:
    """A model small enough that every test runs in well under a second on one core."""
    fields = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                  max_position_embeddings=64)
    return GrokConfig(**{**fields, **overrides})


def small_model(seed: int = 0, **overrides) -> GrokForCausalLM:
    torch.manual_seed(seed)
    return GrokForCausalLM(small_config(**overrides)).eval()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
