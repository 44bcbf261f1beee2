"""python -m data.prepare --source SRC --out DIR: corpus -> tokenizer -> packed token shards.

SRC is `stdlib` (the running Python's standard library, offline, the default corpus), a local file or
folder (.txt, .txt.gz, .jsonl(.gz), .parquet), or a Hugging Face hub dataset name (needs network).
Documents are split into train/val whole (seeded), the tokenizer is trained on (a seeded sample of) train
only, and then datatrove (`engine`) deduplicates, filters and tokenises them, with EOS after every document,
on --executor local|slurm|ray in --tasks tasks; the ranks' tokens are merged in corpus order into flat binary
shards plus manifest.json, whatever the executor and the number of tasks. Documents are read one at a time
and tokenised in bounded pieces, so memory follows the bytes however long a line is. The output appears
atomically: everything (the `datasets` cache included, deleted before the end) is written to a temporary
folder renamed at the end, while a lock beside --out stops a second prepare of it. The engine works in
.OUT.work beside it, kept only when a run fails after some tasks finished, for the same command to resume.
Re-running the same command reuses the finished folder only if the source's content is unchanged (its sha256
is in the manifest); identical inputs give identical bytes. --overwrite replaces only a folder this command
made, and only if it holds nothing else; any other existing, non-empty --out is refused.
"""

import argparse
import json
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from groundwork import folders
from groundwork.cli import ArgumentParser, run_main
from groundwork.errors import UserError

from . import engine
from . import tokenizer as tok
from .engine import DEDUPS, EXECUTORS, FILTERS, MAX_TASKS

if TYPE_CHECKING:
    from .sources import Corpus  # imports `datasets`: only where data is prepared

from .shards import FORMAT_VERSION, MANIFEST, DataError, read_manifest, token_dtype, write_manifest

# What a prepared folder holds (and --overwrite may delete): its marker, manifest, tokenizer files and shards,
# and the temporary name of a marker or manifest whose write was killed.
OWN_FILE = re.compile(
    r"(\.minicolossus\.json|manifest\.json|tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json"
    r"|[a-z]+_\d{3,}\.bin|\.(\.minicolossus|manifest)\.json\.tmp-\d+)"
)


OPTIONAL_SETTINGS = {"val_from": "random", "tokenizer_sample_chars": 1 << 30, "dedup": [], "filters": []}


def split_documents(
    n_documents: int, val_fraction: float, seed: int, val_from: str = "random"
) -> tuple[np.ndarray, np.ndarray]:
    """Train and val document indices (each sorted): a seeded choice of whole documents, or (val_from "end")
    the last ones in corpus order, e.g. the end of a single text split into paragraphs."""
    n_val = max(1, round(val_fraction * n_documents))  # never an empty val split: training validates on it
    if n_val >= n_documents:
        raise DataError(
            f"--val-fraction {val_fraction}: {n_documents} document(s) leave an empty train split; "
            f"use a larger corpus or a smaller --val-fraction"
        )
    if val_from == "end":
        return np.arange(n_documents - n_val), np.arange(n_documents - n_val, n_documents)
    order = np.random.default_rng(seed).permutation(n_documents)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def prepare(args: argparse.Namespace) -> dict:
    from . import sources  # imports `datasets`: only where data is prepared

    out = Path(args.out)
    folders.refuse_symlink(out, "--out")
    files = sources.source_files(args.source)  # a missing or unreadable source stops here, before any writing
    engine.check_executor(args.executor, args.tasks, args.dedup)  # and an executor that cannot run
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
    for key, default in OPTIONAL_SETTINGS.items():  # recorded only when set: folders made before still match
        if getattr(args, key) != default:
            settings[key] = getattr(args, key)
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    try:
        source_sha256 = sources.source_sha256(args.source, files) if files is not None else None
        with folders.OutputLock(out, "--out"):  # a second prepare of this --out stops here, naming this one
            reused = _reuse(out, args, settings, source_sha256)
            if reused is not None:
                return reused
            folders.check_replaceable(out, "data", "--out", args.overwrite)  # before the corpus is read
            _refuse_foreign_files(out, args.overwrite)
            folders.remove_leftovers(out.parent, out.name, "data")  # what an interrupted run left
            with folders.atomic_folder(out, "data", "--out", args.overwrite) as tmp:
                manifest = _build(args, tmp, settings, source_sha256)
                _refuse_foreign_files(out, args.overwrite)  # again: a file put there meanwhile is not deleted
            return manifest
    except Exception as error:
        for folder in made:  # parents this run created, if it left them empty
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        if isinstance(error, UserError):  # already one line (its chain may hold the disk-full error it reports)
            raise
        full = sources.disk_full(error)
        if full is not None:
            reason = sources.disk_full_reason(full)
            raise DataError(
                f"--out {out}: writing failed, {reason} ({full.filename or 'a file of the run'}); nothing was "
                f"kept: free space or choose another --out"
            ) from None
        if isinstance(error, OSError) and not isinstance(error, UserError):
            raise DataError(
                f"{error.filename or out}: {error.strerror or error}; --source must be readable and --out "
                f"{out} writable"
            ) from None
        raise


