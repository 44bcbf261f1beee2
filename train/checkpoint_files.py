"""Reading a checkpoint folder, which anyone may have edited: digests catch damage, not edits (whoever edits
a file can record its digest anew in COMPLETE). So every name COMPLETE lists must stay inside the folder
and be a regular file, the folder must hold nothing COMPLETE does not list, and every field of trainer.json
and each RNG file is checked before use, against the folder and against the run resuming it. Small files
are read bounded (a FIFO or a huge file is refused, not waited on); each refusal is one line naming the file
and the field.

    read_marker(folder)                     COMPLETE, its names confined and the folder's files all listed
    verify(folder, env)                     every listed file has its recorded digest (collective)
    read_meta(folder)                       trainer.json, every field typed, in range and self-consistent
    check_resumable(folder, meta, ...)      ... and consistent with the run that resumes from it
    restore_rng(folder, env)                this rank's RNG state, every rank's verdict shared (collective)
"""

import os
import re
import stat
from pathlib import Path

import torch
import torch.distributed as dist
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load_file

from groundwork import folders, untrusted
from groundwork.errors import UserError
from groundwork.hashing import hash_file

from .config import TrainConfig
from .parallel import Env

MARKER = "COMPLETE"
MODEL_CONFIG = "config.json"
TRAINER_STATE = "trainer.json"
STEP_DIR = re.compile(r"step_(\d{8})")
HASH = "xxh3_128"  # ~18 GB/s on one core here: verifying a checkpoint costs far less than reading it
DIGEST = re.compile(r"[0-9a-f]{32}")
FORMATS = {"dcp": ("none", "ddp", "fsdp", "hsdp"), "deepspeed": ("deepspeed",)}
RNG_FILE_BYTES = 1 << 20  # a CPU and a CUDA generator state are ~5 KB together
OTHER_CHECKPOINT = "resume from another checkpoint, or start over with another run.out_dir"


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used; the message names the folder or file and what to do."""


def file_digest(path: Path) -> str:
    return hash_file(path, xxhash.xxh3_128())


def gather(local: object) -> list:
    """Every rank's `local` (plain in-memory objects of our own processes), or [local] in one process."""
    if not dist.is_initialized():
        return [local]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return gathered


def raise_first(problems: list[str]) -> None:
    """One line for all of them: the first, and how many more (the same line on every rank)."""
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"{problems[0]}; {OTHER_CHECKPOINT}{more}")


# --- COMPLETE: which files the checkpoint is, all inside it ------------------------------------------


def listed_file(folder: Path, name: object) -> Path:
    """A name from COMPLETE as a path inside `folder`: relative, no `..`, no link on the way, a regular file.
    Nested names (DeepSpeed's `deepspeed/...`) are checked component by component."""
    where = f"{Path(folder) / MARKER}: lists {name!r},"
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name or "\0" in name:
        raise CheckpointError(f"{where} not a file name inside the checkpoint; {OTHER_CHECKPOINT}")
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise CheckpointError(f"{where} not a file name inside the checkpoint; {OTHER_CHECKPOINT}")
    path = Path(folder)
    for depth, part in enumerate(parts):
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            raise CheckpointError(f"{path}: missing (listed in {MARKER}); {OTHER_CHECKPOINT}") from None
        if stat.S_ISLNK(mode):
            raise CheckpointError(f"{path}: a symlink, which is never followed; {OTHER_CHECKPOINT}")
        last = depth == len(parts) - 1
        if (last and not stat.S_ISREG(mode)) or (not last and not stat.S_ISDIR(mode)):
            raise CheckpointError(f"{path}: not a regular file (listed in {MARKER}); {OTHER_CHECKPOINT}")
    return path


def first_unlisted(folder: Path, listed: set[str]) -> Path | None:
    """The first file or link in the folder (at any depth) that COMPLETE does not list: it is neither used nor
    shipped, and a checkpoint holding it is not one this project wrote. The folder marker is ours."""
    folder = Path(folder)
    for top, dirs, files in os.walk(folder):  # never into a linked folder: links are reported, not followed
        dirs.sort()
        for name in sorted(files) + [d for d in dirs if (Path(top) / d).is_symlink()]:
            path = Path(top) / name
            relative = str(path.relative_to(folder))
            if relative not in listed and relative not in (MARKER, folders.MARKER):
                return path
    return None


