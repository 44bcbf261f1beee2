"""The Grok-architecture model. `import model` also registers it with transformers' Auto classes,
so a saved folder loads with AutoModelForCausalLM.from_pretrained(path)."""

from transformers import AutoConfig, AutoModelForCausalLM

from .accounting import ParamCounts, count_parameters, flops_per_token
from .config import GrokConfig
from .grok import GrokCausalLMOutput, GrokForCausalLM, GrokModel
from .presets import PRESETS, preset_config

AutoConfig.register(GrokConfig.model_type, GrokConfig, exist_ok=True)
AutoModelForCausalLM.register(GrokConfig, GrokForCausalLM, exist_ok=True)

__all__ = [
    "GrokConfig",
    "GrokForCausalLM",
    "GrokModel",
    "GrokCausalLMOutput",
    "PRESETS",
    "preset_config",
    "ParamCounts",
    "count_parameters",
    "flops_per_token",
]
