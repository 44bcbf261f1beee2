"""Run checkpoints: save (synchronously or in the background), load, latest, prune.

Layout of one checkpoint, `{checkpoint.dir}/step_00000100/`:
  DCP files        model and optimizer state, each rank writing its own shards (any world size can load
                   them), or deepspeed/ with DeepSpeed's ZeRO files (parallel.strategy = "deepspeed")
  trainer.json     the trainer's resumable state (step, loader, guards) and how it was saved
  config.json      the model's GrokConfig, so export needs nothing but this folder
  tokenizer.json   (and its configs) copied from the prepared data at save time: the tools read the
                   tokenizer from here, never from a path recorded in the checkpoint
  rng_rank{r}.safetensors   each rank's RNG state
  COMPLETE         written last: the step and an xxh3-128 digest of every other file
A checkpoint is written to a marked `step_N.tmp/` and renamed when COMPLETE is in, so a crash mid-save
never leaves a folder that looks like a checkpoint; loading verifies every digest first. Only folders
marked as checkpoints are pruned or cleaned up, and only inside a folder marked as a checkpoint folder.
"""

import json
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from groundwork import folders
from groundwork.errors import UserError
from groundwork.hashing import hash_file
from model import GrokConfig

from .engine_api import DCP_ERRORS, Engine, StateLoadError, first_line
from .parallel import Env, barrier

# DCP warns when it runs without a process group; one process is a supported case here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

MARKER = "COMPLETE"
MODEL_CONFIG = "config.json"
TRAINER_STATE = "trainer.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
STEP_DIR = re.compile(r"step_(\d{8})")
HASH = "xxh3_128"  # ~18 GB/s on one core here: verifying a checkpoint costs far less than reading it
META_KEYS = {"step": int, "tokens_seen": int, "world_size": int, "strategy": str, "format": str, "loader": dict}


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used; the message names the folder or file and what to do."""


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """The finished checkpoints in a checkpoint folder, oldest first (only folders this project made)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if STEP_DIR.fullmatch(p.name) and (p / MARKER).is_file() and folders.kind_of(p) == "checkpoint"
    ]
    return sorted(found, key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)))


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def check_root(root: Path, resume: str, create: bool) -> None:
    """checkpoint.dir must be ours (or new); `run.resume = "never"` must not write over a finished run."""
    folders.claim(root, "checkpoints", "checkpoint.dir", create=create)
    found = complete_checkpoints(root)
    if resume == "never" and found:
        raise CheckpointError(
            f"checkpoint.dir {root}: holds checkpoints up to {found[-1].name} and run.resume is "
            f"'never'; choose another run.out_dir (or checkpoint.dir) for a new run, or resume it "
            f"with run.resume=auto"
        )


def remove_partial(root: Path) -> None:
    """Drop what an interrupted save left behind (rank 0, at start-up): `step_N.tmp/`, a `step_N/` without
    COMPLETE, or a replaced checkpoint moved aside; each only if marked as a checkpoint of this project."""
    root = Path(root)
    for path in root.iterdir() if root.is_dir() else ():
        moved_aside = path.name.startswith(".step_")
        unfinished = STEP_DIR.fullmatch(path.name.removesuffix(".tmp")) and (
            path.name.endswith(".tmp") or not (path / MARKER).is_file()
        )
        if (moved_aside or unfinished) and folders.kind_of(path) == "checkpoint":
            shutil.rmtree(path, ignore_errors=True)


def file_digest(path: Path) -> str:
    return hash_file(path, xxhash.xxh3_128())


def _gather(local: object):
    """Every rank's `local` (plain in-memory objects of our own processes), or [local] in one process."""
    if not dist.is_initialized():
        return [local]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return gathered


def _digests(folder: Path, env: Env) -> dict[str, str]:
    """Collective: digest of every file of the folder; each rank hashes its share of the files."""
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MARKER)
    mine = {name: file_digest(folder / name) for name in names[env.rank :: env.world_size]}
    return {name: digest for part in _gather(mine) for name, digest in part.items()}


def verify(folder: Path, env: Env | None = None) -> None:
    """Every file that COMPLETE lists has its recorded digest (collective when env is given)."""
    folder = Path(folder)
    recorded = read_marker(folder)["files"]
    rank, world = (env.rank, env.world_size) if env is not None else (0, 1)
    problems = []
    for name in sorted(recorded)[rank::world]:
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif file_digest(path) != recorded[name]:
            problems.append(f"{path}: contents differ from the digest in {MARKER} (damaged or edited)")
    problems = [p for part in (_gather(problems) if env is not None else [problems]) for p in part]
    if problems:
        raise CheckpointError(
            f"{problems[0]}; resume from another checkpoint, or start over with another "
            f"run.out_dir" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
        )


