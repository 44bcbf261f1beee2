"""Data pipeline: sources, tokenizers, shards, the prepare CLI and every bad input it must reject."""

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import in_process
from transformers import AutoTokenizer

from data import tokenizer as tok
from data.prepare import main as prepare_main
from data.prepare import split_documents
from data.shards import DataError, TokenStream, check_tokenizer, read_manifest
from data.sources import stdlib_files

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAKESPEARE = SHARED / "tinyshakespeare.txt"
needs_shared = pytest.mark.skipif(not SHAKESPEARE.exists(), reason=f"{SHAKESPEARE} absent (../shared not mounted)")


def paragraphs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "the of and to in is was it for on with as by at from his that be this which".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) for _ in range(n)]


def prepare(*args) -> int:
    return prepare_main([str(a) for a in args])


@pytest.fixture
def corpus_file(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs(200)) + "\n")
    return path


def random_unicode(rng: random.Random, length: int) -> str:
    ranges = [
        (0x20, 0x7E),
        (0x00, 0x1F),
        (0xA0, 0x24F),
        (0x370, 0x3FF),
        (0x400, 0x4FF),
        (0x4E00, 0x4FFF),
        (0x1F300, 0x1F6FF),
        (0x300, 0x36F),
        (0x10000, 0x1007F),
    ]
    out = []
    for _ in range(length):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


@pytest.mark.compat
def test_bpe_round_trips_arbitrary_unicode(corpus_file):
    wrapped = tok.wrap(tok.train_bpe([corpus_file.read_text()], 400))
    rng = random.Random(0)
    for _ in range(200):
        text = random_unicode(rng, rng.randint(0, 60))
        assert wrapped.decode(wrapped.encode(text)) == text
    assert len(wrapped.encode("the of and to")) < len("the of and to")  # merges were learned


def test_byte_tokenizer_round_trips_and_maps_bytes_to_fixed_ids():
    wrapped = tok.wrap(tok.byte_tokenizer())
    assert len(wrapped) == tok.BYTE_VOCAB_SIZE == 260
    assert wrapped.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<bos>", "<eos>", "<unk>"]
    rng = random.Random(1)
    for _ in range(200):
        text = random_unicode(rng, rng.randint(0, 60))
        ids = wrapped.encode(text)
        assert ids == [4 + b for b in text.encode("utf-8")]
        assert wrapped.decode(ids) == text
    assert list(tok.token_byte_lengths(wrapped)) == [0] * 4 + [1] * 256


@needs_shared
def test_bpe_on_tinyshakespeare_round_trips_and_loads_with_auto_tokenizer(tmp_path):
    assert prepare("--source", SHAKESPEARE, "--out", tmp_path / "shakespeare", "--vocab-size", 512) == 0
    folder = tmp_path / "shakespeare"
    loaded = AutoTokenizer.from_pretrained(folder)
    text = SHAKESPEARE.read_text()
    assert loaded.decode(loaded.encode(text[:20000])) == text[:20000]
    manifest = read_manifest(folder)
    assert manifest["tokenizer"]["vocab_size"] == len(loaded) == 512
    assert manifest["tokenizer"]["sha256"] == tok.tokenizer_sha256(folder)
    # the shards are the documents' tokens with EOS after each one, and decode back to whole paragraphs
    val = TokenStream(folder, "val").read(0, len(TokenStream(folder, "val")))
    documents = loaded.decode(val).split("<eos>")[:-1]
    assert len(documents) == manifest["splits"]["val"]["documents"]
    assert all(doc in text for doc in documents)


def test_rerun_gives_byte_identical_shards(tmp_path, corpus_file):
    args = ["--source", corpus_file, "--vocab-size", 300, "--shard-tokens", 1500, "--num-proc", 2]
    assert prepare(*args, "--out", tmp_path / "a") == 0
    assert prepare(*args, "--out", tmp_path / "b") == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len([f for f in files if f.startswith("train_")]) > 2  # really several shards
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_split_is_by_whole_documents_and_seeded(tmp_path, corpus_file):
    train, val = split_documents(200, 0.1, seed=0)
    assert len(val) == 20 and len(set(train) | set(val)) == 200 and not set(train) & set(val)
    assert not np.array_equal(val, np.arange(180, 200))  # not a tail slice
    assert np.array_equal(val, split_documents(200, 0.1, seed=0)[1])
    assert not np.array_equal(val, split_documents(200, 0.1, seed=1)[1])

    assert prepare("--source", corpus_file, "--out", tmp_path / "p", "--tokenizer", "byte", "--val-fraction", 0.1) == 0
    docs = paragraphs(200)

    for split, indices in (("train", train), ("val", val)):
        stream = TokenStream(tmp_path / "p", split)
        ids = stream.read(0, len(stream))
        pieces = np.split(ids, np.flatnonzero(ids == tok.EOS_ID) + 1)[:-1]
        texts = [bytes((piece[:-1] - 4).astype(np.uint8)).decode().rstrip("\n") for piece in pieces]
        assert texts == [docs[i] for i in indices]


