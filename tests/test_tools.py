"""The user's tools on a trained checkpoint and its export: evaluate.py (the trainer's own numbers) and
generate.py (transformers generate with the KV cache, streaming)."""

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import REPO, in_process
from transformers import AutoModelForCausalLM, AutoTokenizer

from toolbox import bench, evaluation, export, generation, plot

SCRIPTS = {
    "scripts/export_hf.py": export.main,
    "scripts/evaluate.py": evaluation.main,
    "scripts/generate.py": generation.main,
    "scripts/plot.py": plot.main,
    "scripts/bench.py": bench.main,
}


def tool(script, *args, ok=True) -> subprocess.CompletedProcess:
    result = in_process(SCRIPTS[script], *args)
    if ok:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def command(*args) -> subprocess.CompletedProcess:
    """A script as a user runs it, in its own interpreter."""
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(reference, tmp_path_factory):
    rows, out = reference
    checkpoint = out / "checkpoints" / "step_00000012"
    export = tmp_path_factory.mktemp("tools") / "hf"
    tool("scripts/export_hf.py", str(checkpoint), str(export))
    return rows, checkpoint, export


@pytest.mark.compat
def test_evaluate_reproduces_the_trainers_validation(trained, data_dir):
    rows, checkpoint, export = trained
    for model in (checkpoint, export):
        result = json.loads(
            tool(
                "scripts/evaluate.py",
                str(model),
                "--data",
                str(data_dir),
                "--seq-len",
                "64",
                "--batch-size",
                "4",
                "--max-sequences",
                "16",
            ).stdout
        )
        assert abs(result["val_loss"] - rows[-1]["val_loss"]) < 1e-6
        assert abs(result["val_bpb"] - rows[-1]["val_bpb"]) < 1e-6
        assert result["val_tokens"] == rows[-1]["val_tokens"]
        assert result["perplexity"] == pytest.approx(math.exp(result["val_loss"]))


def test_evaluate_a_text_file_with_the_models_tokenizer(trained, tmp_path):
    _, checkpoint, export = trained
    text = "Natürlich: every byte is one token of this byte-level model.\n" * 40
    (tmp_path / "t.txt").write_text(text)
    for model in (checkpoint, export):
        result = json.loads(
            tool("scripts/evaluate.py", str(model), "--text", str(tmp_path / "t.txt"), "--seq-len", "64").stdout
        )
        n_tokens = len(text.encode()) + 1  # + the EOS after the document
        assert result["val_tokens"] == (n_tokens - 1) // 64 * 64
        assert result["val_bpb"] == pytest.approx(result["val_loss"] / math.log(2))  # one byte per token
        assert 0 < result["val_loss"] < 10


@pytest.mark.compat
def test_generate_greedy_from_checkpoint_and_export_matches_transformers(trained):
    _, checkpoint, export = trained
    args = ["--prompt", "The ", "--prompt", "def ", "--max-new-tokens", "24", "--greedy"]
    from_checkpoint = tool("scripts/generate.py", str(checkpoint), *args, "--no-stream").stdout
    streamed = tool("scripts/generate.py", str(export), *args).stdout
    import model  # noqa: F401  (registers the Auto classes)

    lm, tokenizer = AutoModelForCausalLM.from_pretrained(export).eval(), AutoTokenizer.from_pretrained(export)
    expected = []
    for prompt in ("The ", "def "):
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        out = lm.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=tokenizer.pad_token_id,
        )
        assert out.shape[1] == ids.shape[1] + 24
        expected.append(tokenizer.decode(out[0], skip_special_tokens=True))
    assert [line for line in from_checkpoint.split("\n\n") if line.strip()][:2] == expected
    assert streamed.replace("\n", "") == from_checkpoint.replace("\n", "")


def test_generate_from_an_export_larger_than_its_memory_budget(trained, tmp_path):
    """device_map="auto" with a budget too small for the model: Accelerate streams blocks from disk, and the
    text is the same (this checks that every weight is read through its own module's forward)."""
    _, checkpoint, export = trained
    args = ["--prompt", "def ", "--max-new-tokens", "24", "--greedy", "--no-stream"]
    offloaded = tool(
        "scripts/generate.py",
        str(export),
        *args,
        "--max-memory",
        "cpu=1MB",
        "--offload-folder",
        str(tmp_path / "offload"),
    )
    assert "on disk" in offloaded.stderr  # read from the safetensors file itself, so the folder may stay empty
    assert offloaded.stdout == tool("scripts/generate.py", str(export), *args).stdout
    refused = tool("scripts/generate.py", str(checkpoint), "--max-memory", "cpu=1MB", ok=False)
    assert refused.returncode == 2 and "export this checkpoint" in refused.stderr