def read_marker(folder: Path) -> dict:
    path = Path(folder) / MARKER
    if not path.is_file():
        raise CheckpointError(
            f"{folder}: not a complete checkpoint (no {MARKER} marker); pass run.resume=auto to "
            f"use the latest complete one, or run.resume=never"
        )
    try:
        marker = json.loads(path.read_text())
        assert isinstance(marker, dict) and marker.get("hash") == HASH and isinstance(marker.get("files"), dict)
    except (OSError, ValueError, AssertionError):
        raise CheckpointError(
            f"{path}: no file digests in it (damaged, or written before checkpoints recorded "
            f"them), so the checkpoint cannot be verified; use another checkpoint"
        ) from None
    return marker


def read_meta(folder: Path) -> dict:
    """trainer.json of a complete checkpoint, its keys checked."""
    folder = Path(folder)
    read_marker(folder)
    path = folder / TRAINER_STATE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"{path}: unreadable ({error}); resume from another checkpoint or with run.resume=never"
        ) from error
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: not a JSON object; resume from another checkpoint")
    for key, kind in META_KEYS.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise CheckpointError(
                f"{path}: key {key!r} is missing or not a {kind.__name__}; resume from another checkpoint"
            )
    return meta


def _rng_state(env: Env) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if env.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(env.device)
    return state


