"""scripts/evaluate.py: loss, perplexity and bits per byte of a checkpoint or an export, computed by the
trainer's own validation function (train/validation.py), so the numbers match the trainer's."""

import json
import math
from pathlib import Path

import numpy as np
import torch

from data.loader import ArrayStream, val_batches, window_batches
from data.shards import DataError, TokenStream, check_tokenizer, read_manifest
from data.tokenizer import load as load_tokenizer
from data.tokenizer import token_byte_lengths
from groundwork.cli import ArgumentParser, integer, run_main
from groundwork.untrusted import regular_file
from train.parallel.precision import autocast
from train.validation import loss_sums, summarize
from train.weights import (
    load_for_inference,
    read_model_config,
    tokenizer_dir,
    tokenizer_for,
    tokenizer_hash,
    weights_kind,
)

EVALUATE_HELP = """Evaluate a checkpoint or an exported model on a prepared split or a text file: loss, perplexity and
bits per byte.

    python scripts/evaluate.py MODEL (--data DIR [--split val|train] | --text FILE) [--seq-len 128]
                               [--batch-size 8] [--max-sequences N] [--device cpu|cuda]

MODEL is a checkpoint folder (any strategy, any world size) or an exported Hugging Face folder; DIR is a
folder made by `python -m data.prepare` with the model's tokenizer (same vocabulary and same tokenizer
hash, checked); FILE is UTF-8 text, tokenised with the model's tokenizer as one document (undecodable
bytes replaced). Prints one JSON row with the keys the trainer logs (`val_loss` in nats per token,
`val_bpb` in bits per UTF-8 byte, `val_tokens`) plus `perplexity`: the same windows and the same function
as the trainer's validation, so the numbers match.
"""


def evaluate(
    model_path: Path,
    data: Path | None = None,
    split: str = "val",
    seq_len: int = 128,
    batch_size: int = 8,
    max_sequences: int | None = None,
    device: str = "cpu",
    text: Path | None = None,
) -> dict:
    if text is not None:  # a regular file: a FIFO would block, a link may point anywhere
        regular_file(text, "--text", "give a UTF-8 text file")
    weights_kind(model_path, "MODEL")
    config = read_model_config(model_path, "MODEL")
    context = config.max_position_embeddings
    if seq_len > context:
        raise DataError(f"--seq-len {seq_len} exceeds the model's context {context}; use at most {context}")
    # bad data, and a tokenizer that does not fit the model, fail here, before the model loads
    if text is None:
        manifest = read_manifest(data)
        if manifest["tokenizer"]["sha256"] != tokenizer_hash(model_path, "MODEL"):
            raise DataError(
                f"--data {data}: made with another tokenizer than MODEL {model_path}'s; evaluate on data "
                f"prepared with the model's tokenizer, or use --text FILE"
            )
        check_tokenizer(manifest, data, vocab_size=config.vocab_size)
        stream = TokenStream(data, split)  # every shard of the split verified against its checksum
        tokenizer = load_tokenizer(data)
    else:
        if tokenizer_dir(model_path) is None:
            raise DataError(f"MODEL {model_path}: no tokenizer to read --text with; use an export or --data")
        tokenizer = tokenizer_for(model_path, config, "MODEL")
        ids = tokenizer(text.read_bytes().decode("utf-8", errors="replace"), add_special_tokens=False).input_ids
        stream = ArrayStream(np.array(ids + [tokenizer.eos_token_id]))
        if len(stream) < seq_len + 1:
            raise DataError(f"--text {text}: {len(stream)} tokens, fewer than --seq-len + 1 = {seq_len + 1}")
    # a batch is allocated whole: never larger than the windows there are (padding rows count for nothing)
    windows = min((len(stream) - 1) // seq_len, max_sequences or len(stream))
    batch_size = max(1, min(batch_size, windows))
    model, _ = load_for_inference(model_path, "MODEL")
    model = model.to(device)
    if text is None:
        batches = val_batches(
            data, seq_len, batch_size, device=device, max_windows=max_sequences, split=split, verify_checksums=False
        )
    else:
        batches = window_batches(stream, seq_len, batch_size, device=device, max_windows=max_sequences)
        split = f"text:{text}"
    byte_lengths = torch.from_numpy(token_byte_lengths(tokenizer)).to(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    row = summarize(loss_sums(model, batches, byte_lengths, lambda: autocast(torch.device(device), dtype)))
    return {**row, "perplexity": math.exp(row["val_loss"]), "split": split, "seq_len": seq_len}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="scripts/evaluate.py", description=EVALUATE_HELP)
    parser.add_argument("model", type=Path, help="checkpoint folder or exported Hugging Face folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="a folder made by python -m data.prepare")
    source.add_argument("--text", type=Path, help="a UTF-8 text file")
    parser.add_argument("--split", default="val", choices=("val", "train"))
    parser.add_argument("--seq-len", type=integer(1), default=128)
    parser.add_argument("--batch-size", type=integer(1), default=8)
    parser.add_argument("--max-sequences", type=integer(1), help="only the first N windows (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; use --device cpu")
    return run_main(
        lambda: print(
            json.dumps(
                evaluate(
                    args.model,
                    args.data,
                    args.split,
                    args.seq_len,
                    args.batch_size,
                    args.max_sequences,
                    args.device,
                    args.text,
                )
            )
        )
    )