def test_sampling_is_seeded(trained):
    _, checkpoint, _ = trained
    runs = [
        tool(
            "scripts/generate.py", str(checkpoint), "--max-new-tokens", "32", "--seed", str(seed), "--no-stream"
        ).stdout
        for seed in (7, 7, 8)
    ]
    assert runs[0] == runs[1] != runs[2]


@pytest.mark.distributed  # runs a command in a fresh interpreter
def test_tools_reject_a_bad_model_path_in_one_line(tmp_path, data_dir):
    for script in ("scripts/generate.py", "scripts/evaluate.py"):
        extra = ["--data", str(data_dir)] if "evaluate" in script else []
        result = command(script, str(tmp_path), *extra)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: MODEL {tmp_path}: neither a complete checkpoint")


def test_plot_writes_a_png_of_one_or_several_runs(reference, tmp_path):
    _, out = reference
    tool("scripts/plot.py", str(out), str(out), "--out", str(tmp_path / "two.png"))
    png = (tmp_path / "two.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    result = tool("scripts/plot.py", str(tmp_path / "nothing"), ok=False)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: ") and "metrics.jsonl" in result.stderr


@pytest.mark.compat
def test_export_has_a_model_card_and_runs_in_a_text_generation_pipeline(trained):
    rows, _, export = trained
    card = (export / "README.md").read_text()
    assert "| preset | tiny |" in card and f"{rows[-1]['val_loss']:.4f} nats/token" in card
    from transformers import pipeline

    import model  # noqa: F401  (registers the Auto classes)

    generator = pipeline("text-generation", model=str(export))
    text = generator("The ", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("The ") and len(text) > len("The ")


@pytest.mark.compat
def test_bench_model_runs_a_config_with_overrides():
    """The script the GPU figures come from: it takes a trainer config and the trainer's overrides."""
    result = tool(
        "scripts/bench.py",
        "model",
        "--config",
        str(REPO / "configs" / "tiny.toml"),
        "--batch.micro_batch_size=2",
        "--data.seq_len=16",
        "--model.overrides.num_hidden_layers=1",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--json",
    )
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert (row["preset"], row["micro_batch"], row["seq_len"], row["compile"]) == ("tiny", 2, 16, False)
    assert row["tokens_per_s"] > 0 and row["achieved_tflops"] > 0 and row["dtype"] == "fp32"
    # the FLOP rate is the model's FLOPs a token times its tokens/s, to four figures even when it is tiny (a
    # slow CPU step of this model is ~0.005 TFLOP/s: rounded to four decimals, it read 0.0 on a loaded machine)
    from model import GrokForCausalLM, count_parameters, flops_per_token, preset_config

    config = preset_config("tiny", num_hidden_layers=1)
    with torch.device("meta"):
        active = count_parameters(GrokForCausalLM(config)).active
    expected = flops_per_token(config, active, 16) * row["tokens_per_s"] / 1e12
    rounding = 0.5 / row["tokens_per_s"] + 5e-4  # tokens/s is a whole number, the FLOP rate four figures
    assert row["achieved_tflops"] == pytest.approx(expected, rel=rounding)
    for override, named in (("--optim.lr=-1", "optim.lr"), ("--model.overrides.attn_backend=flex", "flex")):
        bad = tool("scripts/bench.py", "model", override, ok=False)  # the trainer's checks, in one line
        assert bad.returncode == 2 and bad.stderr.startswith("error: ") and named in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1


def test_nanogpt_baseline_recipe_scores_held_out_characters_in_bits_per_byte():
    """The yardstick of `bench.py baseline/quality`: an untrained model scores ~log2(vocabulary) bits a
    character, and a few steps of the recipe run and report their figures."""
    from toolbox.baseline import NanoGPT, bits_per_byte, char_splits, train_recipe

    text = "".join(chr(97 + (i * 7) % 13) for i in range(3000))
    train_ids, val_ids, vocab = char_splits(text)
    assert vocab == 13 and len(train_ids) == 2700 and len(val_ids) == 300
    untrained = bits_per_byte(NanoGPT(vocab, 16, layers=1, heads=2, width=16), val_ids, context=16)
    assert abs(untrained - math.log2(13)) < 0.2
    result = train_recipe(text, steps=30, batch=4, context=16, warmup=5)
    assert result["val_bpb"] < untrained and result["seconds"] > 0 and result["train_tokens_per_s"] > 0
