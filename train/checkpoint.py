"""Sharded, atomic, resumable checkpoints with torch.distributed.checkpoint (DCP).

Layout of one checkpoint, `{dir}/step_00000100/`:
  DCP files       model and optimizer state, each rank writing its own shards (any world size can load them)
  trainer.json    step, loader state, world size and strategy (written by rank 0)
  rng_rank{r}.safetensors   each rank's RNG state
  COMPLETE        the marker, written last
Everything is written to `step_00000100.tmp/` and renamed when complete, so a crash mid-save never leaves
a folder that looks like a checkpoint; leftovers are removed at the next start. Nothing is unpickled.
"""

import json
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .parallel import Env, barrier

# DCP warns when saving without a process group; one process is a supported case here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

MARKER = "COMPLETE"
STEP_DIR = re.compile(r"step_(\d{8})")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the folder and what to do."""


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.fullmatch(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)))


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def remove_partial(root: Path) -> None:
    """Drop what an interrupted save left behind (rank 0, at start-up)."""
    root = Path(root)
    if root.is_dir():
        for path in root.iterdir():
            if path.name.endswith(".tmp") or (STEP_DIR.fullmatch(path.name) and not (path / MARKER).exists()):
                shutil.rmtree(path, ignore_errors=True)


def _rng_state(env: Env) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if env.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(env.device)
    return state


def save(root: Path, step: int, model, optimizer, trainer_state: dict, env: Env, keep: int, strategy: str) -> Path:
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
    save_file(_rng_state(env), tmp / f"rng_rank{env.rank}.safetensors")
    barrier()
    if env.is_main:
        meta = {"step": step, "world_size": env.world_size, "strategy": strategy, **trainer_state}
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=2))
        (tmp / MARKER).write_text(str(step))
        if final.exists():  # a checkpoint of this step from an earlier attempt
            shutil.rmtree(final)
        tmp.rename(final)
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load(path: Path, model, optimizer, env: Env) -> dict:
    """Restores model and optimizer in place (resharding as needed); returns trainer.json's contents."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {MARKER} marker); pass run.resume=auto to "
                              f"use the latest complete one, or run.resume=never")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    try:
        dcp.load(state, checkpoint_id=path)
    except Exception as error:  # DCP reports shape/key mismatches as long multi-rank traces
        first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise CheckpointError(f"{path}: cannot be loaded into this model/optimizer ({first.strip()[:300]}); "
                              f"resume with the config it was saved with, or run.resume=never") from error
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / f"rng_rank{env.rank}.safetensors"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: those ranks keep their seed
        rng = load_file(rng_file)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and env.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], env.device)
    return json.loads((path / "trainer.json").read_text())
