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
marked as checkpoints are pruned or cleaned up, only inside a folder marked as a checkpoint folder, and never
through a symlink (one where the run writes is refused at start-up). Reading a checkpoint back (COMPLETE,
trainer.json, RNG), which anyone may have edited, is train/checkpoint_files.py.
"""

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from groundwork import folders, untrusted
from model import GrokConfig

from .checkpoint_files import (
    HASH,
    MARKER,
    MODEL_CONFIG,
    STEP_DIR,
    TRAINER_STATE,
    CheckpointError,
    file_digest,
    gather,
    read_meta,
    restore_rng,
    verify,
)
from .engine_api import DCP_ERRORS, Engine, StateLoadError, first_line
from .parallel import Env, barrier

# DCP warns when it runs without a process group; one process is a supported case here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TOKENIZER_BYTES = 1 << 30  # the largest tokenizer.json files are tens of MB


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
        if STEP_DIR.fullmatch(p.name)
        and not p.is_symlink()  # a link to a checkpoint is not ours: never resumed from, pruned or followed
        and (p / MARKER).is_file()
        and folders.kind_of(p) == "checkpoint"
    ]
    return sorted(found, key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)))


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def ours_by_name(name: str) -> bool:
    """A name the run writes in its checkpoint folder: step_N, step_N.tmp, .step_N.* (moved aside, staging)."""
    return bool(STEP_DIR.fullmatch(name.removesuffix(".tmp"))) or name.startswith(".step_")


def check_root(root: Path, resume: str, create: bool) -> None:
    """checkpoint.dir must be ours (or new) with no symlink where checkpoints are written; `run.resume =
    "never"` must not write over a finished run."""
    folders.claim(root, "checkpoints", "checkpoint.dir", create=create)
    for path in sorted(root.iterdir()) if root.is_dir() else ():
        if path.is_symlink() and (ours_by_name(path.name) or path.name == folders.LOCK):
            raise CheckpointError(
                f"checkpoint.dir {root}: {path.name} is a symlink where the run writes its own files (nothing is "
                f"written, resumed or deleted through a link); remove the link, and resume from a checkpoint "
                f"elsewhere with run.resume=PATH"
            )
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
        if (moved_aside or unfinished) and not path.is_symlink() and folders.kind_of(path) == "checkpoint":
            shutil.rmtree(path, ignore_errors=True)


def prune(root: Path, keep: int) -> None:
    """Remove all but the newest `keep` complete checkpoints (rank 0, after a save). Only marked folders, never
    through a link; one that cannot be removed is kept and named on the console: the step's save succeeded."""
    for old in complete_checkpoints(root)[:-keep]:
        try:
            folders.remove(old, "checkpoint")
        except (folders.FolderError, OSError) as error:
            print(f"warning: kept {old} ({' '.join(str(error).split())[:200]})", flush=True)


def _digests(folder: Path, env: Env) -> dict[str, str]:
    """Collective: digest of every file of the folder; each rank hashes its share of the files."""
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MARKER)
    mine = {name: file_digest(folder / name) for name in names[env.rank :: env.world_size]}
    return {name: digest for part in gather(mine) for name, digest in part.items()}


def _rng_state(env: Env) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if env.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(env.device)
    return state


class Checkpointer:
    """This run's checkpoints, built once with everything a checkpoint holds: the engine's model and
    optimizer state, the trainer's resumable state (`trainer_state()`, read at save time), the model's
    config and the tokenizer files; `check_state(folder, trainer.json)` says whether this run can resume from
    a checkpoint (raising CheckpointError if not), before its files are hashed or loaded. It owns its cadence (`due`). With `async_save`, `save` returns as soon
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
        trainer_state: Callable[[], dict],
        check_state: Callable[[Path, dict], None],
        shards_written: Callable[[int], None] = lambda step: None,
    ):
        self.root, self.env, self.engine = Path(root), env, engine
        self.every, self.keep, self.async_save = every, keep, async_save
        self.model_config, self.tokenizer_folder = model_config, Path(tokenizer_folder)
        self.trainer_state, self.check_state = trainer_state, check_state
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
        for name in TOKENIZER_FILES:  # read as files, never through a link: a link could ship any file
            source = self.tokenizer_folder / name
            if source.exists() or source.is_symlink():
                fix = "prepare the data again (data.prepare writes the tokenizer files itself)"
                (tmp / name).write_bytes(untrusted.read_bytes(source, "tokenizer file", fix, TOKENIZER_BYTES))

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
            prune(self.root, self.keep)
        barrier()
        return final

    def load(self, path: Path) -> dict:
        """Verify, then restore model and optimizer in place (resharding as the engine allows) and every rank's
        RNG; returns trainer.json for the trainer's own state. Every check gives every rank the same verdict."""
        path = Path(path)
        meta = read_meta(path)
        self.check_state(path, meta)
        verify(path, self.env)
        try:
            self.engine.load_state(path)
        except StateLoadError as error:
            raise CheckpointError(f"{path}: {error}") from error
        restore_rng(path, self.env)
        return meta