def _reuse(out: Path, args: argparse.Namespace, settings: dict, source_sha256: str | None) -> dict | None:
    """The finished folder of the same command on the same source content, or None to prepare anew."""
    if args.overwrite or folders.kind_of(out) != "data" or not (out / MANIFEST).exists():
        return None
    manifest = read_manifest(out)
    if manifest.get("settings") != settings:
        raise DataError(f"{out}: already prepared with other settings; pass --overwrite or choose another --out")
    if source_sha256 is not None and manifest.get("source_sha256") != source_sha256:
        what = "differs from what it was prepared from" if "source_sha256" in manifest else "is not recorded in it"
        raise DataError(
            f"--source {args.source}: its content {what} ({out}); pass --overwrite to prepare it again, or "
            f"choose another --out"
        )
    _check_seq_len(manifest, args.seq_len, out)
    print(f"{out}: already prepared with these settings from the same source content, reusing it", file=sys.stderr)
    return manifest


def _refuse_foreign_files(out: Path, overwrite: bool) -> None:
    """--overwrite deletes the old folder: it must hold only what prepare writes, or a user's file goes with it."""
    if not overwrite or folders.kind_of(out) != "data":
        return
    for entry in sorted(out.iterdir()):
        if entry.is_symlink() or not entry.is_file() or not OWN_FILE.fullmatch(entry.name):
            raise DataError(
                f"--out {out}: holds {entry.name}, which data.prepare did not write; move it out first "
                f"(--overwrite would delete it) or choose another --out"
            )


