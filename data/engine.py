"""Preparation on datatrove (Hugging Face's engine for web-scale data): the corpus is staged as contiguous
chunks, then deduplicated, filtered and tokenised by datatrove executors (local processes, a SLURM job
array or a Ray cluster), and the ranks' token files are merged in corpus order into the shards.

The output does not depend on the executor or the number of tasks: the train/val split and the tokenizer
are decided before the engine runs, a rank's documents are a contiguous run of the corpus, dedup keeps the
earliest copy in corpus order (`steps`), filters judge one document at a time, and the merge reads the
ranks in order. Stages that need one task or one per MinHash bucket get that many whatever --tasks is.
"""

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datatrove.executor import LocalPipelineExecutor, RayPipelineExecutor, SlurmPipelineExecutor
from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupFilter, MinhashDedupSignature
from datatrove.pipeline.dedup.exact_dedup import (
    ExactDedupConfig,
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
)
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.pipeline.filters import FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.readers import ParquetReader
from datatrove.utils.hashing import HashConfig
from loguru import logger

from . import steps
from .shards import DataError, ShardWriter
from .sources import disk_full

EXECUTORS = ("local", "slurm", "ray")
DEDUPS = ("exact", "minhash")
FILTERS = {  # datatrove's document filters for web text, at their published thresholds
    "gopher-quality": lambda: GopherQualityFilter(language=steps.Words()),
    "gopher-repetition": lambda: GopherRepetitionFilter(language=steps.Words()),
    "fineweb-quality": lambda: FineWebQualityFilter(language=steps.Words()),
}
MAX_TASKS = steps.PRIORITY_TOP  # exact dedup ranks a copy by its chunk in 16 bits
# sha1, not xxhash: datatrove's xxhash path needs xxhash<4, and checkpoints here use xxhash 4's API
HASHES = HashConfig(precision=64, hash_fc="sha1")
MINHASH = MinhashConfig(hash_config=HASHES)  # 5-grams, 14 buckets of 8 hashes: ~0.75 Jaccard and up
EXACT = ExactDedupConfig(content_getter=steps.text_of, document_priority=steps.earlier_chunk_first, hash_config=HASHES)
STAGED = pa.schema([("text", pa.large_string()), ("id", pa.string()), ("split", pa.string()), ("chunk", pa.int32())])
POLL_SECONDS = 1.0


@dataclass
class Executor:
    kind: str = "local"
    tasks: int = 1
    workers: int | None = None  # at once; None: local, as many as cores; slurm and ray, all
    slurm_partition: str | None = None
    slurm_time: str | None = None
    ray_address: str | None = None  # None: a Ray cluster on this machine, for this run


class Stage(NamedTuple):
    name: str
    pipeline: list
    tasks: int


def stage_documents(documents: Iterable[tuple[str, bool]], count: int, tasks: int, folder: Path) -> None:
    """The corpus as `tasks` parquet files of contiguous documents (near-equal counts), each row carrying
    its place in the corpus, its split and its chunk (what dedup ranks copies by)."""
    folder.mkdir(parents=True)
    writer, chunk, rows = None, -1, {"text": [], "id": [], "split": [], "chunk": []}

    def flush() -> None:
        if rows["text"]:
            writer.write_batch(pa.record_batch([rows[k] for k in STAGED.names], schema=STAGED))
            for values in rows.values():
                values.clear()

    try:
        for index, (text, is_val) in enumerate(documents):
            if index * tasks // count != chunk:
                flush()
                if writer is not None:
                    writer.close()
                chunk = index * tasks // count
                writer = pq.ParquetWriter(folder / f"{chunk:05d}.parquet", STAGED)
            for key, value in zip(STAGED.names, (text, str(index), "val" if is_val else "train", chunk)):
                rows[key].append(value)
            if len(rows["text"]) >= 256:
                flush()
        flush()
    finally:
        if writer is not None:
            writer.close()


