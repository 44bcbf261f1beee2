"""Sampling from a checkpoint or an export: the package code of scripts/generate.py."""

import argparse
import math
import sys
from collections import Counter
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast, TextStreamer
from transformers.utils.hub import convert_file_size_to_int

from groundwork.cli import ArgumentParser, integer, run_main
from groundwork.folders import FolderError
from groundwork.untrusted import read_text
from train.checkpoint import CheckpointError
from train.weights import load_for_inference, read_model_config, tokenizer_dir, tokenizer_for, weights_kind

DEFAULT_NEW_TOKENS = 200  # or what is left of the context after the prompt, if less
OFFLOAD_FILES = ("index.json", ".dat")  # what Accelerate writes into an offload folder

GENERATE_HELP = """Sample text from a checkpoint or an exported model, streaming tokens to the terminal.

    python scripts/generate.py MODEL [--prompt TEXT ...] [--prompt-file FILE] [--max-new-tokens N]
                               [--beyond-context] [--temperature 0.8] [--top-k 50] [--top-p 0.95] [--greedy] [--seed 0]
                               [--device auto|cpu|cuda] [--no-stream] [--max-memory SPEC] [--offload-folder DIR]

MODEL is a checkpoint folder or an exported folder; each carries its own copy of the tokenizer. Generation is transformers' `generate()` with the model's KV cache. An export larger
than one device is placed by Accelerate (`device_map="auto"`): on GPUs always, and wherever --max-memory
gives a budget per device (`0=70GiB,cpu=200GiB`); blocks that fit nowhere stream from disk. Each prompt
(one per line of --prompt-file) prints its continuation; without a prompt, sampling starts from end-of-text.

--max-new-tokens (default 200, or what the context leaves after the prompt) is capped by the model's context
(max_position_embeddings) minus the prompt: more stops in one line before the model loads, unless
--beyond-context asks for it (time and memory then grow with the tokens asked; the model was not trained
on positions past its context).
"""


def parse_max_memory(spec: str) -> dict:
    """ "0=70GiB,cpu=200GiB" -> {0: "70GiB", "cpu": "200GiB"}: Accelerate's per-device budget."""
    budget = {}
    for item in spec.split(","):
        device, _, size = item.strip().partition("=")
        try:
            size_bytes = convert_file_size_to_int(size)
        except ValueError:
            size_bytes = 0
        if not (device.isdigit() or device == "cpu") or not isinstance(size_bytes, int) or size_bytes < 1:
            raise ValueError(
                f"--max-memory {spec!r}: write DEVICE=SIZE pairs, e.g. 0=70GiB,cpu=200GiB (DEVICE a GPU index or cpu)"
            )
        budget[int(device) if device.isdigit() else device] = size
    return budget


def check_offload_folder(folder: Path) -> None:
    """Accelerate writes index.json and *.dat files into the offload folder: never into a user's folder."""
    folder = Path(folder)
    if folder.is_symlink():
        raise FolderError(
            f"--offload-folder {folder}: is a symlink; give the real path (nothing is written through one)"
        )
    if folder.exists() and not folder.is_dir():
        raise FolderError(f"--offload-folder {folder}: is a file; give a new or empty folder")
    if folder.is_dir() and not all(p.is_file() and p.name.endswith(OFFLOAD_FILES) for p in folder.iterdir()):
        raise FolderError(
            f"--offload-folder {folder}: holds files Accelerate did not write there (only index.json and *.dat "
            f"are expected); give a new or empty folder"
        )


def prompt_ids(tokenizer: PreTrainedTokenizerFast, prompt: str) -> torch.Tensor:
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    return ids if ids.shape[1] else torch.tensor([[tokenizer.eos_token_id]])


