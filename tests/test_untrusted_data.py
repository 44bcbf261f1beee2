"""Hostile inputs to the data layer: corpora, prepared folders and manifests that someone edited, a full disk,
a second prepare of the same folder. Each stops in one line, exit 2, naming the file or field, before any
training step, and leaves every file of the user as it was; memory follows a corpus's bytes however long
its lines, and nothing is left behind in the user's home."""

import contextlib
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, base_args, in_process, paragraphs
from untrusted import assert_one_line, peak_bounded, run_bounded, snapshot

from data import tokenizer as tok
from data.loader import TrainLoader
from data.prepare import OWN_FILE
from data.prepare import main as prepare_main
from data.shards import DataError, TokenStream, read_manifest
from train.__main__ import main as train_main


def edit_manifest(folder: Path, change: Callable[[dict], object]) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def reseal(folder: Path) -> None:
    """Record the shards' current sha256 in the manifest, as whoever edits a shard can: what is tested is then
    the check behind the digests."""

    def update(manifest: dict) -> None:
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                shard["sha256"] = hashlib.sha256((folder / shard["file"]).read_bytes()).hexdigest()

    edit_manifest(folder, update)


def plant_token(folder: Path, token_id: int) -> None:
    shard = folder / "train_000.bin"
    ids = np.fromfile(shard, dtype=np.uint16)
    ids[100] = token_id
    ids.tofile(shard)
    reseal(folder)


def empty_val_split(folder: Path) -> None:
    """What data.prepare --val-fraction 0 used to write."""
    (folder / "val_000.bin").unlink()
    edit_manifest(
        folder, lambda m: m["splits"].update(val={"documents": 0, "tokens": 0, "shards": [], "max_token_id": -1})
    )


def relink(path: Path, target: Path) -> None:
    path.unlink()
    path.symlink_to(target)


def write_lines(path: Path, *lines: str) -> None:
    path.write_text("\n".join(lines) + "\n")


# A prepared folder (tests/conftest.py's data_dir: byte tokenizer, 260 ids, uint16), damaged one way each.
DAMAGED = {
    "ids-beyond-vocab": lambda d, w: plant_token(d, 300),
    "tokens-not-adding-up": lambda d, w: edit_manifest(d, lambda m: m["splits"]["train"].update(tokens=10**6)),
    "negative-shard-tokens": lambda d, w: edit_manifest(
        d, lambda m: m["splits"]["train"]["shards"][0].update(tokens=-5)
    ),
    "vocab-size-true": lambda d, w: edit_manifest(d, lambda m: m["tokenizer"].update(vocab_size=True)),
    "dtype-of-another-vocab": lambda d, w: edit_manifest(d, lambda m: m.update(dtype="uint32")),
    "eos-beyond-vocab": lambda d, w: edit_manifest(d, lambda m: m["tokenizer"].update(eos_id=5000)),
    "digest-not-hex": lambda d, w: edit_manifest(d, lambda m: m["splits"]["val"]["shards"][0].update(sha256="zz")),
    "shard-listed-twice": lambda d, w: edit_manifest(
        d,
        lambda m: m["splits"]["val"].update(
            shards=m["splits"]["val"]["shards"] * 2, tokens=2 * m["splits"]["val"]["tokens"]
        ),
    ),
    "shard-symlink": lambda d, w: relink(d / "train_000.bin", w / "user" / "notes.txt"),
    "shard-fifo": lambda d, w: ((d / "val_000.bin").unlink(), os.mkfifo(d / "val_000.bin")),
    "manifest-symlink": lambda d, w: relink(d / "manifest.json", w / "good" / "manifest.json"),
    "tokenizer-edited": lambda d, w: (d / "tokenizer.json").write_text(
        json.dumps(json.loads((d / "tokenizer.json").read_text()), indent=1)
    ),
    "val-split-empty": lambda d, w: empty_val_split(d),
}