def plan(work: Path, dedup: list[str], filters: list[str], tasks: int, tokenizer_path: str, dtype: str) -> list[Stage]:
    """The stages, in order: each dedup's signatures and matching, then one pass that drops the copies,
    filters, and writes the tokens. A dedup filter must see the stream its signatures saw, so MinHash
    signs the documents that exact dedup keeps."""

    def reader() -> ParquetReader:
        staged = ParquetReader(str(work / "staged"), text_key="text", id_key="id", batch_size=256)
        staged.add_file_path = False  # a path per document costs a tenth of the tokenising; the id says where
        return staged

    tally = str(work / "tally")
    stages, before_minhash, final = [], [], [reader()]
    if "exact" in dedup:
        stages += [
            Stage("exact-signatures", [reader(), ExactDedupSignature(str(work / "exact-sigs"), EXACT)], tasks),
            Stage("exact-matches", [ExactFindDedups(str(work / "exact-sigs"), str(work / "exact-dups"), EXACT)], 1),
        ]
        before_minhash = [ExactDedupFilter(str(work / "exact-dups"), EXACT)]
        final.append(
            steps.Counted(ExactDedupFilter(str(work / "exact-dups"), EXACT), "exact-dedup", tally, tokenizer_path)
        )
    if "minhash" in dedup:
        signatures = MinhashDedupSignature(str(work / "minhash-sigs"), MINHASH, language=steps.Words())
        buckets = MinhashDedupBuckets(*_folders(work, "sigs", "buckets"), config=MINHASH)
        stages += [
            Stage("minhash-signatures", [reader(), *before_minhash, signatures], tasks),
            Stage("minhash-buckets", [buckets], MINHASH.num_buckets),
            Stage("minhash-clusters", [steps.EarliestCopyCluster(*_folders(work, "buckets", "remove"), MINHASH)], 1),
        ]
        dropper = MinhashDedupFilter(str(work / "minhash-remove"))
        final.append(steps.Counted(dropper, "minhash-dedup", tally, tokenizer_path))
    for name in filters:
        final.append(steps.Counted(FILTERS[name](), name, tally, tokenizer_path))
    final.append(steps.WriteTokens(str(work / "tokens"), tokenizer_path, dtype, tally))
    return stages + [Stage("tokens", final, tasks)]


def _folders(work: Path, *names: str) -> list[str]:
    return [str(work / f"minhash-{name}") for name in names]


def run(stages: list[Stage], executor: Executor, work: Path) -> None:
    """Every stage to completion, in order; a failed task stops it in one line naming its log."""
    log = work / "logs"
    log.mkdir(parents=True, exist_ok=True)
    if executor.kind == "slurm":
        return _run_slurm(stages, executor, log)
    with _stderr_into(log / "engine.log"), _ray(executor):
        for stage in stages:
            default = (os.cpu_count() or 1) if executor.kind == "local" else stage.tasks
            workers = min(stage.tasks, executor.workers or default)
            options = dict(tasks=stage.tasks, workers=workers, logging_dir=str(log / stage.name))
            try:
                if executor.kind == "local":
                    LocalPipelineExecutor(stage.pipeline, **options).run()
                else:
                    RayPipelineExecutor(stage.pipeline, mem_per_cpu_gb=1, **options).run()
            except Exception as error:  # the task's log holds the reason; _check_complete reports it
                if disk_full(error) is not None:
                    raise  # prepare reports a full disk as such
            _check_complete(stage, log, executor.kind)


@contextlib.contextmanager
def _ray(executor: Executor) -> Iterator[None]:
    if executor.kind != "ray":
        yield
        return
    import ray  # only for --executor ray

    try:
        ray.init(address=executor.ray_address, log_to_driver=False, configure_logging=False)
    except Exception as error:
        where = executor.ray_address or "a local cluster"
        raise DataError(
            f"--ray-address {where}: Ray did not connect ({str(error).splitlines()[0][:160]}); start the cluster "
            f"(ray start --head) or leave --ray-address out for one on this machine"
        ) from None
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _stderr_into(path: Path) -> Iterator[None]:
    """The engine's log lines, its worker processes' included, into a file: the user gets one summary line.
    datatrove logs through loguru to whatever sys.stderr is when a task starts; no sink outlives the run."""
    sys.stderr.flush()
    saved_fd, saved_stream = os.dup(2), sys.stderr
    with open(path, "a") as file:
        os.dup2(file.fileno(), 2)
        sys.stderr = file
        logger.remove()
        try:
            yield
        finally:
            logger.remove()
            sys.stderr = saved_stream
            os.dup2(saved_fd, 2)
            os.close(saved_fd)


def _complete(stage: Stage, log: Path) -> bool:
    return all((log / stage.name / "completions" / f"{rank:05d}").exists() for rank in range(stage.tasks))