def _build(args: argparse.Namespace, tmp: Path, settings: dict, source_sha256: str | None) -> dict:
    """Everything of a prepared folder, written into `tmp`; `datasets`' cache lives in tmp/cache meanwhile,
    the engine's work in a folder beside --out that outlives a failed run (`_work_folder`)."""
    from . import sources

    started = time.perf_counter()
    cache = tmp / "cache"
    try:
        corpus = sources.load_corpus(
            args.source,
            args.text_field,
            args.sample_by,
            args.hub_config,
            args.hub_split,
            args.streaming,
            args.max_documents,
            cache_dir=cache,
        )
        is_val = np.zeros(corpus.count, dtype=bool)
        is_val[split_documents(corpus.count, args.val_fraction, args.seed, args.val_from)[1]] = True
        tasks = min(args.tasks, corpus.count)
        if args.tokenizer == "bpe":
            tokenizer = tok.train_bpe(tokenizer_sample(corpus, is_val, args), args.vocab_size)
        else:
            tokenizer = tok.byte_tokenizer()
        tokenizer_hash = tok.save(tokenizer, tmp)
        vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        dtype = token_dtype(vocab_size)
        key = {"settings": settings, "source_sha256": source_sha256, "tasks": tasks, "tokenizer": tokenizer_hash}
        work = _work_folder(Path(args.out), key)
        stages = engine.plan(work, args.dedup, args.filters, tasks, str(tmp / "tokenizer.json"), dtype.name)
        resumed = engine.finished_tasks(stages, work)
        try:
            if not (work / "staged.complete").exists():
                shutil.rmtree(work / "staged", ignore_errors=True)
                documents = zip(sources.texts(corpus.documents), is_val)
                engine.stage_documents(documents, corpus.count, tasks, work / "staged")
                (work / "staged.complete").touch()
            executor = engine.Executor(
                args.executor, args.workers, args.slurm_partition, args.slurm_time, args.ray_address
            )
            engine.run(stages, executor, work)
        except Exception as error:
            if engine.finished_tasks(stages, work)[0] == 0:  # nothing worth resuming
                folders.remove(work, "prepare-work")
                raise
            full = sources.disk_full(error)
            if not isinstance(error, DataError) and full is None:
                raise
            reason = (
                str(error) if full is None else f"--out {args.out}: writing failed, {sources.disk_full_reason(full)}"
            )
            raise DataError(f"{reason}; the finished tasks are kept in {work}: the same command resumes them") from None
        written, counts = engine.merge(work, stages, tmp, dtype, args.shard_tokens)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": corpus.description,
        "source_sha256": source_sha256,
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
    if args.dedup or args.filters:
        manifest["filtering"] = {"steps": [f"{kind}-dedup" for kind in args.dedup] + args.filters, **counts}
    for name, split in written.items():
        if split["tokens"] == 0:
            raise DataError(
                f"--source {args.source}: dedup and filters left no {name} document; use fewer filters or a "
                f"larger corpus"
            )
    _check_seq_len(manifest, args.seq_len, Path(args.out))
    write_manifest(tmp, manifest)
    folders.remove(work, "prepare-work")  # done: nothing left to resume

    seconds = time.perf_counter() - started
    total = sum(s["tokens"] for s in written.values())
    removed = counts["in"]["documents"] - counts["out"]["documents"]
    print(
        f"{args.out}: {corpus.description}; {vocab_size}-token {args.tokenizer} tokenizer; "
        + ", ".join(f"{name} {s['documents']} docs / {s['tokens']:,} tokens" for name, s in written.items())
        + (
            f"; {removed} docs removed by {', '.join(manifest['filtering']['steps'])}"
            if "filtering" in manifest
            else ""
        )
        + f"; {total / seconds:,.0f} tokens/s end to end ({args.executor}, {tasks} task(s))"
        + (f"; resumed a run that had finished {resumed[0]} of {resumed[1]} tasks" if resumed[0] else "")
        + (f"; {corpus.replaced_characters} undecodable bytes replaced" if corpus.replaced_characters else ""),
        file=sys.stderr,
    )
    return manifest


def _work_folder(out: Path, key: dict) -> Path:
    """The engine's work folder, `.OUT.work` beside --out: kept when a run fails, so that the same command (same
    settings, source content, task count and tokenizer) resumes it, redoing only the tasks without a completion
    marker. Anything else there is started afresh; a folder there that prepare did not make is refused."""
    work = out.with_name(f".{out.name}.work")
    if work.exists() or work.is_symlink():
        if folders.kind_of(work) != "prepare-work":
            raise DataError(f"{work}: exists and is not data.prepare's work folder; move it away")
        if key["source_sha256"] is not None and _work_key(work) == key:  # a hub dataset may change: never resumed
            return work
        folders.remove(work, "prepare-work")
    work.mkdir(parents=True)
    folders.mark(work, "prepare-work")
    folders.write_durably(work / "key.json", json.dumps(key, sort_keys=True))
    return work


def _work_key(work: Path) -> dict | None:
    try:
        return json.loads((work / "key.json").read_text())
    except (OSError, ValueError):
        return None


def tokenizer_sample(corpus: "Corpus", is_val: np.ndarray, args: argparse.Namespace) -> Iterator[str]:
    """The train documents the tokenizer learns from, in pieces: all of them when the corpus has at most
    --tokenizer-sample-chars characters, else a seeded choice of about that many, in corpus order."""
    from . import sources

    rate = args.tokenizer_sample_chars / max(corpus.characters, 1)
    draws = np.random.default_rng((args.seed, 1)).random(corpus.count)  # a stream of its own: not the split's
    chosen = draws < rate if rate < 1 else ~is_val
    for index, text in enumerate(sources.texts(corpus.documents)):
        if chosen[index] and not is_val[index]:
            yield from (piece for piece in tok.pieces(text) if not piece.isspace())


