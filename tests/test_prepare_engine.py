"""data.prepare on datatrove: the same bytes whatever the executor and the number of tasks, the earliest copy
kept by each dedup, each filter's removals counted, and a real Ray cluster (a head and a worker node, started
here as separate processes). The SLURM executor's test is in test_slurm.py, beside its cluster."""

import contextlib
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import in_process

from data import tokenizer as tok
from data.prepare import main as prepare_main
from data.shards import TokenStream

WORDS = (
    "the of and to in is was it for on with as by at from his that be this which river mountain village "
    "morning evening winter summer garden window letter journey harbour market library teacher soldier "
    "farmer merchant painter stranger quietly slowly carefully suddenly walked carried remembered "
    "answered wondered travelled returned listened beautiful ancient narrow crowded silent golden "
    "distant gentle heavy bright"
).split()
FILTERS = "gopher-quality,gopher-repetition,fineweb-quality"


def english(rng: random.Random, sentences: int) -> str:
    """Prose the quality filters keep: one sentence a line, words of several lengths, stop words."""
    lines = []
    for _ in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(8, 16))]
        lines.append(" ".join(words).capitalize() + ".")
    return "\n".join(lines)


def planted_corpus() -> tuple[list[str], dict[str, list[int]]]:
    """40 documents of prose, then exact copies of 3 of them, near copies (2 words changed) of 3 others, and
    one document each filter exists to remove; with where each planted document is."""
    rng = random.Random(0)
    documents = [english(rng, rng.randint(12, 24)) for _ in range(40)]
    planted: dict[str, list[int]] = {"exact": [], "near": [], "originals": [5, 17, 30, 8, 22, 35]}
    for original in planted["originals"][:3]:
        planted["exact"].append(len(documents))
        documents.append(documents[original])
    for original in planted["originals"][3:]:
        words = documents[original].split(" ")
        for at in (len(words) // 3, 2 * len(words) // 3):
            words[at] = "lantern"
        planted["near"].append(len(documents))
        documents.append(" ".join(words))
    documents.append(" ".join(["#"] * 30 + ["the", "river", "and", "the", "village"] * 10))  # symbols: Gopher quality
    documents.append("\n".join(["The river walked to the golden village."] * 20))  # one line over: repetition
    documents.append("\n".join(" ".join(rng.choice(WORDS) for _ in range(6)) for _ in range(40)))  # no full stops
    return documents, planted


def write_corpus(folder: Path) -> Path:
    path = folder / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in planted_corpus()[0]))
    return path


def prepare(source: Path, out: Path, *args) -> Path:
    result = in_process(
        prepare_main, "--source", source, "--out", out, "--tokenizer", "byte", "--val-fraction", 0.1, *args
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # the summary line, nothing of the engine
    return out


def assert_same_bytes(one: Path, other: Path) -> None:
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in other.iterdir())
    for name in names:
        assert (one / name).read_bytes() == (other / name).read_bytes(), name


def texts(folder: Path, split: str) -> list[str]:
    """The documents of a byte-tokenised split, decoded."""
    stream = TokenStream(folder, split)
    tokens = stream.read(0, len(stream))
    ends = np.flatnonzero(tokens == tok.EOS_ID)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [bytes((tokens[a:b] - tok.BYTE_VOCAB_SIZE + 256).astype(np.uint8)).decode() for a, b in zip(starts, ends)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("engine-corpus"))


@pytest.fixture(scope="module")
def one_task(corpus, tmp_path_factory) -> Path:
    """The reference: the local executor, one task, dedup and filters on."""
    return prepare(corpus, tmp_path_factory.mktemp("one") / "p", "--dedup", "exact,minhash", "--filters", FILTERS)


@pytest.mark.distributed
def test_four_tasks_on_two_workers_give_the_bytes_of_one(corpus, one_task, tmp_path):
    four = prepare(
        corpus, tmp_path / "p", "--tasks", 4, "--workers", 2, "--dedup", "exact,minhash", "--filters", FILTERS
    )
    assert_same_bytes(one_task, four)


