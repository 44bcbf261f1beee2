"""The planner reads a Hugging Face config.json: the parameter counts of public models come out as their
publications state them, this project's exports as the model counts itself, and a config it cannot read
stops in one line naming the file and the field."""

import dataclasses
import json

import pytest
from conftest import in_process

from toolbox import plan
from toolbox.planner.hf_config import spec_from_hf_config
from toolbox.planner.spec import REFERENCES

# The shape fields of the public config.json files (model_type and what the planner reads).
CONFIGS = {
    "mixtral-8x7b": {
        "model_type": "mixtral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "vocab_size": 32000,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
    },
    "gpt-oss-120b": {
        "model_type": "gpt_oss",
        "hidden_size": 2880,
        "intermediate_size": 2880,
        "head_dim": 64,
        "num_hidden_layers": 36,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "num_local_experts": 128,
        "num_experts_per_tok": 4,
        "vocab_size": 201088,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
    },
    "qwen1.5-moe-a2.7b": {
        "model_type": "qwen2_moe",
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "decoder_sparse_step": 1,
        "vocab_size": 151936,
        "tie_word_embeddings": False,
    },
    "llama-3.1-405b": {
        "model_type": "llama",
        "hidden_size": 16384,
        "intermediate_size": 53248,
        "num_hidden_layers": 126,
        "num_attention_heads": 128,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
    },
    "deepseek-v3": {
        "model_type": "deepseek_v3",
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 61,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "first_k_dense_replace": 3,
        "n_group": 8,
        "topk_group": 4,
        "q_lora_rank": 1536,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "num_nextn_predict_layers": 1,
        "vocab_size": 129280,
        "max_position_embeddings": 163840,
        "tie_word_embeddings": False,
    },
}
# (total, active) parameters as published: Mixtral's paper (46.7B / 12.9B: its active count includes the input
# embedding, 0.13B, which the planner does not multiply), OpenAI's GPT-OSS model card (116.8B / 5.1B),
# Qwen1.5-MoE's card (14.3B total; "A2.7B" counts both embedding matrices, 0.62B) and Llama 3 (405B).
PUBLISHED = {
    "mixtral-8x7b": (46.7e9, 12.9e9 - 0.13e9),
    "gpt-oss-120b": (116.8e9, 5.1e9),
    "qwen1.5-moe-a2.7b": (14.3e9, 2.7e9 - 0.31e9),
    "llama-3.1-405b": (405e9, 405e9 - 2.1e9),
}


def write_config(folder, fields) -> str:
    path = folder / "config.json"
    path.write_text(json.dumps(fields))
    return str(path)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_public_configs_give_the_published_parameter_counts(tmp_path, name):
    spec = spec_from_hf_config(write_config(tmp_path, CONFIGS[name]))
    total, active = PUBLISHED[name]
    assert spec.params_total == pytest.approx(total, rel=0.01)
    assert spec.params_active == pytest.approx(active, rel=0.02)


def test_the_deepseek_v3_config_gives_the_built_in_reference_spec(tmp_path):
    spec = spec_from_hf_config(write_config(tmp_path, CONFIGS["deepseek-v3"]))
    reference = REFERENCES["deepseek-v3"]
    same = {field.name for field in dataclasses.fields(spec)} - {"name", "context"}
    assert {name: getattr(spec, name) for name in same} == {name: getattr(reference, name) for name in same}


def test_an_export_of_this_project_is_read_as_the_model_counts_itself(tmp_path):
    import torch

    from model import GrokForCausalLM, count_parameters, preset_config

    config = preset_config("grok-2")
    config.save_pretrained(tmp_path)  # the config.json an export holds
    spec = spec_from_hf_config(tmp_path)
    with torch.device("meta"):
        counts = count_parameters(GrokForCausalLM(config))
    assert spec.params_total == pytest.approx(counts.total, rel=2e-3)
    assert spec.params_active == pytest.approx(counts.active, rel=3e-3)


def test_the_cli_plans_a_config_json(tmp_path):
    path = write_config(tmp_path, CONFIGS["mixtral-8x7b"])
    result = in_process(plan.main, "--model", path, "--gpus", "64", "--ep", "8", "--checkpointing", "full", "--json")
    row = json.loads(result.stdout)
    assert result.returncode == 0 and row["fits"], result.stderr
    assert row["params_total"] == pytest.approx(46.7e9, rel=0.01) and row["trainer_flags"] is not None
    searched = in_process(plan.main, "--model", path, "--gpus", "64", "--search", "--top", "2", "--json")
    assert searched.returncode == 0 and len(searched.stdout.splitlines()) == 2


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({"model_type": "bert"}, "model_type 'bert' is not one the planner reads"),
        ({**CONFIGS["mixtral-8x7b"], "num_local_experts": "8"}, "num_local_experts is '8', not a whole number"),
        ({k: v for k, v in CONFIGS["deepseek-v3"].items() if k != "kv_lora_rank"}, "no 'kv_lora_rank'"),
        ({**CONFIGS["mixtral-8x7b"], "tie_word_embeddings": "no"}, "tie_word_embeddings is 'no', not true or false"),
    ],
)
def test_a_config_the_planner_cannot_read_is_one_line_naming_the_field(tmp_path, fields, fragment):
    result = in_process(plan.main, "--model", write_config(tmp_path, fields), "--gpus", "8")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and fragment in lines[0] and "config.json" in lines[0], lines
    typo = in_process(plan.main, "--model", "grok1", "--gpus", "8")
    assert typo.returncode == 2 and "neither a model" in typo.stderr