@pytest.fixture(scope="module")
def world(data_dir, tmp_path_factory) -> Path:
    """Good and hostile inputs side by side, built once; the table's rows only read them."""
    root = tmp_path_factory.mktemp("untrusted-data")
    (root / "user").mkdir()
    (root / "user" / "notes.txt").write_text("mine")
    shutil.copytree(data_dir, root / "good")
    for name, damage in DAMAGED.items():
        shutil.copytree(data_dir, root / name)
        damage(root / name, root)
    shutil.copytree(data_dir, root / "with-user-file")
    (root / "with-user-file" / "notes.txt").write_text("mine, put here by hand")
    (root / "link-to-user").symlink_to(root / "user")
    (root / "link-to-data").symlink_to(root / "good")

    text = paragraphs(1600)
    (root / "corpus.txt").write_text("\n\n".join(text[:60]))
    (root / "source.txt").write_text("\n\n".join(text[60:100]))
    assert (
        prepare_main(["--source", str(root / "source.txt"), "--out", str(root / "from-source"), "--tokenizer", "byte"])
        == 0
    )
    with open(root / "source.txt", "a") as f:
        f.write("\n\none paragraph more, after the folder was prepared")
    (root / "disk.txt").write_text("\n\n".join(text))  # ~240 KB: ~480 KB of uint16 tokens
    write_lines(root / "numbers.jsonl", '{"text": 5}', '{"text": 6}')
    write_lines(root / "objects.jsonl", '{"text": "a"}', '{"text": "b"}', '{"text": {"a": 1}}')
    write_lines(root / "broken.jsonl", '{"text": "a"}', "oops")
    write_lines(root / "arrays.jsonl", "[1, 2]", "[3]")
    pq.write_table(pa.table({"text": [1, 2, 3]}), root / "numbers.parquet")
    os.mkfifo(root / "pipe.txt")
    return root


class Case(NamedTuple):
    main: Callable
    argv: Callable[[Path, Path], list]  # (world, a fresh run folder outside it) -> arguments
    part: str  # what the one line must name
    file_size_limit: int | None = None  # bytes any one file may grow to: a full disk, for this process alone


def train_on(name: str) -> Callable[[Path, Path], list]:
    return lambda w, run: base_args(w / name, run)


def prepare_of(source: str, out: str = "p", *more: str) -> Callable[[Path, Path], list]:
    return lambda w, run: ["--source", w / source, "--out", w / out, "--tokenizer", "byte", *more]


