"""Sampling from a checkpoint or an export: the package code of scripts/generate.py."""

import sys
from collections import Counter
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast, TextStreamer

from data.tokenizer import load as load_tokenizer
from groundwork.cli import ArgumentParser, run_main
from train.checkpoint import CheckpointError
from train.weights import load_for_inference, tokenizer_dir, weights_kind

GENERATE_HELP = """Sample text from a checkpoint or an exported model, streaming tokens to the terminal.

    python scripts/generate.py MODEL [--prompt TEXT ...] [--prompt-file FILE] [--max-new-tokens 200]
                               [--temperature 0.8] [--top-k 50] [--top-p 0.95] [--greedy] [--seed 0]
                               [--device auto|cpu|cuda] [--no-stream] [--max-memory SPEC] [--offload-folder DIR]

MODEL is a checkpoint folder or an exported folder; each carries its own copy of the tokenizer. Generation is transformers' `generate()` with the model's KV cache. An export larger
than one device is placed by Accelerate (`device_map="auto"`): on GPUs always, and wherever --max-memory
gives a budget per device (`0=70GiB,cpu=200GiB`); blocks that fit nowhere stream from disk. Each prompt
(one per line of --prompt-file) prints its continuation; without a prompt, sampling starts from end-of-text.
"""


def parse_max_memory(spec: str) -> dict:
    """ "0=70GiB,cpu=200GiB" -> {0: "70GiB", "cpu": "200GiB"}: Accelerate's per-device budget."""
    budget = {}
    for item in spec.split(","):
        device, _, size = item.strip().partition("=")
        if not size or not (device.isdigit() or device == "cpu"):
            raise ValueError(
                f"--max-memory {spec!r}: write DEVICE=SIZE pairs, e.g. 0=70GiB,cpu=200GiB (DEVICE a GPU index or cpu)"
            )
        budget[int(device) if device.isdigit() else device] = size
    return budget


def load(model_path: Path, device: str, max_memory: dict | None = None, offload_folder: str | None = None):
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    placement = {}
    if on_gpu or max_memory:  # Accelerate places the blocks: GPUs first, then the CPU, then disk
        placement = {"device_map": "auto", "max_memory": max_memory, "offload_folder": offload_folder}
    weights_kind(model_path, "MODEL")
    if tokenizer_dir(model_path) is None:
        raise CheckpointError(
            f"MODEL {model_path}: holds no tokenizer.json; export the checkpoint with "
            f"--tokenizer DIR (the prepared data it trained on) and generate from the export"
        )
    tokenizer = load_tokenizer(model_path)  # before the weights: a bad tokenizer fails in a moment
    model, _ = load_for_inference(model_path, "MODEL", dtype=torch.bfloat16 if on_gpu else torch.float32, **placement)
    placed = getattr(model, "hf_device_map", None)
    if placed:
        counts = Counter(str(where) for where in placed.values())
        print(
            "placed by Accelerate: " + ", ".join(f"{n} module(s) on {where}" for where, n in counts.items()),
            file=sys.stderr,
        )
    elif on_gpu and model.device.type != "cuda":
        model = model.to("cuda")
    return model, tokenizer


def input_device(model: PreTrainedModel) -> torch.device:
    """Where the prompt goes. Under a device_map, Accelerate runs CPU- and disk-offloaded blocks on its main
    device, the first GPU in the map (the CPU if none); model.device would name the first weight's, maybe meta."""
    placed = getattr(model, "hf_device_map", None)
    if not placed:
        return model.device
    gpu = next((where for where in placed.values() if isinstance(where, int)), None)
    return torch.device("cuda", gpu) if gpu is not None else torch.device("cpu")


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    prompt: str,
    max_new_tokens: int,
    greedy: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    stream: bool,
) -> str:
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        ids = torch.tensor([[tokenizer.eos_token_id]])
    ids = ids.to(input_device(model))
    sampling = (
        {"do_sample": False}
        if greedy
        else {"do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    )
    streamer = TextStreamer(tokenizer, skip_prompt=False) if stream else None
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=None,
        streamer=streamer,
        **sampling,
    )
    return tokenizer.decode(out[0], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="scripts/generate.py", description=GENERATE_HELP)
    parser.add_argument("model", type=Path, help="checkpoint folder or exported Hugging Face folder")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompt-file", type=Path, help="one prompt per line")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (ignores the sampling options)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--no-stream", action="store_true", help="print each continuation when it is complete")
    parser.add_argument(
        "--max-memory",
        help="memory per device for an export larger than one, e.g. "
        "0=70GiB,1=70GiB,cpu=200GiB: Accelerate fills them in order and puts the rest on disk",
    )
    parser.add_argument(
        "--offload-folder",
        help="where weights that fit nowhere are kept (default: read in place from the export's safetensors)",
    )
    args = parser.parse_args(argv)
    if args.temperature <= 0 or not 0 < args.top_p <= 1 or args.top_k < 0 or args.max_new_tokens < 1:
        parser.error("--temperature must be > 0, --top-p in (0, 1], --top-k >= 0, --max-new-tokens >= 1")
    prompts = list(args.prompt)
    if args.prompt_file:
        if not args.prompt_file.is_file():
            parser.error(f"--prompt-file {args.prompt_file}: no such file")
        try:
            prompts += [line for line in args.prompt_file.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as error:
            parser.error(f"--prompt-file {args.prompt_file}: unreadable as UTF-8 text ({error})")
    try:
        max_memory = parse_max_memory(args.max_memory) if args.max_memory else None
    except ValueError as error:
        parser.error(str(error))
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; use --device cpu or auto")

    def work():
        model, tokenizer = load(args.model, args.device, max_memory, args.offload_folder)
        torch.manual_seed(args.seed)
        for prompt in prompts or [""]:
            text = generate(
                model,
                tokenizer,
                prompt,
                args.max_new_tokens,
                args.greedy,
                args.temperature,
                args.top_k,
                args.top_p,
                stream=not args.no_stream,
            )
            if args.no_stream:
                print(text)
            print(flush=True)

    return run_main(work)
