"""Preparation on datatrove (Hugging Face's engine for web-scale data): the corpus is staged as contiguous
chunks, then deduplicated, filtered and tokenised by datatrove executors (local processes, a SLURM job
array or a Ray cluster), and the ranks' token files are merged in corpus order into the shards.

The output does not depend on the executor or the number of tasks: the train/val split and the tokenizer
are decided before the engine runs, a rank's documents are a contiguous run of the corpus, dedup keeps the
earliest copy in corpus order (`steps`), filters judge one document at a time, and the merge reads the
ranks in order. Stages that need one task or one per MinHash bucket get that many whatever --tasks is.
"""

import contextlib
import importlib.util
import json
import os
import resource
import shlex
import shutil
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
from datatrove.pipeline.base import PipelineStep
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
POLL_SECONDS = 2.0  # how often the SLURM wait asks squeue and lists the completions
SLURM_GRACE_SECONDS = 60.0
WORK_FOLDERS = ("exact-sigs", "exact-dups", "minhash-sigs", "minhash-buckets", "minhash-remove")


@dataclass
class Executor:
    kind: str = "local"
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
    its place in the corpus, its split and its chunk (what dedup ranks copies by). No chunk is empty."""
    assert 1 <= tasks <= count, f"{tasks} tasks for {count} documents"
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
    folder = {name: str(work / name) for name in ("staged", "tally", "tokens", *WORK_FOLDERS)}

    def reader() -> ParquetReader:
        staged = ParquetReader(folder["staged"], text_key="text", id_key="id", batch_size=256)
        staged.add_file_path = False  # a path per document costs a tenth of the tokenising; the id says where
        return staged

    def counted(step: PipelineStep, label: str) -> steps.Counted:
        return steps.Counted(step, label, folder["tally"], tokenizer_path)

    stages, before_minhash, final = [], [], [reader()]
    if "exact" in dedup:
        stages += [
            Stage("exact-signatures", [reader(), ExactDedupSignature(folder["exact-sigs"], EXACT)], tasks),
            Stage("exact-matches", [ExactFindDedups(folder["exact-sigs"], folder["exact-dups"], EXACT)], 1),
        ]
        before_minhash = [ExactDedupFilter(folder["exact-dups"], EXACT)]
        final.append(counted(ExactDedupFilter(folder["exact-dups"], EXACT), "exact-dedup"))
    if "minhash" in dedup:
        signatures = MinhashDedupSignature(folder["minhash-sigs"], MINHASH, language=steps.Words())
        buckets = MinhashDedupBuckets(folder["minhash-sigs"], folder["minhash-buckets"], config=MINHASH)
        clusters = steps.EarliestCopyCluster(folder["minhash-buckets"], folder["minhash-remove"], MINHASH)
        stages += [
            Stage("minhash-signatures", [reader(), *before_minhash, signatures], tasks),
            Stage("minhash-buckets", [buckets], MINHASH.num_buckets),
            Stage("minhash-clusters", [clusters], 1),
        ]
        final.append(counted(MinhashDedupFilter(folder["minhash-remove"]), "minhash-dedup"))
    final += [counted(FILTERS[name](), name) for name in filters]
    final.append(steps.WriteTokens(folder["tokens"], tokenizer_path, dtype, folder["tally"]))
    return stages + [Stage("tokens", final, tasks)]


def check_executor(kind: str, tasks: int, dedup: list[str]) -> None:
    """What an executor needs, checked before the corpus is read (which can take hours)."""
    if kind == "slurm":
        missing = [name for name in ("sbatch", "squeue", "scancel") if shutil.which(name) is None]
        if missing:
            raise DataError(f"--executor slurm: {', '.join(missing)} not found; run prepare where SLURM's commands are")
    if kind == "ray" and importlib.util.find_spec("ray") is None:
        raise DataError('--executor ray: Ray is not installed; pip install -e ".[ray]"')
    # dedup's matching stages open every rank's signature file at once
    open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if dedup and open_files != resource.RLIM_INFINITY and tasks > open_files - 64:
        raise DataError(
            f"--tasks {tasks}: dedup opens one file per task at once and this process may open {open_files} "
            f"(ulimit -n); use fewer tasks or raise the limit"
        )


def finished_tasks(stages: list[Stage], work: Path) -> tuple[int, int]:
    """(tasks with a completion marker, all tasks) of the stages: what a resumed run will not redo."""
    total = sum(stage.tasks for stage in stages)
    return total - sum(len(_missing_ranks(stage, work / "logs")) for stage in stages), total


def run(stages: list[Stage], executor: Executor, work: Path) -> None:
    """Every stage to completion, in order; a failed task stops it in one line with the task's error."""
    log = work / "logs"
    log.mkdir(parents=True, exist_ok=True)
    if executor.kind == "slurm":
        return _run_slurm(stages, executor, log)
    with _stderr_into(log / "engine.log"), _ray(executor):
        for stage in stages:
            default = (os.cpu_count() or 1) if executor.kind == "local" else stage.tasks
            workers = min(stage.tasks, executor.workers or default)
            options = dict(tasks=stage.tasks, workers=workers, logging_dir=str(log / stage.name))
            failure = None
            try:
                if executor.kind == "local":
                    LocalPipelineExecutor(stage.pipeline, **options).run()
                else:
                    # 1 GiB a task: Ray's default asks for all of a node's memory per task, here one CPU each
                    RayPipelineExecutor(stage.pipeline, mem_per_cpu_gb=1, **options).run()
            except Exception as error:  # a task's log holds the reason; the driver's own error is the fallback
                if disk_full(error) is not None:
                    raise  # prepare reports a full disk as such
                failure = error
            _check_complete(stage, log, executor.kind, failure)