CASES = {
    "train: a shard's ids beyond the vocabulary, digests resealed": Case(
        train_main, train_on("ids-beyond-vocab"), "train_000.bin: holds token id 300"
    ),
    "train: split tokens that its shards do not add up to": Case(
        train_main, train_on("tokens-not-adding-up"), "splits.train.tokens"
    ),
    "train: negative shard length": Case(
        train_main, train_on("negative-shard-tokens"), "splits.train.shards[0].tokens"
    ),
    "train: vocab_size true": Case(train_main, train_on("vocab-size-true"), "tokenizer.vocab_size"),
    "train: dtype of another vocabulary": Case(train_main, train_on("dtype-of-another-vocab"), "dtype 'uint32'"),
    "train: eos id beyond the vocabulary": Case(train_main, train_on("eos-beyond-vocab"), "tokenizer.eos_id"),
    "train: shard digest not hex": Case(train_main, train_on("digest-not-hex"), "splits.val.shards[0].sha256"),
    "train: one shard listed twice": Case(train_main, train_on("shard-listed-twice"), "listed twice"),
    "train: shard a symlink to a user file": Case(train_main, train_on("shard-symlink"), "train_000.bin: is a symlink"),
    "train: shard a FIFO": Case(train_main, train_on("shard-fifo"), "val_000.bin: not a regular file"),
    "train: manifest a symlink": Case(train_main, train_on("manifest-symlink"), "manifest.json: is a symlink"),
    "train: tokenizer.json edited": Case(train_main, train_on("tokenizer-edited"), "tokenizer.json: differs"),
    "train: empty val split": Case(train_main, train_on("val-split-empty"), "--val-fraction"),
    "prepare: jsonl text a number": Case(
        prepare_main, prepare_of("numbers.jsonl"), "numbers.jsonl: line 1: field 'text' is a number"
    ),
    "prepare: jsonl text an object on line 3": Case(
        prepare_main, prepare_of("objects.jsonl"), "objects.jsonl: line 3: field 'text' is an object"
    ),
    "prepare: jsonl line not JSON": Case(
        prepare_main, prepare_of("broken.jsonl"), "broken.jsonl: line 2: not valid JSON"
    ),
    "prepare: jsonl rows not objects": Case(
        prepare_main, prepare_of("arrays.jsonl"), "arrays.jsonl: line 1: not a JSON object"
    ),
    "prepare: parquet text of numbers": Case(prepare_main, prepare_of("numbers.parquet"), "field 'text' holds int64"),
    "prepare: source a FIFO": Case(prepare_main, prepare_of("pipe.txt"), "pipe.txt: not a regular file"),
    "prepare: --val-fraction 0": Case(
        prepare_main, prepare_of("corpus.txt", "p", "--val-fraction", "0"), "--val-fraction"
    ),
    "prepare: negative --seed": Case(prepare_main, prepare_of("corpus.txt", "p", "--seed", "-1"), "--seed"),
    "prepare: --out a symlink to a user folder": Case(
        prepare_main, prepare_of("corpus.txt", "link-to-user", "--overwrite"), "is a symlink"
    ),
    "prepare: --out a symlink to a prepared folder": Case(
        prepare_main, prepare_of("corpus.txt", "link-to-data"), "is a symlink"
    ),
    "prepare: --out inside a file": Case(
        prepare_main, prepare_of("corpus.txt", "corpus.txt/p"), "corpus.txt: File exists"
    ),
    "prepare: --overwrite over a user's file": Case(
        prepare_main, prepare_of("corpus.txt", "with-user-file", "--overwrite"), "holds notes.txt"
    ),
    "prepare: the source changed since": Case(
        prepare_main, prepare_of("source.txt", "from-source"), "content differs from what it was prepared from"
    ),
    "prepare: disk full while reading the corpus": Case(
        prepare_main, prepare_of("disk.txt"), "writing failed", 200_000
    ),
    "prepare: disk full while tokenising": Case(prepare_main, prepare_of("disk.txt"), "file too large", 300_000),
}


@contextlib.contextmanager
def bounded(seconds: int, file_size_limit: int | None):
    """An in-process run that blocks (on a FIFO, say) fails the test instead of hanging it; with a file size
    limit (SIGXFSZ ignored), a write past it fails as on a full disk."""

    def stop(signum: int, frame: object):
        raise TimeoutError(f"still running after {seconds} s: time is not bounded")

    previous = signal.signal(signal.SIGALRM, stop), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    if file_size_limit is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, limits[1]))
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGALRM, previous[0])
        signal.signal(signal.SIGXFSZ, previous[1])


def test_the_table_has_at_least_eighteen_cases():
    assert len(CASES) >= 18


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_data_input_is_one_line_and_changes_no_file(case, world, tmp_path):
    main, argv, part, file_size_limit = CASES[case]
    before = snapshot(world)
    with bounded(60, file_size_limit), peak_bounded():
        result = in_process(main, *argv(world, tmp_path / "run"))
    assert_one_line(result, part)
    assert snapshot(world) == before  # nothing changed, lost or left behind (temporary folders, locks)


def corpus_of_one_line(path: Path, megabytes: float, paragraphs_too: bool) -> None:
    """The same words as one line (plus a few short paragraphs, so that both splits have documents), or as
    paragraphs of 60 words."""
    rng = random.Random(0)
    words = [
        rng.choice("the of and to in is was it for on with as by at from his that be".split())
        for _ in range(int(megabytes * 250_000))
    ]
    if paragraphs_too:
        path.write_text("\n\n".join(" ".join(words[i : i + 60]) for i in range(0, len(words), 60)))
    else:
        path.write_text(" ".join(words) + "\n\n" + "\n\n".join(f"short paragraph {i}" for i in range(200)))