def read_marker(folder: Path) -> dict:
    """COMPLETE, read bounded: its digests, every name confined to the folder, no file of the folder unlisted."""
    folder = Path(folder)
    path = folder / MARKER
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(
            f"{folder}: not a complete checkpoint (no {MARKER} marker); pass run.resume=auto to "
            f"use the latest complete one, or run.resume=never"
        )
    unusable = f"{path}: no file digests in it (damaged, or written before checkpoints recorded them)"
    try:
        marker = untrusted.read_json_object(path, MARKER, "use another checkpoint")
    except untrusted.UntrustedFileError as error:
        raise CheckpointError(f"{unusable}: {error}") from None
    files = marker.get("files")
    if marker.get("hash") != HASH or not isinstance(files, dict):
        raise CheckpointError(f"{unusable}, so the checkpoint cannot be verified; use another checkpoint")
    for name, digest in files.items():
        listed_file(folder, name)
        if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
            raise CheckpointError(f"{path}: the digest of {name!r} is not an {HASH} digest; use another checkpoint")
    unlisted = first_unlisted(folder, set(files))
    if unlisted is not None:
        raise CheckpointError(
            f"{unlisted}: not listed in {MARKER} (a checkpoint holds only the files it lists); remove it if it "
            f"is yours, or {OTHER_CHECKPOINT}"
        )
    return marker


def verify(folder: Path, env: Env | None = None) -> None:
    """Every file that COMPLETE lists has its recorded digest (collective when env is given)."""
    folder = Path(folder)
    recorded = read_marker(folder)["files"]
    rank, world = (env.rank, env.world_size) if env is not None else (0, 1)
    problems = []
    for name in sorted(recorded)[rank::world]:
        path = listed_file(folder, name)
        if file_digest(path) != recorded[name]:
            problems.append(f"{path}: contents differ from the digest in {MARKER} (damaged or edited)")
    raise_first([p for part in (gather(problems) if env is not None else [problems]) for p in part])


# --- trainer.json: the trainer's state, every field checked -----------------------------------------


def _whole(value: object, path: Path, key: str, low: int = 0, high: int = 2**63 - 1) -> int:
    fix = f"{OTHER_CHECKPOINT} (trainer.json is written by the trainer, not by hand)"
    return untrusted.whole_number(value, f"{path}: {key}", fix, low, high)