def _check_complete(stage: Stage, log: Path, kind: str) -> None:
    for rank in range(stage.tasks):
        if not (log / stage.name / "completions" / f"{rank:05d}").exists():
            task_log = log / stage.name / "logs" / f"task_{rank:05d}.log"
            lines = task_log.read_text(errors="replace").splitlines() if task_log.exists() else []
            errors = [line for line in lines if "Error" in line or "error" in line] or lines or ["no log written"]
            raise DataError(
                f"data.prepare: task {rank} of the {stage.name} stage failed on the {kind} executor: "
                f"{errors[-1].split(' - ')[-1][:200]}"
            )


class _Slurm(SlurmPipelineExecutor):
    """datatrove's SLURM executor, with the cluster's defaults where the user set nothing."""

    def launch_merge_stats(self) -> None:
        """Not submitted: prepare merges the tallies itself, and a job left queued would write into a folder
        that is renamed when prepare finishes."""

    def get_sbatch_args(self, max_array: int = 1) -> dict:
        args = super().get_sbatch_args(max_array)
        return {k: v for k, v in args.items() if v is not None and k != "mem-per-cpu"}


def _run_slurm(stages: list[Stage], executor: Executor, log: Path) -> None:
    """Submits the stages as a chain of job arrays (each after the last succeeded), then waits for them."""
    jobs, previous = [], None
    for stage in stages:
        previous = _Slurm(
            stage.pipeline,
            tasks=stage.tasks,
            time=executor.slurm_time,
            partition=executor.slurm_partition,
            workers=executor.workers or -1,
            logging_dir=str(log / stage.name),
            job_name=f"prepare-{stage.name}",
            qos=None,
            env_command=f"export PATH={Path(sys.executable).parent}:$PATH",  # this venv's launch_pickled_pipeline
            depends=previous,
        )
        jobs.append(previous)
    try:
        with _stderr_into(log / "engine.log"):
            previous.run()
    except (OSError, subprocess.CalledProcessError) as error:
        raise DataError(
            f"--executor slurm: sbatch failed ({error}); run prepare where sbatch reaches a cluster"
        ) from None
    for stage, job in zip(stages, jobs):
        while not _complete(stage, log):
            if not _queued(job.job_id):
                _cancel([later.job_id for later in jobs])
                _check_complete(stage, log, "slurm")
            time.sleep(POLL_SECONDS)


def _queued(job_id: str) -> bool:
    listed = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%i"], capture_output=True, text=True)
    return listed.returncode == 0 and bool(listed.stdout.strip())


def _cancel(job_ids: list[str]) -> None:
    subprocess.run(["scancel", *map(str, job_ids)], capture_output=True)


def merge(work: Path, stages: list[Stage], folder: Path, dtype: np.dtype, shard_tokens: int) -> tuple[dict, dict]:
    """The ranks' token files, in rank (= corpus) order, as each split's shards; and the tallies: documents
    and tokens in, removed by each counted step, and out."""
    tasks = stages[-1].tasks
    tallies = {}
    for name in [s.label for s in stages[-1].pipeline if isinstance(s, steps.Counted)] + ["kept"]:
        tallies[name] = {}
        for rank in range(tasks):
            for split, (documents, tokens) in json.loads(
                (work / "tally" / name / f"{rank:05d}.json").read_text()
            ).items():
                before = tallies[name].get(split, (0, 0))
                tallies[name][split] = (before[0] + documents, before[1] + tokens)
    splits = {}
    for split in ("train", "val"):
        writer = ShardWriter(folder, split, dtype, shard_tokens)
        for rank in range(tasks):
            path = work / "tokens" / f"{rank:05d}.{split}.bin"
            if path.stat().st_size:
                tokens = np.memmap(path, dtype=dtype, mode="r")
                for start in range(0, len(tokens), 1 << 24):
                    writer.write(np.asarray(tokens[start : start + (1 << 24)]))
        shards = writer.close()
        splits[split] = {
            "documents": tallies["kept"].get(split, (0, 0))[0],
            "tokens": sum(s["tokens"] for s in shards),
            "shards": shards,
            "max_token_id": writer.max_token_id,
        }
    return splits, _counts(tallies)


def _counts(tallies: dict) -> dict:
    def total(name: str) -> dict:
        documents, tokens = (sum(x) for x in zip((0, 0), *tallies[name].values()))
        return {"documents": documents, "tokens": tokens}

    removed = {name: total(name) for name in tallies if name != "kept"}
    out = total("kept")
    into = {k: out[k] + sum(r[k] for r in removed.values()) for k in out}
    return {"in": into, "removed": removed, "out": out}