@pytest.mark.distributed  # runs a command in a fresh interpreter
def test_a_corpus_on_one_line_costs_what_its_bytes_cost_and_leaves_no_cache(tmp_path):
    """A long line once cost ~240x its bytes (2 MB: ~650 MiB peak against ~210 MiB for the same words in
    paragraphs; 48 MB: 12.4 GB), and every prepare left ~8x its corpus in ~/.cache/huggingface/datasets."""
    cache = tmp_path / "hf-datasets-cache"
    runs = {}
    for shape in ("one-line", "paragraphs"):
        corpus_of_one_line(tmp_path / f"{shape}.txt", 1.5, shape == "paragraphs")
        runs[shape] = ["-m", "data.prepare", "--source", str(tmp_path / f"{shape}.txt"), "--out", str(tmp_path / shape)]
    with ThreadPoolExecutor(2) as pool:
        done = {
            shape: pool.submit(run_bounded, argv, timeout=180, env={"HF_DATASETS_CACHE": str(cache)})
            for shape, argv in runs.items()
        }
        results = {shape: future.result() for shape, future in done.items()}
    for shape, result in results.items():
        assert result.returncode == 0, (shape, result.stderr[-2000:])
        assert all(OWN_FILE.fullmatch(p.name) for p in (tmp_path / shape).iterdir()), shape  # no cache folder in it
    one_line, paragraphs_ = results["one-line"].peak_rss_mib, results["paragraphs"].peak_rss_mib
    assert one_line < paragraphs_ + 64, f"one line peaked at {one_line:.0f} MiB, paragraphs at {paragraphs_:.0f} MiB"
    assert not cache.exists() or not any(cache.rglob("*")), sorted(cache.rglob("*"))[:5]
    made = sorted(p.name for p in tmp_path.iterdir() if p != cache)
    assert made == ["one-line", "one-line.txt", "paragraphs", "paragraphs.txt"]  # no lock, no temporary folder


def test_pieces_are_bounded_and_change_no_token():
    """Cut before a whitespace that starts a word, where byte-level BPE splits anyway: the tokens of the pieces
    are the tokens of the whole, so a long line costs bounded memory without changing the shards."""
    rng = random.Random(1)
    text = "".join(
        rng.choice(["word", "Ünïcode", "4096", " ", "   ", "\n", "\n\n", "\t", ", ", "'s", "!?"]) for _ in range(40_000)
    )
    cut = list(tok.pieces(text, budget=256))
    assert "".join(cut) == text and len(cut) > 100 and all(len(piece) <= 256 for piece in cut)
    tokenizer = tok.train_bpe([text], 400)
    assert [i for piece in cut for i in tokenizer.encode(piece).ids] == tokenizer.encode(text).ids
    unbroken = "x" * 1000  # no place to cut between words: cut anyway, to stay bounded
    assert [len(piece) for piece in tok.pieces(unbroken, budget=256)] == [256, 256, 256, 232]


@pytest.mark.distributed  # runs a command in a fresh interpreter
def test_a_second_prepare_of_the_same_out_stops_naming_the_first(tmp_path):
    """The second once deleted the first's live temporary folder, and both reported success."""
    corpus_of_one_line(tmp_path / "corpus.txt", 0.5, paragraphs_too=True)
    out = tmp_path / "out"
    argv = ["--source", str(tmp_path / "corpus.txt"), "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "data.prepare", *argv], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / ".out.lock").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert first.poll() is None, "the first prepare ended before the second could start"
        second = in_process(prepare_main, *argv)
        assert_one_line(second, f"in use by another process (pid {first.pid}")
    finally:
        _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr[-2000:]
    assert TokenStream(out, "train") and read_manifest(out)["splits"]["val"]["tokens"] > 0  # whole, verified
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "out"]  # no lock, no temporary folder


@pytest.mark.parametrize("count", [-3, 2.5, True, "12", 2**70])
def test_a_loader_state_that_is_not_a_count_is_refused(data_dir, count):
    """A checkpoint's loader state is a file anyone can edit: a negative count once failed only at the first
    batch (a permutation of a negative epoch), a float or a string was silently rounded or parsed."""
    loader = TrainLoader(data_dir, 64, 8, prefetch=0, verify_checksums=False)
    with pytest.raises(DataError, match="samples_consumed"):
        loader.load_state_dict({"samples_consumed": count, "epoch": 0, "seed": 0, "seq_len": 64})