def test_each_dedup_keeps_the_earliest_copy_and_each_step_is_counted(corpus, one_task):
    documents, planted = planted_corpus()
    manifest = json.loads((one_task / "manifest.json").read_text())
    filtering = manifest["filtering"]
    assert filtering["steps"] == ["exact-dedup", "minhash-dedup", *FILTERS.split(",")]
    removed = {step: filtering["removed"][step]["documents"] for step in filtering["steps"]}
    assert removed == {
        "exact-dedup": 3,
        "minhash-dedup": 3,
        "gopher-quality": 1,
        "gopher-repetition": 1,
        "fineweb-quality": 1,
    }
    # tokens: a byte tokenizer's count is the UTF-8 bytes plus EOS, so each step's figure is checkable
    tokens_of = lambda indices: sum(len(documents[i].encode()) + 1 for i in indices)
    assert filtering["removed"]["exact-dedup"]["tokens"] == tokens_of(planted["exact"])
    assert filtering["removed"]["minhash-dedup"]["tokens"] == tokens_of(planted["near"])
    assert filtering["in"] == {"documents": len(documents), "tokens": tokens_of(range(len(documents)))}
    kept = texts(one_task, "train") + texts(one_task, "val")
    assert filtering["out"]["documents"] == len(kept) == 40
    assert sorted(kept) == sorted(documents[:40])  # every original, no copy, nothing the filters exist for
    assert sum(manifest["splits"][s]["documents"] for s in ("train", "val")) == 40


def test_without_filters_every_document_is_kept_and_nothing_is_added_to_the_manifest(corpus, tmp_path):
    plain = prepare(corpus, tmp_path / "p")
    manifest = json.loads((plain / "manifest.json").read_text())
    assert "filtering" not in manifest and not {"dedup", "filters"} & set(manifest["settings"])
    assert sorted(texts(plain, "train") + texts(plain, "val")) == sorted(planted_corpus()[0])


def test_the_tokenizer_learns_from_a_seeded_sample_of_the_train_split(corpus, tmp_path):
    def tokenizer_of(name: str, *args) -> str:
        out = tmp_path / name
        result = in_process(prepare_main, "--source", corpus, "--out", out, "--vocab-size", 300, *args)
        assert result.returncode == 0, result.stderr
        return json.loads((out / "manifest.json").read_text())["tokenizer"]["sha256"]

    whole = tokenizer_of("whole")
    sampled = tokenizer_of("sampled", "--tokenizer-sample-chars", 5000)
    assert sampled != whole
    assert tokenizer_of("again", "--tokenizer-sample-chars", 5000) == sampled
    assert tokenizer_of("other-seed", "--tokenizer-sample-chars", 5000, "--seed", 1) != sampled
    assert tokenizer_of("all-fits", "--tokenizer-sample-chars", 10**9) == whole


@pytest.mark.parametrize(
    "args, part",
    [
        (["--dedup", "fuzzy"], "--dedup"),
        (["--filters", "gopher-quality,gopher-quality"], "--filters"),
        (["--slurm-time", "1:00:00"], "--slurm-time"),
        (["--executor", "slurm", "--ray-address", "127.0.0.1:1"], "--ray-address"),
        (["--tasks", 0], "--tasks"),
    ],
)
def test_executor_and_step_options_are_checked_before_any_work(args, part, corpus, tmp_path):
    result = in_process(prepare_main, "--source", corpus, "--out", tmp_path / "p", *args)
    assert result.returncode == 2 and part in result.stderr.strip().splitlines()[-1], result.stderr
    assert not (tmp_path / "p").exists()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_cluster():
    """A head and a worker node (one CPU each), each a `ray start --block` process of its own; stopped by
    signal, which stops what each started."""
    ray = Path(sys.executable).parent / "ray"
    if not ray.exists():
        pytest.skip("ray is not installed (pip install -e '.[dev]' installs it)")
    root = Path(tempfile.mkdtemp(prefix="mc-ray-"))  # short: Ray's socket paths must fit 107 characters
    port = free_port()
    common = ["--num-cpus=1", "--disable-usage-stats", "--object-store-memory=100000000", "--block"]
    # Ray 2.60 turns token authentication on once a token file exists in ~/.ray; a local test cluster needs none,
    # and the driver (data.prepare, in this process) must agree with the nodes
    os.environ["RAY_AUTH_MODE"] = "disabled"  # restored after the test (conftest's _environment)
    env = dict(os.environ)
    nodes = []
    try:
        for name, args in (
            ("head", ["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={root}"]),
            ("worker", [f"--address=127.0.0.1:{port}"]),
        ):
            log = open(root / f"{name}.log", "w")
            nodes.append(subprocess.Popen([str(ray), "start", *args, *common], stdout=log, stderr=log, env=env))
            wait_for_nodes(ray, port, len(nodes), root)
        yield f"127.0.0.1:{port}"
    finally:
        for node in reversed(nodes):
            node.send_signal(signal.SIGTERM)
        for node in nodes:
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.kill()
        shutil.rmtree(root, ignore_errors=True)


