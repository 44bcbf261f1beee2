"""python -m data.prepare --source SRC --out DIR: corpus -> tokenizer -> packed token shards.

SRC is `stdlib` (the running Python's standard library, offline, the default corpus), a local file or
folder (.txt, .txt.gz, .jsonl(.gz), .parquet), or a Hugging Face hub dataset name (needs network).
Documents are split into train/val whole (seeded), the tokenizer is trained on train only, and both
splits are tokenised with EOS after every document into flat binary shards plus manifest.json.
The output appears atomically: everything is written to a temporary folder renamed at the end. Re-running
with the same arguments reuses the finished folder; identical inputs give identical bytes. --overwrite
replaces only a folder this command made; any other existing, non-empty --out is refused.
"""

import argparse
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from groundwork import folders
from groundwork.cli import ArgumentParser, run_main

from . import tokenizer as tok
from .shards import FORMAT_VERSION, DataError, ShardWriter, read_manifest, token_dtype, write_manifest

if TYPE_CHECKING:
    import datasets  # only for annotations: imported where data is prepared


def split_documents(
    n_documents: int, val_fraction: float, seed: int, val_from: str = "random"
) -> tuple[np.ndarray, np.ndarray]:
    """Train and val document indices (each sorted): a seeded choice of whole documents, or (val_from "end")
    the last ones in corpus order, e.g. the end of a single text split into paragraphs."""
    n_val = max(1, round(val_fraction * n_documents)) if val_fraction > 0 else 0
    if n_val >= n_documents:
        raise DataError(
            f"--val-fraction {val_fraction}: {n_documents} document(s) leave an empty train split; "
            f"use a larger corpus or a smaller --val-fraction"
        )
    if val_from == "end":
        return np.arange(n_documents - n_val), np.arange(n_documents - n_val, n_documents)
    order = np.random.default_rng(seed).permutation(n_documents)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


_worker_tokenizers: dict = {}


def _encode_batch(batch: Mapping[str, list[str]], tokenizer_path: str):
    """datasets.map worker: token ids of each document, EOS appended (the separator of the packed stream)."""
    if tokenizer_path not in _worker_tokenizers:
        _worker_tokenizers[tokenizer_path] = tok.Tokenizer.from_file(tokenizer_path)
    encodings = _worker_tokenizers[tokenizer_path].encode_batch(batch["text"], add_special_tokens=False)
    return {"ids": [e.ids + [tok.EOS_ID] for e in encodings]}


def write_split(
    documents: "datasets.Dataset", folder: Path, split: str, dtype: np.dtype, shard_tokens: int, num_proc: int
) -> dict:
    encoded = documents.map(
        _encode_batch,
        batched=True,
        batch_size=256,
        num_proc=num_proc if num_proc > 1 else None,
        fn_kwargs={"tokenizer_path": str(folder / "tokenizer.json")},
        remove_columns=["text"],
        desc=f"tokenising {split}",
    )
    writer = ShardWriter(folder, split, dtype, shard_tokens)
    for start in range(0, len(encoded), 4096):
        ids = encoded[start : start + 4096]["ids"]
        writer.write(np.concatenate([np.asarray(x, dtype=np.int64) for x in ids]))
    shards = writer.close()
    return {
        "documents": len(documents),
        "tokens": sum(s["tokens"] for s in shards),
        "shards": shards,
        "max_token_id": writer.max_token_id,
    }