def new_tokens(asked: int | None, prompt_length: int, context: int, beyond_context: bool) -> int:
    """How many tokens to generate after a prompt: at most what the model's context leaves."""
    room = context - prompt_length
    if beyond_context:
        return asked or DEFAULT_NEW_TOKENS
    if room < 1:
        raise CheckpointError(
            f"--prompt: {prompt_length} tokens fill the model's context of {context} (max_position_embeddings); "
            f"shorten the prompt, or pass --beyond-context"
        )
    if asked is None:
        return min(DEFAULT_NEW_TOKENS, room)
    if asked > room:
        raise CheckpointError(
            f"--max-new-tokens {asked}: with a {prompt_length}-token prompt that passes the model's context of "
            f"{context} (max_position_embeddings); ask for at most {room}, or pass --beyond-context"
        )
    return asked


def load_tokenizer(model_path: Path) -> PreTrainedTokenizerFast:
    """The model's own tokenizer, before its weights: a bad one (or one larger than the model) fails in a moment."""
    weights_kind(model_path, "MODEL")
    if tokenizer_dir(model_path) is None:
        raise CheckpointError(
            f"MODEL {model_path}: holds no tokenizer.json; export the checkpoint with "
            f"--tokenizer DIR (the prepared data it trained on) and generate from the export"
        )
    return tokenizer_for(model_path, read_model_config(model_path, "MODEL"), "MODEL")


def load(model_path: Path, device: str, max_memory: dict | None = None, offload_folder: str | None = None):
    on_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    placement = {}
    if on_gpu or max_memory:  # Accelerate places the blocks: GPUs first, then the CPU, then disk
        placement = {"device_map": "auto", "max_memory": max_memory, "offload_folder": offload_folder}
    if placement and offload_folder:
        check_offload_folder(Path(offload_folder))
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
    return model


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
    ids: torch.Tensor,
    max_new_tokens: int,
    greedy: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    stream: bool,
) -> str:
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


def seed(text: str) -> int:
    """An argparse type: a seed torch accepts (0 to 2**63 - 1)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer from 0 to 2**63 - 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="scripts/generate.py", description=GENERATE_HELP)
    parser.add_argument("model", type=Path, help="checkpoint folder or exported Hugging Face folder")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompt-file", type=Path, help="one prompt per line")
    parser.add_argument(
        "--max-new-tokens",
        type=integer(1),
        help=f"tokens to generate after each prompt (default {DEFAULT_NEW_TOKENS}, or what the context leaves); "
        "at most the model's context (max_position_embeddings) minus the prompt",
    )
    parser.add_argument(
        "--beyond-context",
        action="store_true",
        help="allow --max-new-tokens past the model's context: time and memory grow with the tokens asked, and "
        "positions past the context were never trained",
    )
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=integer(0), default=50)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (ignores the sampling options)")
    parser.add_argument("--seed", type=seed, default=0, help="the sampling seed, 0 to 2**63 - 1")
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
    if not 0 < args.temperature < math.inf or not 0 < args.top_p <= 1:
        parser.error("--temperature must be a finite number > 0, --top-p in (0, 1]")
    try:
        max_memory = parse_max_memory(args.max_memory) if args.max_memory else None
    except ValueError as error:
        parser.error(str(error))
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; use --device cpu or auto")

    def work():
        prompts = list(args.prompt)
        if args.prompt_file:  # a regular UTF-8 file (a FIFO would block), of a prompt file's size
            text = read_text(args.prompt_file, "--prompt-file", "give a UTF-8 text file, one prompt per line")
            prompts += [line for line in text.splitlines() if line.strip()]
        tokenizer = load_tokenizer(args.model)
        context = read_model_config(args.model, "MODEL").max_position_embeddings
        # every prompt's budget checked before the weights load: a refusal costs nothing
        jobs = [
            (ids, new_tokens(args.max_new_tokens, ids.shape[1], context, args.beyond_context))
            for ids in (prompt_ids(tokenizer, prompt) for prompt in prompts or [""])
        ]
        model = load(args.model, args.device, max_memory, args.offload_folder)
        torch.manual_seed(args.seed)
        for ids, count in jobs:
            text = generate(
                model,
                tokenizer,
                ids,
                count,
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
