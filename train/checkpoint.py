"""Sharded, atomic, resumable checkpoints: torch.distributed.checkpoint (DCP), or DeepSpeed's ZeRO files.

Layout of one checkpoint, `{dir}/step_00000100/`:
  DCP files       model and optimizer state, each rank writing its own shards (any world size can load them),
                  or deepspeed/ with DeepSpeed's ZeRO files (parallel.strategy = "deepspeed")
  trainer.json    step, loader state, world size, strategy and state format (written by rank 0)
  config.json     the model's GrokConfig, so export needs nothing but this folder
  rng_rank{r}.safetensors   each rank's RNG state
  COMPLETE        the marker, written last
Everything is written to `step_00000100.tmp/` and renamed when complete, so a crash mid-save never leaves
a folder that looks like a checkpoint; leftovers are removed at the next start. Our files are JSON and
safetensors and DCP unpickles nothing; only DeepSpeed's own files are torch pickles, read by DeepSpeed.
"""

import json
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from model import GrokConfig, GrokForCausalLM

from .engine import DCP_ERRORS, StateLoadError, first_line
from .parallel import Env, barrier

# DCP warns when saving without a process group; one process is a supported case here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

MARKER = "COMPLETE"
MODEL_CONFIG = "config.json"
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


def save(root: Path, step: int, engine, trainer_state: dict, model_config, env: Env, keep: int,
         strategy: str, after_state=lambda: None) -> Path:
    """Collective: every rank writes its shards, rank 0 completes and renames. `after_state` runs between
    the shards and the marker (where the fault tests kill a rank)."""
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    try:
        engine.save_state(tmp)
        save_file(_rng_state(env), tmp / f"rng_rank{env.rank}.safetensors")
    except DCP_ERRORS as error:  # DCP gathers every rank's write errors, so all ranks raise here together
        free_mib = shutil.disk_usage(tmp).free / 2**20  # measured before the partial files are removed
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(root)
        raise CheckpointError(
            f"{root}: writing the step-{step} checkpoint failed ({first_line(error)}) with {free_mib:.1f} MiB left on "
            f"that filesystem; the previous checkpoint ({previous.name if previous else 'none'}) is intact. Free "
            f"space, lower checkpoint.keep, or set checkpoint.dir elsewhere") from error
    after_state()
    barrier()
    if env.is_main:
        meta = {"step": step, "world_size": env.world_size, "strategy": strategy,
                "format": engine.checkpoint_format, **trainer_state}
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=2))
        model_config.to_json_file(tmp / MODEL_CONFIG)  # what export needs to rebuild the model
        (tmp / MARKER).write_text(str(step))
        if final.exists():  # a checkpoint of this step from an earlier attempt
            shutil.rmtree(final)
        tmp.rename(final)
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def read_meta(path: Path) -> dict:
    path = Path(path)
    if not (path / MARKER).is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {MARKER} marker); pass run.resume=auto to "
                              f"use the latest complete one, or run.resume=never")
    try:
        meta = json.loads((path / "trainer.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}/trainer.json: unreadable ({error}); resume from another checkpoint "
                              f"or with run.resume=never") from error
    meta.setdefault("format", "dcp")
    return meta


def load(path: Path, engine, env: Env) -> dict:
    """Restores model and optimizer in place (resharding as the engine allows); returns trainer.json."""
    path = Path(path)
    meta = read_meta(path)
    if meta["format"] != engine.checkpoint_format:
        raise CheckpointError(
            f"{path}: saved by parallel.strategy {meta['strategy']!r} ({meta['format']} format), which this run's "
            f"strategy cannot read; resume with a strategy of the same engine ("
            f"{'deepspeed' if meta['format'] == 'deepspeed' else 'none, ddp, fsdp or hsdp'}), or start from its "
            f"weights: --model.init_from={path} --run.resume=never")
    try:
        engine.load_state(path)
    except StateLoadError as error:
        raise CheckpointError(f"{path}: {error}") from error
    rng_file = path / f"rng_rank{env.rank}.safetensors"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: those ranks keep their seed
        rng = load_file(rng_file)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and env.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], env.device)
    return meta


def load_model_weights(path: Path) -> tuple[GrokConfig, dict[str, torch.Tensor]]:
    """The model config and full (unsharded) fp32 weights of any checkpoint, DCP or DeepSpeed, written at
    any world size; read in one process, for export and evaluation."""
    path = Path(path)
    meta = read_meta(path)
    if not (path / MODEL_CONFIG).is_file():
        raise CheckpointError(f"{path}: no {MODEL_CONFIG} (written by minicolossus >= 0.1 checkpoints); "
                              f"re-save it by resuming and finishing one step")
    config = GrokConfig.from_json_file(path / MODEL_CONFIG)
    if meta["format"] == "deepspeed":
        from .deepspeed_engine import consolidated_weights
        return config, consolidated_weights(path)
    with torch.device("meta"):
        skeleton = GrokForCausalLM(config).state_dict()
    state = {key: torch.empty(t.shape, dtype=torch.float32) for key, t in skeleton.items()}
    try:
        dcp.load({"model": state}, checkpoint_id=path)
    except DCP_ERRORS as error:
        raise CheckpointError(f"{path}: model state unreadable ({first_line(error)})") from error
    return config, state


def weights_kind(path: Path, option: str = "model.init_from") -> str:
    """What a weights path points at: "checkpoint" or "export" (checked before any heavy work)."""
    path = Path(path)
    if (path / MARKER).is_file():
        return "checkpoint"
    if (path / MODEL_CONFIG).is_file() and any(path.glob("*.safetensors")):
        return "export"
    raise CheckpointError(f"{option} {path}: neither a complete checkpoint (no {MARKER}) nor an exported "
                          f"Hugging Face folder (config.json + *.safetensors)")


def initial_weights(path: Path) -> dict[str, torch.Tensor]:
    """Weights to start a run from (model.init_from): a checkpoint folder, or an exported HF folder."""
    if weights_kind(path) == "checkpoint":
        return load_model_weights(path)[1]
    return GrokForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def tokenizer_dir(checkpoint: Path) -> Path | None:
    """The prepared data folder (with tokenizer.json) that the run of this checkpoint trained on."""
    data_path = json.loads((Path(checkpoint) / "trainer.json").read_text()).get("data_path")
    return Path(data_path) if data_path else None


def load_for_inference(path: Path, option: str, dtype=torch.float32, **placement):
    """(model in eval mode, folder of its tokenizer) from a checkpoint or an exported folder. An export
    loads through transformers, so Accelerate's placement (device_map="auto", max_memory, offload_folder)
    spreads one larger than a device over several, the CPU and disk; a checkpoint loads whole."""
    path = Path(path)
    if weights_kind(path, option) == "export":
        return GrokForCausalLM.from_pretrained(path, dtype=dtype, **placement).eval(), path
    if placement.get("max_memory"):
        raise CheckpointError(f"{option} {path}: a memory budget (--max-memory) places an exported model; "
                              f"export this checkpoint with scripts/export_hf.py and use the export")
    config, weights = load_model_weights(path)
    with torch.device("meta"):
        model = GrokForCausalLM(config)
    model.load_state_dict(weights, strict=True, assign=True)
    return model.to(dtype).eval(), tokenizer_dir(path)
