"""Transformers integration: KV-cache generation, save/load, Auto classes, pipeline, the model CLI."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import in_process, small_model
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedTokenizerFast, pipeline

from model.__main__ import main as model_main

pytestmark = pytest.mark.compat  # every test: transformers' generation, cache and pipeline APIs change between versions


def _diverse_model():
    """Taught to count (next token = this token + 1) so greedy decoding does not settle on one token,
    which would make a broken cache look correct."""
    model = small_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        ids = (torch.randint(3, 97, (8, 1)) + torch.arange(16)) % 97
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def _greedy_without_cache(model, ids, steps):
    with torch.no_grad():
        for _ in range(steps):
            next_token = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_token], dim=1)
    return ids


@pytest.mark.parametrize("backend", ["eager", "flex"])
def test_cached_greedy_generation_equals_recomputation(backend):
    model = _diverse_model()
    model.config.attn_backend = backend
    prompt = torch.randint(3, 97, (2, 5))
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=24,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    generated = out.sequences
    assert torch.equal(generated, _greedy_without_cache(model, prompt, 24))
    assert len(set(generated[0, 5:].tolist())) > 4  # the comparison is not between two constant runs
    # every step's logits from the cache equal a full forward over the generated sequence
    with torch.no_grad():
        full = model(generated, use_cache=False).logits[:, 4:-1]
    torch.testing.assert_close(torch.stack(out.logits, dim=1), full, rtol=1e-4, atol=1e-4)


def test_cache_grows_and_matches_full_forward():
    model = _diverse_model()
    ids = torch.randint(3, 97, (1, 12))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        step_logits = [model(ids[:, :8], past_key_values=cache, use_cache=True).logits[:, -1]]
        for t in range(8, 12):
            step_logits.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, -1])
        full = model(ids).logits
    assert cache.get_seq_length() == 12
    torch.testing.assert_close(torch.stack(step_logits, 1), full[:, 7:], rtol=1e-5, atol=1e-5)


def test_left_padded_batch_generates_like_each_prompt_alone():
    model = _diverse_model()
    long_prompt, short_prompt = torch.randint(3, 97, (1, 8)), torch.randint(3, 97, (1, 5))
    batch = torch.cat([long_prompt, torch.cat([torch.zeros(1, 3, dtype=torch.long), short_prompt], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    kwargs = dict(max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    together = model.generate(batch, attention_mask=mask, **kwargs)
    alone = model.generate(short_prompt, attention_mask=torch.ones_like(short_prompt), **kwargs)
    assert torch.equal(together[1, 8:], alone[0, 5:])


def test_save_pretrained_round_trip_is_exact_and_safetensors_only(tmp_path):
    model = small_model(shared_intermediate_size=24, final_logit_softcap=50.0)
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert not any("lm_head" in key for key in f.keys())  # the output projection is the tied embedding
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "GrokForCausalLM"
    assert loaded.config.shared_intermediate_size == 24 and loaded.config.final_logit_softcap == 50.0
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_untied_lm_head_and_temperature_round_trip(tmp_path):
    """Grok-2's options survive save_pretrained / from_pretrained: its own lm_head, the temperature."""
    model = small_model(tie_word_embeddings=False, attn_temperature_len=4)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" in f.keys()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not loaded.config.tie_word_embeddings and loaded.config.attn_temperature_len == 4
    assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def _byte_bpe_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = ["To be, or not to be, that is the question.", "Whether 'tis nobler in the mind to suffer"] * 20
    tokenizer.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def test_text_generation_pipeline_on_a_saved_model(tmp_path):
    tokenizer = _byte_bpe_tokenizer(300)
    model = small_model(vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    generator = pipeline(
        "text-generation", model=str(tmp_path), tokenizer=AutoTokenizer.from_pretrained(tmp_path), device="cpu"
    )
    result = generator("To be, or not", max_new_tokens=8, do_sample=False)
    text = result[0]["generated_text"]
    assert text.startswith("To be, or not") and len(text) > len("To be, or not")


def _run_cli(*args):
    return in_process(model_main, *args)


@pytest.mark.distributed  # runs a command in a fresh interpreter
def test_cli_json_reports_counts_and_flops():
    result = subprocess.run(
        [sys.executable, "-m", "model", "grok-1", "--json"], capture_output=True, text=True, timeout=120
    )  # once as the command a user types
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert abs(info["params_total"] - 314e9) / 314e9 < 0.02
    assert 83e9 <= info["params_active"] <= 87e9
    assert info["flops_per_token"] == 6 * info["params_active"] + 12 * 64 * 48 * 128 * 8192


def test_cli_save_writes_a_loadable_folder(tmp_path):
    result = _run_cli("tiny", "--save", str(tmp_path / "tiny"))
    assert result.returncode == 0, result.stderr
    assert "total" in result.stdout
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
    assert loaded.config.num_local_experts == 8


def test_cli_rejects_bad_input_in_one_line():
    unknown = _run_cli("huge")
    assert unknown.returncode == 2 and "unknown preset 'huge'" in unknown.stderr
    too_big = _run_cli("grok-1", "--save", "/nonexistent/never-written")
    assert too_big.returncode == 2 and "--save" in too_big.stderr and "Traceback" not in too_big.stderr


@pytest.mark.parametrize("backend", ["eager", "flex"])
def test_attention_inputs_follow_the_blocks_across_devices(backend):
    """Under a multi-device device_map Accelerate moves each block's arguments with send_to_device: the
    rotary tables and masks built once per forward must go along ("meta" stands in for a second GPU)."""
    from accelerate.utils import send_to_device
    from conftest import small_config

    from model.attention import make_attention_inputs

    config = small_config(attn_backend=backend)
    inputs = make_attention_inputs(config, torch.arange(6)[None], 6, 6, torch.ones(1, 6, dtype=torch.long))
    assert send_to_device(inputs, "cpu") is inputs  # all blocks on one device: nothing is copied
    moved = send_to_device(inputs, "meta")
    assert moved.cos.is_meta and moved.sin.is_meta and moved.allowed.is_meta
    assert (moved.query_len, moved.key_len) == (6, 6) and not inputs.cos.is_meta
    if backend == "flex":  # the mask and the tensor its mask_mod reads both moved
        index = torch.tensor(0)
        assert moved.block_mask.kv_num_blocks.is_meta
        assert moved.block_mask.mask_mod(index, index, index, index).is_meta
        assert not inputs.block_mask.mask_mod(index, index, index, index).is_meta