def _check_seq_len(manifest: dict, seq_len: int | None, out: Path) -> None:
    if seq_len is None:
        return
    for name, split in manifest["splits"].items():
        if split["tokens"] < seq_len + 1:
            raise DataError(
                f"{out}: the {name} split has {split['tokens']} tokens, fewer than seq_len + 1 = "
                f"{seq_len + 1}; use a shorter --seq-len, a larger --val-fraction or more data"
            )


def _names(known: Iterable[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in known]
        if unknown or len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(f"{text!r}: give distinct names among {', '.join(known)}")
        return sorted(names, key=list(known).index)  # one order, so the same choice is the same setting

    return parse


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
    p.add_argument("--num-proc", type=int, default=1, help="tokenisation processes (= --tasks N --workers N)")
    p.add_argument("--executor", choices=EXECUTORS, default="local", help="where datatrove runs the tasks")
    p.add_argument("--tasks", type=int, help="pieces the corpus is processed in (default --num-proc)")
    p.add_argument("--workers", type=int, help="tasks at once (default: local, the cores; slurm and ray, all)")
    p.add_argument("--slurm-partition", help="--executor slurm: the partition (default: the cluster's)")
    p.add_argument("--slurm-time", help="--executor slurm: each job's time limit, e.g. 1:00:00")
    p.add_argument("--ray-address", help="--executor ray: a running cluster's head (default: start one here)")
    p.add_argument("--dedup", type=_names(DEDUPS), default=[], help="comma-separated: exact, minhash")
    p.add_argument("--filters", type=_names(FILTERS), default=[], help=f"comma-separated: {', '.join(FILTERS)}")
    p.add_argument(
        "--tokenizer-sample-chars",
        type=int,
        default=1 << 30,
        help="train the tokenizer on all train documents up to this many characters, else a seeded sample",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val document split")
    p.add_argument("--shard-tokens", type=int, default=1 << 28, help="tokens per shard file (default 2^28)")
    p.add_argument("--hub-config", help="hub dataset config name")
    p.add_argument("--hub-split", default="train", help="hub dataset split (default train)")
    p.add_argument("--streaming", action="store_true", help="stream a large hub dataset (with --max-documents)")
    p.add_argument("--max-documents", type=int, help="use only the first N documents of a hub dataset")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared folder")
    args = p.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        p.error(
            f"--val-fraction must be above 0 (training validates on the val split) and below 1, got {args.val_fraction}"
        )
    if args.num_proc < 1 or args.shard_tokens < 1 or (args.seq_len is not None and args.seq_len < 1):
        p.error("--num-proc, --shard-tokens and --seq-len must be positive")
    args.tasks = args.num_proc if args.tasks is None else args.tasks
    if args.workers is None and args.num_proc > 1:
        args.workers = args.num_proc
    if not 1 <= args.tasks <= MAX_TASKS or (args.workers is not None and args.workers < 1):
        p.error(f"--tasks must be 1 to {MAX_TASKS}, and --workers positive")
    if args.tokenizer_sample_chars < 1:
        p.error("--tokenizer-sample-chars must be positive")
    given = [
        f"--{flag.replace('_', '-')}"
        for flag in ("slurm_partition", "slurm_time", "ray_address")
        if getattr(args, flag)
    ]
    if any(not flag.startswith(f"--{args.executor}") for flag in given):
        p.error(f"{', '.join(given)}: only for the executor it names (this run's is --executor {args.executor})")
    if args.seed < 0 or (args.max_documents is not None and args.max_documents < 1):
        p.error("--seed must be 0 or more, and --max-documents positive")
    if args.tokenizer == "bpe" and args.vocab_size < tok.BYTE_VOCAB_SIZE:
        p.error(f"--vocab-size {args.vocab_size} is below the {tok.BYTE_VOCAB_SIZE} byte-level base vocabulary")
    if args.vocab_size > 2**32:
        p.error(f"--vocab-size {args.vocab_size} does not fit a uint32 token shard")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import datasets  # quiet the library: the user gets one summary line, or one error line

    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its error logs would be a second line
    datasets.disable_progress_bars()
    return run_main(lambda: prepare(args) and None)


if __name__ == "__main__":
    sys.exit(main())