def test_val_from_end_holds_out_the_last_documents_and_is_recorded(tmp_path, corpus_file):
    train, val = split_documents(200, 0.1, seed=0, val_from="end")
    assert np.array_equal(train, np.arange(180)) and np.array_equal(val, np.arange(180, 200))
    assert (
        prepare(
            "--source",
            corpus_file,
            "--out",
            tmp_path / "p",
            "--tokenizer",
            "byte",
            "--val-fraction",
            0.1,
            "--val-from",
            "end",
        )
        == 0
    )
    assert read_manifest(tmp_path / "p")["settings"]["val_from"] == "end"
    ids = TokenStream(tmp_path / "p", "val").read(0, 40)
    assert bytes((ids[:20] - 4).astype(np.uint8)) == paragraphs(200)[180].encode()[:20]


def test_gzipped_text_and_folder_sources(tmp_path):
    docs = paragraphs(30)
    (tmp_path / "books").mkdir()
    with gzip.open(tmp_path / "books" / "a.txt.gz", "wt") as f:
        f.write("\n\n".join(docs[:20]))
    (tmp_path / "books" / "b.txt").write_text("\n\n".join(docs[20:]))
    assert prepare("--source", tmp_path / "books", "--out", tmp_path / "o", "--tokenizer", "byte") == 0
    manifest = read_manifest(tmp_path / "o")
    assert sum(s["documents"] for s in manifest["splits"].values()) == 30
    assert sum(s["tokens"] for s in manifest["splits"].values()) == sum(len(d) + 1 for d in docs)


@pytest.mark.compat
def test_jsonl_gz_and_parquet_sources(tmp_path):
    rows = [{"body": text, "id": i} for i, text in enumerate(paragraphs(40))]
    with gzip.open(tmp_path / "docs.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    assert (
        prepare(
            "--source",
            tmp_path / "docs.jsonl.gz",
            "--out",
            tmp_path / "j",
            "--tokenizer",
            "byte",
            "--text-field",
            "body",
        )
        == 0
    )
    assert read_manifest(tmp_path / "j")["splits"]["train"]["documents"] == 40 - 1  # 1% rounds up to 1 val doc
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "docs.parquet")
    assert (
        prepare(
            "--source",
            tmp_path / "docs.parquet",
            "--out",
            tmp_path / "q",
            "--tokenizer",
            "byte",
            "--text-field",
            "body",
        )
        == 0
    )
    assert (
        read_manifest(tmp_path / "q")["splits"]["train"]["tokens"]
        == read_manifest(tmp_path / "j")["splits"]["train"]["tokens"]
    )


def test_stdlib_corpus_is_the_interpreters_own_source():
    files = stdlib_files()
    parts = {part for f in files for part in f.parts}
    assert len(files) > 500 and not {"site-packages", "test", "tests"} & parts
    assert [f.name for f in files[:1]] == ["__future__.py"]
    assert 8e6 < sum(f.stat().st_size for f in files) < 30e6


def run_prepare_cli(*args):
    return in_process(prepare_main, *args)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(("error:", "usage:")) or "error" in line]
    assert "Traceback" not in result.stderr
    assert any(all(f in line for f in fragments) for line in lines), result.stderr


def test_bad_sources_give_one_line_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    assert_one_line_error(
        run_prepare_cli("--source", tmp_path / "empty.txt", "--out", tmp_path / "o"), "no non-empty documents"
    )
    (tmp_path / "one.txt").write_text("a single paragraph\n")
    assert_one_line_error(
        run_prepare_cli("--source", tmp_path / "one.txt", "--out", tmp_path / "o"), "empty train split"
    )
    assert_one_line_error(
        run_prepare_cli("--source", tmp_path / "nope.txt", "--out", tmp_path / "o"), "nope.txt", "no such file"
    )
    assert_one_line_error(
        run_prepare_cli("--source", "x", "--out", tmp_path / "o", "--vocab-size", 2**33), "--vocab-size", "uint32"
    )
    assert_one_line_error(
        run_prepare_cli("--source", "x", "--out", tmp_path / "o", "--vocab-size", 100), "--vocab-size 100"
    )
    assert not (tmp_path / "o").exists()


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"good text here\n\nbad \xff\xfe bytes\n\nmore good text\n")
    assert prepare("--source", tmp_path / "bad.txt", "--out", tmp_path / "o", "--tokenizer", "byte") == 0
    assert read_manifest(tmp_path / "o")["replaced_characters"] == 2


