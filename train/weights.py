"""Model weights for the tools: what export, evaluate, generate and `model.init_from` read.

A weights path is either a run checkpoint (any strategy, any world size: merged into full fp32 weights
in one process, after its digests are verified) or an exported Hugging Face folder (safetensors only).
Nothing read here can run code: DCP state goes through the weights-only reader (train/safe_dcp.py),
DeepSpeed's files through torch's weights-only unpickler, exports through safetensors, configs are JSON.
The tokenizer of a checkpoint or an export is the copy inside the folder, never a path recorded in it.
"""

import json
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from data.tokenizer import tokenizer_sha256
from model import GrokConfig, GrokForCausalLM

from . import safe_dcp
from .checkpoint import MARKER, MODEL_CONFIG, CheckpointError, read_meta, verify
from .config import ConfigError
from .engine_api import DCP_ERRORS, StateLoadError, dcp_cause, first_line
from .safe_dcp import DamagedFileError, UnsafeFileError


def weights_kind(path: Path, option: str = "model.init_from") -> str:
    """What a weights path points at: "checkpoint" or "export" (checked before any heavy work)."""
    path = Path(path)
    if (path / MARKER).is_file():
        return "checkpoint"
    if (path / MODEL_CONFIG).is_file() and any(path.glob("*.safetensors")):
        return "export"
    raise CheckpointError(
        f"{option} {path}: neither a complete checkpoint (no {MARKER}) nor an exported "
        f"Hugging Face folder (config.json + *.safetensors)"
    )


def read_model_config(path: Path, option: str) -> GrokConfig:
    """The GrokConfig of a checkpoint or export folder, from its config.json (JSON; checked by GrokConfig)."""
    file = Path(path) / MODEL_CONFIG
    try:
        raw = json.loads(file.read_text())
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        if raw.get("model_type") != GrokConfig.model_type:
            raise ValueError(f"model_type {raw.get('model_type')!r} is not {GrokConfig.model_type!r}")
        return GrokConfig.from_dict({k: v for k, v in raw.items() if k not in ("auto_map", "architectures")})
    except Exception as error:  # unreadable, not JSON, or rejected by GrokConfig's own validation
        raise CheckpointError(
            f"{option} {path}: {file.name} is unusable ({first_line(error)}); use a folder written by minicolossus"
        ) from error


def tokenizer_dir(path: Path) -> Path | None:
    """The folder's own tokenizer (checkpoints carry a copy since they record digests; exports too)."""
    return Path(path) if (Path(path) / "tokenizer.json").is_file() else None


def tokenizer_hash(path: Path, option: str) -> str:
    """sha256 of the tokenizer a checkpoint or export was trained with (what data must match)."""
    if tokenizer_dir(path) is None:
        raise CheckpointError(
            f"{option} {path}: has no tokenizer.json, so the data's tokenizer cannot be checked "
            f"against it; export it again from a checkpoint that has one"
        )
    return tokenizer_sha256(path)


def load_model_weights(path: Path, option: str = "CHECKPOINT") -> tuple[GrokConfig, dict[str, torch.Tensor]]:
    """The model config and full (unsharded) fp32 weights of a checkpoint, read in one process."""
    path = Path(path)
    meta = read_meta(path)
    verify(path)
    config = read_model_config(path, option)
    if meta["format"] == "deepspeed":
        try:
            from .deepspeed_engine import consolidated_weights
        except ImportError:
            raise CheckpointError(
                f"{option} {path}: a DeepSpeed checkpoint, and DeepSpeed is not installed: "
                f"pip install -e '.[deepspeed]'"
            ) from None
        try:
            return config, consolidated_weights(path)
        except StateLoadError as error:
            raise CheckpointError(f"{option} {path}: {error}") from error
    with torch.device("meta"):
        skeleton = GrokForCausalLM(config).state_dict()
    state = {key: torch.empty(t.shape, dtype=torch.float32) for key, t in skeleton.items()}
    try:
        safe_dcp.load({"model": state}, path)
    except (UnsafeFileError, DamagedFileError) as error:
        raise CheckpointError(str(error)) from None
    except DCP_ERRORS as error:
        if isinstance(dcp_cause(error), (UnsafeFileError, DamagedFileError)):
            raise CheckpointError(str(dcp_cause(error))) from None
        raise CheckpointError(
            f"{option} {path}: model state unreadable ({first_line(error)}); use a checkpoint "
            f"this project wrote, of this model"
        ) from error
    return config, state


def load_export(path: Path, option: str, dtype: torch.dtype = torch.float32, **placement: object) -> GrokForCausalLM:
    """An exported folder through transformers, safetensors only (never a pickle), with Accelerate's
    placement when asked (device_map="auto", max_memory, offload_folder)."""
    config = read_model_config(path, option)
    transformers.utils.logging.disable_progress_bar()  # a tool prints its result, or one line of error
    try:
        return GrokForCausalLM.from_pretrained(path, config=config, dtype=dtype, use_safetensors=True, **placement)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as error:
        raise CheckpointError(
            f"{option} {path}: its weights cannot be loaded ({first_line(error)}); export the checkpoint again"
        ) from error


def initial_weights(path: Path) -> dict[str, torch.Tensor]:
    """Weights to start a run from (model.init_from): a checkpoint folder, or an exported HF folder."""
    if weights_kind(path) == "checkpoint":
        return load_model_weights(path, "model.init_from")[1]
    return load_export(path, "model.init_from").state_dict()


def load_for_inference(path: Path, option: str, dtype: torch.dtype = torch.float32, **placement: object):
    """(model in eval mode, folder of its tokenizer or None) from a checkpoint or an exported folder. An
    export can be spread by Accelerate over devices, the CPU and disk; a checkpoint loads whole."""
    path = Path(path)
    if weights_kind(path, option) == "export":
        return load_export(path, option, dtype, **placement).eval(), tokenizer_dir(path)
    if placement.get("max_memory"):
        raise CheckpointError(
            f"{option} {path}: a memory budget (--max-memory) places an exported model; "
            f"export this checkpoint with scripts/export_hf.py and use the export"
        )
    config, weights = load_model_weights(path, option)
    with torch.device("meta"):
        model = GrokForCausalLM(config)
    model.load_state_dict(weights, strict=True, assign=True)
    return model.to(dtype).eval(), tokenizer_dir(path)


def load_initial_weights(model: GrokForCausalLM, path: str) -> None:
    """model.init_from's weights into a model that may be split over ranks (each keeps its slices)."""
    state = initial_weights(Path(path))
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    theirs = {key: tuple(value.shape) for key, value in state.items()}
    differences = [
        f"{key} {theirs.get(key, 'missing')} vs model {shape}"
        for key, shape in ours.items()
        if theirs.get(key) != shape
    ] + [f"{key} not in this model" for key in theirs if key not in ours]
    if differences:
        raise ConfigError(
            f"model.init_from {path}: its weights do not fit this model ({'; '.join(differences[:3])}); "
            f"use the model preset and overrides it was trained with"
        )
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))