class Checkpointer:
    """This run's checkpoints, built once with everything a checkpoint holds: the engine's model and
    optimizer state, the trainer's resumable state (`trainer_state()`, read at save time), the model's
    config and the tokenizer files. It owns its cadence (`due`). With `async_save`, `save` returns as soon
    as the shards are staged in memory; the files are written in the background and the checkpoint is
    completed (digests, COMPLETE, rename, prune) by `wait`, which the loop calls once every rank's write is
    done, and which the next save and the end of the run wait for."""

    def __init__(
        self,
        root: Path,
        env: Env,
        engine: Engine,
        *,
        every: int,
        keep: int,
        async_save: bool,
        model_config: GrokConfig,
        tokenizer_folder: Path,
        tokenizer_sha256: str,
        trainer_state: Callable[[], dict],
        shards_written: Callable[[int], None] = lambda step: None,
    ):
        self.root, self.env, self.engine = Path(root), env, engine
        self.every, self.keep, self.async_save = every, keep, async_save
        self.model_config, self.tokenizer_folder = model_config, Path(tokenizer_folder)
        self.tokenizer_sha256, self.trainer_state = tokenizer_sha256, trainer_state
        self.shards_written = shards_written  # between the shards and the marker: where fault tests kill a rank
        # DCP's background writer needs its own group: the training collectives keep the default one busy.
        self.async_group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None
        self.pending = None  # (step, tmp folder, future) of a background save

    def due(self, step: int, last: bool, preempted: bool) -> bool:
        """Every `checkpoint.every` steps (0: never on a schedule), at the last step and when preempted."""
        return bool(self.every and step % self.every == 0) or last or preempted

    def save(self, step: int) -> Path:
        """Collective: write the step-`step` checkpoint (in the background with async_save)."""
        self.wait()
        final = step_dir(self.root, step)
        tmp = final.with_name(final.name + ".tmp")
        if self.env.is_main:
            self._write_small_files(tmp, final, step)
        barrier()
        save_file(_rng_state(self.env), tmp / f"rng_rank{self.env.rank}.safetensors")
        if self.async_save:
            self.pending = (step, tmp, self._guard(step, lambda: self.engine.save_state_async(tmp, self.async_group)))
            return final
        self._guard(step, lambda: self.engine.save_state(tmp))
        self.shards_written(step)
        return self._complete(step, tmp)

    def _write_small_files(self, tmp: Path, final: Path, step: int) -> None:
        """Rank 0: the marked temporary folder, trainer.json, the model config and the tokenizer files."""
        folders.begin(final, "checkpoint", tmp_name=tmp.name)
        meta = {"step": step, "world_size": self.env.world_size, "format": self.engine.checkpoint_format}
        (tmp / TRAINER_STATE).write_text(json.dumps({**meta, **self.trainer_state()}, indent=2))
        self.model_config.to_json_file(tmp / MODEL_CONFIG)
        for name in TOKENIZER_FILES:
            if (self.tokenizer_folder / name).is_file():
                shutil.copy(self.tokenizer_folder / name, tmp / name)

    def resume(self, choice: str) -> tuple[Path, dict] | None:
        """Collective, at start-up: clear what an interrupted save left, then load the checkpoint that
        `run.resume` names ("auto": the latest complete one; "never": none). Returns (folder, trainer.json)."""
        if self.env.is_main:
            remove_partial(self.root)
        barrier()
        if choice == "never":
            return None
        path = latest_checkpoint(self.root) if choice == "auto" else Path(choice)
        return (path, self.load(path)) if path is not None else None

    def local_done(self) -> float:
        """1.0 when this rank's background write has finished (what the loop's per-step all-reduce sums)."""
        return float(self.pending is not None and self.pending[2].done())

    def wait(self) -> Path | None:
        """Complete a background save (collective; every rank calls it at the same point)."""
        if self.pending is None:
            return None
        step, tmp, future = self.pending
        self.pending = None
        self._guard(step, future.result)
        self.shards_written(step)
        return self._complete(step, tmp)

    def _guard(self, step: int, write: Callable[[], object]):
        try:
            return write()
        except DCP_ERRORS as error:  # DCP gathers every rank's write errors, so all ranks raise here together
            tmp = step_dir(self.root, step).with_name(f"step_{step:08d}.tmp")
            free_mib = shutil.disk_usage(self.root).free / 2**20  # measured before the partial files are removed
            if self.env.is_main and folders.kind_of(tmp) == "checkpoint":
                shutil.rmtree(tmp, ignore_errors=True)
            previous = latest_checkpoint(self.root)
            raise CheckpointError(
                f"{self.root}: writing the step-{step} checkpoint failed ({first_line(error)}) with {free_mib:.1f} MiB "
                f"left on that filesystem; the previous checkpoint ({previous.name if previous else 'none'}) is "
                f"intact. Free space, lower checkpoint.keep, or set checkpoint.dir elsewhere"
            ) from error

    def _complete(self, step: int, tmp: Path) -> Path:
        barrier()
        digests = _digests(tmp, self.env)
        final = step_dir(self.root, step)
        if self.env.is_main:
            folders.write_durably(tmp / MARKER, json.dumps({"step": step, "hash": HASH, "files": digests}, indent=1))
            folders.commit(tmp, final, "checkpoint")  # an earlier attempt's checkpoint of this step is replaced
            for old in complete_checkpoints(self.root)[: -self.keep]:
                folders.remove(old, "checkpoint")
        barrier()
        return final

    def load(self, path: Path) -> dict:
        """Verify, then restore model and optimizer in place (resharding as the engine allows) and this
        rank's RNG; returns trainer.json for the trainer's own state."""
        path = Path(path)
        meta = read_meta(path)
        if meta["format"] != self.engine.checkpoint_format:
            raise CheckpointError(
                f"{path}: saved by parallel.strategy {meta['strategy']!r} ({meta['format']} format), which this "
                f"run's strategy cannot read; resume with a strategy of the same engine ("
                f"{'deepspeed' if meta['format'] == 'deepspeed' else 'none, ddp, fsdp or hsdp'}), or start from its "
                f"weights: --model.init_from={path} --run.resume=never"
            )
        if meta.get("tokenizer_sha256") != self.tokenizer_sha256:
            raise CheckpointError(
                f"{path}: trained with tokenizer {str(meta.get('tokenizer_sha256'))[:12]}, but data.path's is "
                f"{self.tokenizer_sha256[:12]}; resume on the data it was trained on, or start a new run.out_dir"
            )
        verify(path, self.env)
        try:
            self.engine.load_state(path)
        except StateLoadError as error:
            raise CheckpointError(f"{path}: {error}") from error
        rng_file = path / f"rng_rank{self.env.rank}.safetensors"
        if rng_file.is_file():  # absent when resuming on more ranks than saved: those ranks keep their seed
            try:
                rng = load_file(rng_file)
                torch.set_rng_state(rng["cpu"])
                if "cuda" in rng and self.env.device.type == "cuda":
                    torch.cuda.set_rng_state(rng["cuda"], self.env.device)
            except (SafetensorError, KeyError, RuntimeError, TypeError) as error:
                raise CheckpointError(
                    f"{rng_file}: not an RNG state ({first_line(error)}); resume from another checkpoint"
                ) from error
        return meta