def test_token_dtype_follows_vocab_size():
    from data.shards import token_dtype

    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    with pytest.raises(DataError, match="does not fit"):
        token_dtype(2**32 + 1)


@pytest.fixture
def prepared(tmp_path, corpus_file) -> Path:
    assert prepare("--source", corpus_file, "--out", tmp_path / "prepared", "--tokenizer", "byte") == 0
    return tmp_path / "prepared"


def test_truncated_or_corrupted_shards_are_rejected(prepared):
    shard = prepared / "train_000.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(DataError, match=r"train_000\.bin: shard has .* bytes, manifest says"):
        TokenStream(prepared, "train")
    shard.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    with pytest.raises(DataError, match=r"train_000\.bin: checksum differs"):
        TokenStream(prepared, "train")
    (prepared / "val_000.bin").unlink()
    with pytest.raises(DataError, match=r"val_000\.bin: shard is missing"):
        TokenStream(prepared, "val")


def test_tokenizer_mismatch_and_missing_folder_are_rejected(prepared, tmp_path):
    manifest = read_manifest(prepared)
    check_tokenizer(manifest, prepared, vocab_size=260, tokenizer_sha256=tok.tokenizer_sha256(prepared))
    with pytest.raises(DataError, match="260-token vocabulary but the model has vocab_size 2048"):
        check_tokenizer(manifest, prepared, vocab_size=2048)
    with pytest.raises(DataError, match="made with tokenizer"):
        check_tokenizer(manifest, prepared, tokenizer_sha256="0" * 64)
    with pytest.raises(DataError, match="no manifest.json.*data.prepare"):
        read_manifest(tmp_path / "never-prepared")


def test_seq_len_longer_than_val_split_is_rejected(tmp_path, corpus_file):
    result = run_prepare_cli(
        "--source", corpus_file, "--out", tmp_path / "o", "--tokenizer", "byte", "--seq-len", 5000
    )  # the val split has ~3k tokens, train ~27k
    assert_one_line_error(result, "val split has", "seq_len + 1 = 5001")
    assert not (tmp_path / "o").exists()


def test_existing_output_is_reused_or_refused(prepared, corpus_file):
    before = (prepared / "manifest.json").stat().st_mtime_ns
    assert prepare("--source", corpus_file, "--out", prepared, "--tokenizer", "byte") == 0
    assert (prepared / "manifest.json").stat().st_mtime_ns == before  # reused, not rebuilt
    assert prepare("--source", corpus_file, "--out", prepared, "--tokenizer", "bpe", "--vocab-size", 300) == 2
    assert (
        prepare("--source", corpus_file, "--out", prepared, "--tokenizer", "bpe", "--vocab-size", 300, "--overwrite")
        == 0
    )
    assert read_manifest(prepared)["tokenizer"]["kind"] == "bpe"


@needs_shared
@pytest.mark.distributed  # runs a command in a fresh interpreter
def test_interrupted_prepare_leaves_nothing_that_looks_complete(tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "data.prepare", "--source", str(SHAKESPEARE), "--out", str(out), "--vocab-size", "4096"],
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while not list(tmp_path.glob(".out.tmp-*")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "prepare finished before it could be interrupted"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert list(tmp_path.glob(".out.tmp-*")) and not out.exists()
    with pytest.raises(DataError, match="no manifest.json"):
        read_manifest(out)
    # the next run cleans up the leftover and finishes
    assert prepare("--source", SHAKESPEARE, "--out", out, "--tokenizer", "byte") == 0
    assert read_manifest(out) and not list(tmp_path.glob(".out.tmp-*"))


@pytest.mark.compat
@pytest.mark.distributed  # runs a command in a fresh interpreter
def test_stdlib_prepare_end_to_end(tmp_path):
    assert prepare("--source", "stdlib", "--out", tmp_path / "s", "--tokenizer", "byte", "--num-proc", 2) == 0
    manifest = read_manifest(tmp_path / "s")
    assert manifest["source"].startswith("stdlib: Python")
    total_bytes = sum(f.stat().st_size for f in stdlib_files())
    # byte tokenizer: one token per byte plus one EOS per document
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    documents = sum(s["documents"] for s in manifest["splits"].values())
    assert tokens == total_bytes + documents