def prepare(args: argparse.Namespace) -> dict:
    from .sources import load_corpus  # imports `datasets`: only where data is prepared

    out = Path(args.out)
    settings = {
        k: getattr(args, k)
        for k in (
            "source",
            "tokenizer",
            "vocab_size",
            "val_fraction",
            "text_field",
            "sample_by",
            "seed",
            "shard_tokens",
            "hub_config",
            "hub_split",
            "max_documents",
        )
    }
    if args.val_from != "random":  # recorded only when set, so folders prepared before the option still match
        settings["val_from"] = args.val_from
    if (out / "manifest.json").exists() and not args.overwrite:
        manifest = read_manifest(out)
        if manifest["settings"] != settings:
            raise DataError(f"{out}: already prepared with other settings; pass --overwrite or choose another --out")
        _check_seq_len(manifest, args.seq_len, out)
        print(f"{out}: already prepared with these settings, reusing it", file=sys.stderr)
        return manifest
    folders.check_replaceable(out, "data", "--out", args.overwrite)  # before the corpus is read

    started = time.perf_counter()
    corpus = load_corpus(
        args.source,
        args.text_field,
        args.sample_by,
        args.hub_config,
        args.hub_split,
        args.streaming,
        args.max_documents,
    )
    train_idx, val_idx = split_documents(len(corpus.documents), args.val_fraction, args.seed, args.val_from)
    splits = {"train": corpus.documents.select(train_idx), "val": corpus.documents.select(val_idx)}

    folders.remove_leftovers(out.parent, out.name, "data")  # what an interrupted run left
    with folders.atomic_folder(out, "data", "--out", args.overwrite) as tmp:
        if args.tokenizer == "bpe":
            texts = (splits["train"][i : i + 1000]["text"] for i in range(0, len(splits["train"]), 1000))
            tokenizer = tok.train_bpe(texts, args.vocab_size)
        else:
            tokenizer = tok.byte_tokenizer()
        tokenizer_hash = tok.save(tokenizer, tmp)
        vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        dtype = token_dtype(vocab_size)
        written = {
            name: write_split(docs, tmp, name, dtype, args.shard_tokens, args.num_proc) for name, docs in splits.items()
        }
        manifest = {
            "format_version": FORMAT_VERSION,
            "source": corpus.description,
            "settings": settings,
            "tokenizer": {
                "kind": args.tokenizer,
                "vocab_size": vocab_size,
                "sha256": tokenizer_hash,
                "pad_id": tok.PAD_ID,
                "bos_id": tok.BOS_ID,
                "eos_id": tok.EOS_ID,
                "unk_id": tok.UNK_ID,
            },
            "dtype": dtype.name,
            "max_token_id": max(s["max_token_id"] for s in written.values()),
            "replaced_characters": corpus.replaced_characters,
            "splits": written,
        }
        _check_seq_len(manifest, args.seq_len, out)
        write_manifest(tmp, manifest)

    seconds = time.perf_counter() - started
    total = sum(s["tokens"] for s in written.values())
    print(
        f"{out}: {corpus.description}; {vocab_size}-token {args.tokenizer} tokenizer; "
        + ", ".join(f"{name} {s['documents']} docs / {s['tokens']:,} tokens" for name, s in written.items())
        + f"; {total / seconds:,.0f} tokens/s end to end"
        + (f"; {corpus.replaced_characters} undecodable bytes replaced" if corpus.replaced_characters else ""),
        file=sys.stderr,
    )
    return manifest


def _check_seq_len(manifest: dict, seq_len: int | None, out: Path) -> None:
    if seq_len is None:
        return
    for name, split in manifest["splits"].items():
        if split["tokens"] < seq_len + 1:
            raise DataError(
                f"{out}: the {name} split has {split['tokens']} tokens, fewer than seq_len + 1 = "
                f"{seq_len + 1}; use a shorter --seq-len, a larger --val-fraction or more data"
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m data.prepare", description=__doc__)
    p.add_argument("--source", required=True, help="stdlib | a local file or folder | a hub dataset name")
    p.add_argument("--out", required=True, help="output folder (created atomically)")
    p.add_argument("--tokenizer", choices=["bpe", "byte"], default="bpe")
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary incl. 4 specials (default 2048)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="fraction of documents held out (default 0.01)")
    p.add_argument(
        "--val-from",
        choices=["random", "end"],
        default="random",
        help="held-out documents: a seeded random choice (default) or the last ones in corpus order",
    )
    p.add_argument("--text-field", default="text", help="column holding the text in jsonl/parquet/hub data")
    p.add_argument(
        "--sample-by",
        choices=["paragraph", "line", "document"],
        default="paragraph",
        help="what one document is in .txt files (default: blank-line separated paragraphs)",
    )
    p.add_argument("--seq-len", type=int, help="check that every split holds at least one seq_len + 1 window")
    p.add_argument("--num-proc", type=int, default=1, help="tokenisation processes")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val document split")
    p.add_argument("--shard-tokens", type=int, default=1 << 28, help="tokens per shard file (default 2^28)")
    p.add_argument("--hub-config", help="hub dataset config name")
    p.add_argument("--hub-split", default="train", help="hub dataset split (default train)")
    p.add_argument("--streaming", action="store_true", help="stream a large hub dataset (with --max-documents)")
    p.add_argument("--max-documents", type=int, help="use only the first N documents of a hub dataset")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared folder")
    args = p.parse_args(argv)
    if not 0 <= args.val_fraction < 1:
        p.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.num_proc < 1 or args.shard_tokens < 1 or (args.seq_len is not None and args.seq_len < 1):
        p.error("--num-proc, --shard-tokens and --seq-len must be positive")
    if args.tokenizer == "bpe" and args.vocab_size < tok.BYTE_VOCAB_SIZE:
        p.error(f"--vocab-size {args.vocab_size} is below the {tok.BYTE_VOCAB_SIZE} byte-level base vocabulary")
    if args.vocab_size > 2**32:
        p.error(f"--vocab-size {args.vocab_size} does not fit a uint32 token shard")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import datasets  # quiet the library: the user gets one summary line, or one error line

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    return run_main(lambda: prepare(args) and None)


if __name__ == "__main__":
    sys.exit(main())
