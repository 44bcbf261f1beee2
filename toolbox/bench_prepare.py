"""Preparation benchmarks (scripts/bench.py prepare and dedup): data.prepare's throughput per executor
against the previous single-machine path, the whole dedup + filter + tokenise pipeline, and the recall and
precision of each dedup on a corpus with planted copies.

The previous path is kept here as the baseline, compactly: `datasets.map` tokenising bounded pieces of each
document in one process, as data.prepare did before it ran on datatrove (same corpus reading, split and
tokenizer, so the same tokens). Every run sets TOKENIZERS_PARALLELISM=false, so that one process is one
core and tokens/s per core compares fairly across process counts.
"""

import gzip
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from data import tokenizer as tok
from data.engine import FILTERS

# one process, one core; and Ray's instance for the run without a token file written into ~/.ray
BENCH_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "disabled"}
PIECES = pa.schema([("text", pa.large_string()), ("last", pa.bool_())])  # last: the document ends here


def previous_prepare(source: str, vocab_size: int, folder: Path) -> int:
    """The tokens the previous data.prepare wrote for `source` (its defaults), the way it wrote them."""
    import datasets

    from data import sources
    from data.prepare import split_documents
    from data.shards import ShardWriter, token_dtype

    datasets.disable_progress_bars()
    folder.mkdir(parents=True, exist_ok=True)
    corpus = sources.load_corpus(source, cache_dir=folder / "cache")
    is_val = np.zeros(corpus.count, dtype=bool)
    is_val[split_documents(corpus.count, 0.01, 0)[1]] = True

    # its pieces file per split (arrow record batches of about a megabyte), read back memory-mapped
    writers = {split: pa.ipc.new_stream(str(folder / f"{split}.arrow"), PIECES) for split in ("train", "val")}
    rows = {split: ([], []) for split in writers}
    characters = dict.fromkeys(writers, 0)

    def flush(split: str) -> None:
        if rows[split][0]:
            writers[split].write_batch(pa.record_batch(list(rows[split]), schema=PIECES))
            rows[split], characters[split] = ([], []), 0

    for index, text in enumerate(sources.texts(corpus.documents)):
        split = "val" if is_val[index] else "train"
        *body, last = tok.pieces(text)
        rows[split][0].extend([*body, last])
        rows[split][1].extend([False] * len(body) + [True])
        characters[split] += len(text)
        if characters[split] >= 1 << 20:
            flush(split)
    for split, writer in writers.items():
        flush(split)
        writer.close()
    pieces = {split: datasets.Dataset.from_file(str(folder / f"{split}.arrow")) for split in writers}
    tokenizer = tok.train_bpe(sources.texts(pieces["train"]), vocab_size)
    tok.save(tokenizer, folder)
    dtype = token_dtype(tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(batch: dict) -> dict:
        encodings = tokenizer.encode_batch_fast(batch["text"], add_special_tokens=False)
        return {
            "ids": [np.array(e.ids + [tok.EOS_ID] * last, dtype=dtype) for e, last in zip(encodings, batch["last"])]
        }

    total = 0
    for split, ds in pieces.items():
        encoded = ds.map(encode, batched=True, batch_size=64, writer_batch_size=256, remove_columns=["text", "last"])
        writer = ShardWriter(folder, split, dtype, 1 << 28)
        for table in encoded.with_format("arrow").iter(batch_size=1024):
            writer.write(table.column("ids").combine_chunks().flatten().to_numpy(zero_copy_only=False))
        total += sum(s["tokens"] for s in writer.close())
    return total


def prepare_run(source: str, out: Path, *args: str) -> tuple[float, dict]:
    """data.prepare as a command (a fresh process, as a user runs it): seconds and the manifest."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "data.prepare", "--source", source, "--out", str(out), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **BENCH_ENV},
    )
    if done.returncode:
        raise RuntimeError(f"data.prepare {' '.join(args)}: {done.stderr.strip().splitlines()[-1]}")
    return time.perf_counter() - start, json.loads((out / "manifest.json").read_text())


def bench_prepare(source: str, vocab_size: int, with_ray: bool, repeats: int = 3) -> list[dict]:
    runs = [
        ("local, 2 tasks on 2 workers", 2, ["--tasks", "2", "--workers", "2"]),
        *([("ray (a local cluster), 2 tasks on 2 workers", 2, ["--executor", "ray", "--tasks", "2"])] * with_ray),
        (
            "local, 2 workers: exact + MinHash dedup, all filters",
            2,
            ["--tasks", "2", "--workers", "2", "--dedup", "exact,minhash", "--filters", ",".join(FILTERS)],
        ),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # the per-core comparison, alternated `repeats` times (this machine's timings vary by ~10%): medians
        previous = [sys.executable, "-m", "toolbox.bench_prepare", source, str(vocab_size)]
        times: dict[str, list[float]] = {"previous": [], "local": []}
        for repeat in range(repeats):
            start = time.perf_counter()  # a fresh process too, as the command was: its imports are in its time
            done = subprocess.run([*previous, str(Path(tmp) / f"old{repeat}")], capture_output=True, text=True)
            times["previous"].append(time.perf_counter() - start)
            tokens = int(done.stdout)
            times["local"].append(prepare_run(source, Path(tmp) / f"new{repeat}", "--vocab-size", str(vocab_size))[0])
        rows.append(
            _row("previous data.prepare (datasets.map), 1 process", 1, statistics.median(times["previous"]), tokens)
        )
        rows.append(_row("local, 1 task", 1, statistics.median(times["local"]), tokens))
        for row in rows:
            row["repeats"] = repeats
            print(json.dumps(row), file=sys.stderr, flush=True)
        for index, (name, cores, args) in enumerate(runs):
            seconds, manifest = prepare_run(source, Path(tmp) / f"run{index}", "--vocab-size", str(vocab_size), *args)
            tokens = sum(split["tokens"] for split in manifest["splits"].values())
            row = _row(name, cores, seconds, tokens)
            if "filtering" in manifest:
                row["documents_in"] = manifest["filtering"]["in"]["documents"]
                row["removed"] = {k: v["documents"] for k, v in manifest["filtering"]["removed"].items()}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def _row(name: str, cores: int, seconds: float, tokens: int) -> dict:
    per_second = tokens / seconds
    return {
        "bench": "prepare",
        "run": name,
        "processes": cores,
        "seconds": round(seconds, 1),
        "tokens": tokens,
        "tokens_per_s": round(per_second),
        "tokens_per_s_per_core": round(per_second / cores),
    }


def books(text_path: Path) -> list[str]:
    """The Gutenberg corpus's books, cut where its manifest (beside it) says each one lies."""
    text = gzip.open(text_path, "rb").read()
    rows = (text_path.parent / "gutenberg_en.manifest.tsv").read_text().splitlines()[1:]
    spans = [tuple(int(field) for field in row.split("\t")[1:3]) for row in rows]
    return [text[offset : offset + length].decode() for offset, length in spans]


def edited(book: str, share: float, rng: random.Random) -> str:
    """`book` with `share` of its words replaced by another word of the book (a small edit each)."""
    words = book.split(" ")
    for at in rng.sample(range(len(words)), int(share * len(words))):
        words[at] = rng.choice(words)
    return " ".join(words)


def bench_dedup(text_path: Path, copies: int, shares: list[float]) -> list[dict]:
    """Planted after the originals: `copies` exact copies and, per edit share, `copies` edited copies of
    distinct books; each dedup's recall (planted copies it removed) and precision (removed that were planted)."""
    rng = random.Random(0)
    originals = books(text_path)
    chosen = rng.sample(range(len(originals)), copies * (1 + len(shares)))
    planted = {"exact": [originals[i] for i in chosen[:copies]]}
    for k, share in enumerate(shares, 1):
        planted[f"{share:.1%} of words edited"] = [
            edited(originals[i], share, rng) for i in chosen[k * copies : (k + 1) * copies]
        ]
    documents = originals + [doc for group in planted.values() for doc in group]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "books.jsonl"
        corpus.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in documents))
        seconds, manifest = prepare_run(
            str(corpus), Path(tmp) / "p", "--tokenizer", "byte", "--dedup", "exact,minhash", "--tasks", "2"
        )
        kept = Counter(_decoded(Path(tmp) / "p"))
    given = Counter(documents)
    removed_original = sum(kept[doc] == 0 for doc in originals)
    rows = []
    for group, docs in planted.items():
        removed = sum(kept[doc] < given[doc] for doc in docs)  # an exact copy: one of the two is gone
        rows.append({"bench": "dedup", "planted": group, "copies": len(docs), "removed": removed})
    counts = {k: v["documents"] for k, v in manifest["filtering"]["removed"].items()}
    all_planted = sum(len(docs) for docs in planted.values())
    removed_planted = sum(row["removed"] for row in rows)
    rows.append(
        {
            "bench": "dedup",
            "books": len(originals),
            "seconds": round(seconds, 1),
            "removed_by": counts,
            "originals_removed": removed_original,
            "recall": round(removed_planted / all_planted, 3),
            "precision": round(removed_planted / max(removed_planted + removed_original, 1), 3),
        }
    )
    return rows


def _decoded(folder: Path) -> list[str]:
    from data.shards import TokenStream

    out = []
    for split in ("train", "val"):
        stream = TokenStream(folder, split)
        tokens = stream.read(0, len(stream))
        ends = np.flatnonzero(tokens == tok.EOS_ID)
        for start, end in zip(np.concatenate([[0], ends[:-1] + 1]), ends):
            out.append(bytes((tokens[start:end] - (tok.BYTE_VOCAB_SIZE - 256)).astype(np.uint8)).decode())
    return out


if __name__ == "__main__":  # the previous path in a process of its own: SOURCE VOCAB_SIZE FOLDER
    print(previous_prepare(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])))