def _wrong(path: Path, key: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {key} {problem}; {OTHER_CHECKPOINT}")


def read_meta(folder: Path) -> dict:
    """trainer.json of a complete checkpoint, every field the trainer reads checked: exact types, ranges,
    the step of the folder's name, and tokens = samples x seq_len (what every step adds to both)."""
    folder = Path(folder)
    read_marker(folder)
    path = folder / TRAINER_STATE
    try:
        meta = untrusted.read_json_object(path, TRAINER_STATE, f"{OTHER_CHECKPOINT} or with run.resume=never")
    except untrusted.UntrustedFileError as error:
        raise CheckpointError(str(error)) from None
    step = _whole(meta.get("step"), path, "step")
    named = STEP_DIR.fullmatch(folder.name)
    if named and step != int(named.group(1)):
        raise _wrong(path, "step", f"{step} is not the step of its folder {folder.name}")
    _whole(meta.get("world_size"), path, "world_size", 1, 2**31)
    for key, choices in (("format", tuple(FORMATS)), ("strategy", sum(FORMATS.values(), ()))):
        if not isinstance(meta.get(key), str) or meta[key] not in choices:
            raise _wrong(path, key, f"{meta.get(key)!r} is missing or not one of {', '.join(choices)}")
    if meta["strategy"] not in FORMATS[meta["format"]]:
        raise _wrong(path, "strategy", f"{meta['strategy']!r} does not write the {meta['format']} format")
    if not isinstance(meta.get("tokenizer_sha256", ""), str):
        raise _wrong(path, "tokenizer_sha256", "is not a string")
    loader = meta.get("loader")
    if not isinstance(loader, dict):
        raise _wrong(path, "'loader'", "is missing or not an object")
    samples = _whole(loader.get("samples_consumed"), path, "loader.samples_consumed", step)  # >= 1 a step
    for key, low, high in (("epoch", 0, samples), ("seed", 0, 2**63 - 1), ("seq_len", 1, 2**63 - 1)):
        _whole(loader.get(key), path, f"loader.{key}", low, high)  # (an epoch has at least one sample)
    tokens = _whole(meta.get("tokens_seen"), path, "tokens_seen")
    if tokens != samples * loader["seq_len"]:
        raise _wrong(
            path,
            "tokens_seen",
            f"{tokens} is not loader.samples_consumed x loader.seq_len = {samples} x {loader['seq_len']}",
        )
    _whole(meta.get("skipped_steps", 0), path, "skipped_steps", 0, step)
    loss_mean = meta.get("loss_mean")
    finite = isinstance(loss_mean, (int, float)) and not isinstance(loss_mean, bool) and 0 <= loss_mean < float("inf")
    if loss_mean is not None and not finite:
        raise _wrong(path, "loss_mean", f"{loss_mean!r} is not null or a finite loss >= 0")
    return meta


def check_resumable(folder: Path, meta: dict, config: TrainConfig, tokenizer_sha256: str) -> None:
    """trainer.json against the run that resumes from it: its engine, tokenizer, schedule and data order."""
    path = Path(folder) / TRAINER_STATE
    engine_format = "deepspeed" if config.parallel.strategy == "deepspeed" else "dcp"
    if meta["format"] != engine_format:
        raise CheckpointError(
            f"{folder}: saved by parallel.strategy {meta['strategy']!r} ({meta['format']} format), which this "
            f"run's strategy cannot read; resume with a strategy of the same engine ("
            f"{'deepspeed' if meta['format'] == 'deepspeed' else 'none, ddp, fsdp or hsdp'}), or start from its "
            f"weights: --model.init_from={folder} --run.resume=never"
        )
    if meta.get("tokenizer_sha256") != tokenizer_sha256:
        raise CheckpointError(
            f"{folder}: trained with tokenizer {str(meta.get('tokenizer_sha256'))[:12]}, but data.path's is "
            f"{tokenizer_sha256[:12]}; resume on the data it was trained on, or start a new run.out_dir"
        )
    if meta["step"] > config.run.max_steps:
        raise CheckpointError(
            f"{path}: step {meta['step']} is beyond run.max_steps {config.run.max_steps}; raise run.max_steps to "
            f"go on from it, or resume from an earlier checkpoint"
        )
    loader = meta["loader"]
    for key, ours, field in (("seq_len", config.data.seq_len, "data.seq_len"), ("seed", config.run.seed, "run.seed")):
        if loader[key] != ours:
            raise CheckpointError(
                f"{path}: loader.{key} {loader[key]} is not this run's {field} {ours}; keep {field} fixed when "
                f"resuming (or start a new run.out_dir)"
            )


# --- RNG: each rank its own file, every rank the verdict -------------------------------------------


def _load_rng(file: Path, device: torch.device) -> None:
    if not file.exists() and not file.is_symlink():
        return  # resuming on more ranks than saved: those ranks keep their seed
    untrusted.read_bytes(file, "RNG state", OTHER_CHECKPOINT, RNG_FILE_BYTES)  # a regular, small file
    try:
        rng = load_file(file)
        if set(rng) - {"cpu", "cuda"} or rng.get("cpu") is None:
            raise ValueError(f"holds {', '.join(sorted(rng))}, not a cpu (and cuda) generator state")
        torch.set_rng_state(rng["cpu"])  # checks the state's size and contents itself
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)
    except (SafetensorError, ValueError, RuntimeError, TypeError, OSError) as error:
        detail = " ".join(str(error).split())[:160]
        raise CheckpointError(f"{file}: not an RNG state ({detail})") from None


def restore_rng(folder: Path, env: Env) -> None:
    """Collective: every rank restores its own RNG file; if any rank cannot, every rank raises the same line
    (one rank alone stopping would leave the others to fail on the next collective, with a traceback)."""
    problem = None
    try:
        _load_rng(Path(folder) / f"rng_rank{env.rank}.safetensors", env.device)
    except UserError as error:
        problem = str(error).split("; ")[0]
    raise_first([p for p in gather(problem) if p])