def wait_for_nodes(ray: Path, port: int, count: int, root: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        status = subprocess.run(
            [str(ray), "status", f"--address=127.0.0.1:{port}"], capture_output=True, text=True
        ).stdout
        if status.count(" node_") >= count:
            return
        assert time.time() < deadline, f"{count} Ray node(s) not up: " + (root / "head.log").read_text()[-2000:]
        time.sleep(1)


@pytest.mark.distributed
def test_a_ray_cluster_of_two_nodes_gives_the_bytes_of_one_local_task(corpus, one_task, ray_cluster, tmp_path):
    args = ["--executor", "ray", "--ray-address", ray_cluster, "--tasks", 2, "--workers", 2]
    on_ray = prepare(corpus, tmp_path / "p", *args, "--dedup", "exact,minhash", "--filters", FILTERS)
    assert_same_bytes(one_task, on_ray)


def test_a_second_prepare_in_the_same_process_tokenises_with_its_own_tokenizer(corpus, tmp_path):
    """One task runs inside the prepare process: nothing of the first run's tokenizer may be reused."""
    prepare(corpus, tmp_path / "p")  # the byte tokenizer: ids up to 259
    result = in_process(prepare_main, "--source", corpus, "--out", tmp_path / "p", "--vocab-size", 400, "--overwrite")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == 400 and manifest["max_token_id"] >= 260  # merges were used


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past `limit` bytes fail as on a full disk (SIGXFSZ ignored, so the write returns EFBIG)."""
    previous, limits = signal.signal(signal.SIGXFSZ, signal.SIG_IGN), resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)


def test_a_failed_run_keeps_its_finished_tasks_and_the_same_command_resumes_them(tmp_path):
    """Rank 0 (short documents) finishes; rank 1's token file outgrows the disk. The rerun redoes rank 1 only
    and writes what an uninterrupted run writes."""
    rng = random.Random(1)
    letters = "abcdefghijklmnopqrstuvwxyz     "
    short = [english(rng, 2) for _ in range(10)]
    long = ["".join(rng.choice(letters) for _ in range(20_000)) for _ in range(10)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in short + long))
    args = ["--source", corpus, "--tokenizer", "byte", "--tasks", 2, "--workers", 1, "--out"]
    with file_size_limit(300_000):  # above the corpus (~200 kB), below rank 1's tokens (2 bytes a character)
        failed = in_process(prepare_main, *args, tmp_path / "p")
    assert failed.returncode == 2 and "the same command resumes them" in failed.stderr, failed.stderr
    work = tmp_path / ".p.work"
    assert (work / "logs" / "tokens" / "completions" / "00000").exists() and not (tmp_path / "p").exists()
    resumed = in_process(prepare_main, *args, tmp_path / "p")
    assert resumed.returncode == 0 and "resumed a run that had finished 1 of 2 tasks" in resumed.stderr
    assert not work.exists()
    assert in_process(prepare_main, *args, tmp_path / "fresh").returncode == 0
    assert_same_bytes(tmp_path / "p", tmp_path / "fresh")