@contextlib.contextmanager
def _ray(executor: Executor) -> Iterator[None]:
    if executor.kind != "ray":
        yield
        return
    import ray  # only for --executor ray

    try:
        ray.init(address=executor.ray_address, log_to_driver=False, configure_logging=False)
    except Exception as error:
        where = f"--ray-address {executor.ray_address}" if executor.ray_address else "--executor ray (a local instance)"
        raise DataError(
            f"{where}: Ray did not start or connect ({_first_line(error)}); start the cluster (ray start --head) "
            f"or leave --ray-address out for an instance on this machine"
        ) from None
    try:
        yield
    finally:
        ray.shutdown()


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


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


def _missing_ranks(stage: Stage, log: Path) -> list[int]:
    done = log / stage.name / "completions"
    finished = {path.name for path in done.iterdir()} if done.is_dir() else set()  # a fresh listing (NFS)
    return [rank for rank in range(stage.tasks) if f"{rank:05d}" not in finished]


def _check_complete(stage: Stage, log: Path, kind: str, failure: BaseException | None = None) -> None:
    missing = _missing_ranks(stage, log)
    if missing:
        rank, reason = _failure_reason(stage, log, missing, failure)
        raise DataError(
            f"data.prepare: task {rank} of the {stage.name} stage failed on the {kind} executor: {reason[:300]}"
        )


def _failure_reason(stage: Stage, log: Path, missing: list[int], failure: BaseException | None) -> tuple[int, str]:
    """The first unfinished rank whose log holds an error (others may only have been stopped by it), and that
    error; else the driver's own, else the engine log's last line."""
    for rank in missing:
        task_log = log / stage.name / "logs" / f"task_{rank:05d}.log"
        lines = task_log.read_text(errors="replace").splitlines() if task_log.exists() else []
        errors = [line for line in lines if "| ERROR" in line or "Error:" in line]
        if errors:
            return rank, errors[-1].split(" - ", 1)[-1]
    if failure is not None:
        return missing[0], _first_line(failure)
    engine_log = log / "engine.log"
    said = engine_log.read_text(errors="replace").strip().splitlines() if engine_log.exists() else []
    return missing[0], f"no error logged ({said[-1][:160]})" if said else "no error logged"


class _Slurm(SlurmPipelineExecutor):
    """datatrove's SLURM executor, with the cluster's defaults where the user set nothing."""

    def launch_merge_stats(self) -> None:
        """Not submitted: prepare merges the tallies itself, and a job left queued would write into a folder
        that is renamed when prepare finishes."""

    def get_sbatch_args(self, max_array: int = 1) -> dict:
        args = super().get_sbatch_args(max_array)
        return {k: v for k, v in args.items() if v is not None and k != "mem-per-cpu"}


def _run_slurm(stages: list[Stage], executor: Executor, log: Path) -> None:
    """Submits the stages as a chain of job arrays (each after the last succeeded), then waits for them; a
    failure or an interruption cancels what is still queued."""
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
            max_array_size=stage.tasks,  # one array a stage: the next stage's dependency is on all of it
            env_command=f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH",  # this venv's
            depends=previous,
        )
        jobs.append(previous)
    try:
        try:
            with _stderr_into(log / "engine.log"):
                previous.run()
        except (OSError, subprocess.CalledProcessError):
            said = (log / "engine.log").read_text(errors="replace").strip().splitlines() or ["no reason given"]
            raise DataError(f"--executor slurm: sbatch refused the job ({said[-1][:200]})") from None
        for stage, job in zip(stages, jobs):
            _wait_for(stage, job.job_id, log)
    except BaseException:
        _cancel([job.job_id for job in jobs if job.job_id])
        raise


def _wait_for(stage: Stage, job_id: str, log: Path) -> None:
    """Until the stage's tasks are complete; a job that left the queue without finishing them failed (after a
    grace period: a shared filesystem may show another node's files late)."""
    gone_since = None
    while _missing_ranks(stage, log):
        if _queued(job_id):
            gone_since = None
        elif gone_since is None:
            gone_since = time.monotonic()
        elif time.monotonic() - gone_since > SLURM_GRACE_SECONDS:
            _check_complete(stage, log, "slurm")
        time.sleep(POLL_SECONDS)


def _queued(job_id: str) -> bool:
    """Whether SLURM still lists the job; a controller that does not answer is asked again, not taken for no."""
    for attempt in range(5):
        listed = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%i"], capture_output=True, text=True)
        if listed.returncode == 0:
            return bool(listed.stdout.strip())
        if "Invalid job id" in listed.stderr:
            return False
        time.sleep(2**attempt)
    raise DataError(
        f"--executor slurm: squeue keeps failing ({(listed.stderr.strip().splitlines() or ['no message'])[0][:200]}); "
        f"is slurmctld up?"
    )


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
        per_split = tallies[name].values()
        return {"documents": sum(d for d, _ in per_split), "tokens": sum(t for _, t in per_split)}

    removed = {name: total(name) for name in tallies if name != "kept"}
    out = total("kept")
    into = {k: out[k] + sum(r[k] for r in removed.values()) for k in out}
    return {"in": into, "removed": removed, "out": out}
