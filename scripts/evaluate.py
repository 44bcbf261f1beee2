"""Evaluate a checkpoint or an exported model on a prepared split or a text file: loss, perplexity and
bits per byte.

    python scripts/evaluate.py MODEL (--data DIR [--split val|train] | --text FILE) [--seq-len 128]
                               [--batch-size 8] [--max-sequences N] [--device cpu|cuda]

MODEL is a checkpoint folder (any strategy, any world size) or an exported Hugging Face folder; DIR is a
folder made by `python -m data.prepare` with the model's tokenizer; FILE is UTF-8 text, tokenised with the
model's tokenizer as one document (undecodable bytes replaced). Prints one JSON row with the keys the
trainer logs (`val_loss` in nats per token, `val_bpb` in bits per UTF-8 byte, `val_tokens`) plus
`perplexity`: the same windows and the same function as the trainer's validation, so the numbers match.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.loader import ArrayStream, val_batches, window_batches  # noqa: E402
from data.shards import DataError, check_tokenizer, read_manifest  # noqa: E402
from data.tokenizer import load as load_tokenizer  # noqa: E402
from data.tokenizer import token_byte_lengths  # noqa: E402
from train.checkpoint import CheckpointError, load_for_inference  # noqa: E402
from train.evaluation import loss_sums, summarize  # noqa: E402


def evaluate(model_path: Path, data: Path | None = None, split: str = "val", seq_len: int = 128, batch_size: int = 8,
             max_sequences: int | None = None, device: str = "cpu", text: Path | None = None) -> dict:
    if text is not None and not text.is_file():
        raise DataError(f"--text {text}: no such file")
    manifest = read_manifest(data) if text is None else None  # bad data fails here, before the model loads
    model, tokenizer_dir = load_for_inference(model_path, "MODEL")
    if seq_len > model.config.max_position_embeddings:
        raise DataError(f"--seq-len {seq_len} exceeds the model's context {model.config.max_position_embeddings}")
    model = model.to(device)
    if text is None:
        check_tokenizer(manifest, data, vocab_size=model.config.vocab_size)
        tokenizer = load_tokenizer(data)
        batches = val_batches(data, seq_len, batch_size, device=device, max_windows=max_sequences, split=split)
    else:
        if tokenizer_dir is None or not (tokenizer_dir / "tokenizer.json").is_file():
            raise DataError(f"MODEL {model_path}: no tokenizer to read --text with; use an export or --data")
        tokenizer = load_tokenizer(tokenizer_dir)
        ids = tokenizer(text.read_bytes().decode("utf-8", errors="replace"), add_special_tokens=False).input_ids
        stream = ArrayStream(np.array(ids + [tokenizer.eos_token_id]))
        if len(stream) < seq_len + 1:
            raise DataError(f"--text {text}: {len(stream)} tokens, fewer than --seq-len + 1 = {seq_len + 1}")
        batches = window_batches(stream, seq_len, batch_size, device=device, max_windows=max_sequences)
        split = f"text:{text}"
    byte_lengths = torch.from_numpy(token_byte_lengths(tokenizer)).to(device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda" else None
    row = summarize(loss_sums(model, batches, byte_lengths, **({"autocast": autocast} if autocast else {})))
    return {**row, "perplexity": math.exp(row["val_loss"]), "split": split, "seq_len": seq_len}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/evaluate.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="checkpoint folder or exported Hugging Face folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="a folder made by python -m data.prepare")
    source.add_argument("--text", type=Path, help="a UTF-8 text file")
    parser.add_argument("--split", default="val", choices=("val", "train"))
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-sequences", type=int, help="only the first N windows (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    try:
        row = evaluate(args.model, args.data, args.split, args.seq_len, args.batch_size, args.max_sequences,
                       args.device, args.text)
    except (CheckpointError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
