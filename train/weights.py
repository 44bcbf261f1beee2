"""Model weights for the tools: what export, evaluate, generate and `model.init_from` read.

A weights path is either a run checkpoint (any strategy, any world size: merged into full fp32 weights
in one process, after its digests are verified) or an exported Hugging Face folder (safetensors only).
Nothing read here can run code: DCP state goes through the weights-only reader (train/safe_dcp.py),
DeepSpeed's files through torch's weights-only unpickler, exports through safetensors, configs are JSON.
The tokenizer of a checkpoint or an export is the copy inside the folder, never a path recorded in it.

What a folder says is checked before it is used, since anyone can edit a file and recompute its digest:
config.json's fields for type and range, then the parameter names and shapes the config implies (the model
built on the meta device, which allocates nothing) against those the weights hold (DCP's metadata, the
safetensors headers), before any tensor is allocated. Only the files the loaders name are read, each a
regular file inside the folder (no symlink, no FIFO); an export's generation_config.json is not read at all.
"""

import hashlib
import logging
import math
import os
import re
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError, safe_open
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from transformers import GenerationConfig, PreTrainedTokenizerFast

from data.tokenizer import load as load_tokenizer
from groundwork.untrusted import UntrustedFileError, name_inside, read_bytes, read_json_object, regular_file
from model import GrokConfig, GrokForCausalLM

from . import safe_dcp
from .checkpoint import MARKER, MODEL_CONFIG, CheckpointError, read_meta, verify
from .config import ConfigError
from .engine_api import DCP_ERRORS, StateLoadError, dcp_cause, first_line
from .initialization import canonical_name
from .safe_dcp import DamagedFileError, UnsafeFileError

ARCHITECTURE_FIELDS = tuple(GrokConfig.__annotations__)  # what config.json may set; the rest is ignored
LARGEST_SIZE = 2**31 - 1  # any width, count or id of a model this project can build
LONGEST_CONTEXT = 2**24  # 16M positions: max_position_embeddings bounds generation, so a lie must be bounded
# What transformers' tokenizer loading reads from a folder: each must be a regular file (no link, no FIFO).
TOKENIZER_READS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
TOKENIZER_BYTES = 64 << 20  # a 256k-token BPE's tokenizer.json is ~20 MB
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
WEIGHT_DTYPES = ("F32", "BF16", "F16")
LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _not_the_cpu_notice(record: logging.LogRecord) -> bool:
    return "Setting accelerator to CPU" not in record.getMessage()


# transformers' save_pretrained unwraps the model with Accelerate, which imports DeepSpeed (when installed)
# only to test isinstance(model, DeepSpeedEngine); on a machine without a GPU that import logs "Setting
# accelerator to CPU" to stdout, as does reading a DeepSpeed checkpoint here. Only that notice is dropped.
logging.getLogger("DeepSpeed").addFilter(_not_the_cpu_notice)


def weights_kind(path: Path, option: str = "model.init_from") -> str:
    """What a weights path points at: "checkpoint" or "export" (checked before any heavy work)."""
    path = Path(path)
    if (path / MARKER).is_file():
        return "checkpoint"
    if (path / MODEL_CONFIG).is_file() and (any(path.glob("*.safetensors")) or (path / SAFETENSORS_INDEX).exists()):
        return "export"
    raise CheckpointError(
        f"{option} {path}: neither a complete checkpoint (no {MARKER}) nor an exported "
        f"Hugging Face folder (config.json + *.safetensors)"
    )


def _config_error(option: str, file: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{option} {file}: {problem}; use the config.json minicolossus wrote with these weights")


def _check_ranges(config: GrokConfig, option: str, file: Path) -> None:
    """What GrokConfig's own validation leaves open: non-finite numbers, absurd sizes, ids off the vocabulary."""
    for name in ARCHITECTURE_FIELDS:
        value = getattr(config, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise _config_error(option, file, f"{name} is {value}, not a finite number")
        if isinstance(value, int) and not isinstance(value, bool) and not -1 < value <= LARGEST_SIZE:
            raise _config_error(option, file, f"{name} is {value}, not a whole number from 0 to {LARGEST_SIZE}")
    for name in ("rope_theta", "rms_norm_eps"):
        if getattr(config, name) <= 0:
            raise _config_error(option, file, f"{name} is {getattr(config, name)}, not > 0")
    if config.max_position_embeddings > LONGEST_CONTEXT:
        raise _config_error(
            option, file, f"max_position_embeddings is {config.max_position_embeddings}, above {LONGEST_CONTEXT}"
        )


def read_model_config(path: Path, option: str) -> GrokConfig:
    """The GrokConfig of a checkpoint or export folder, from its config.json: JSON, then each architecture
    field checked for type (GrokConfig is strict) and range. Fields outside the architecture (dtype,
    auto_map, anything transformers would act upon) are ignored."""
    file = Path(path) / MODEL_CONFIG
    raw = read_json_object(file, option, "use a folder written by minicolossus")
    if raw.get("model_type") != GrokConfig.model_type:
        raise _config_error(option, file, f"model_type {raw.get('model_type')!r} is not {GrokConfig.model_type!r}")
    vocab_size = raw.get("vocab_size")
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):  # before GrokConfig warns about them
        value = raw.get(name)
        if type(value) is int and type(vocab_size) is int and not 0 <= value < vocab_size:
            raise _config_error(option, file, f"{name} is {value}, outside the vocabulary of {vocab_size}")
    try:
        config = GrokConfig.from_dict({key: raw[key] for key in ARCHITECTURE_FIELDS if key in raw})
    except Exception as error:  # rejected by GrokConfig's strict types or its own validation
        raise _config_error(option, file, f"unusable ({first_line(error)})") from error
    _check_ranges(config, option, file)
    return config


def check_shapes(config: GrokConfig, found: dict[str, tuple], option: str, path: Path, where: str) -> None:
    """The parameters the config implies are exactly those the weights hold, shape for shape. The layer
    count is compared first: building the meta model costs time per layer, so a config claiming millions
    of layers is refused before it is built."""
    file = Path(path) / MODEL_CONFIG
    layers = len({int(match.group(1)) for name in found if (match := LAYER.match(name))})
    if config.num_hidden_layers != layers:
        raise _config_error(
            option, file, f"num_hidden_layers is {config.num_hidden_layers}, but {where} hold {layers} layers"
        )
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in GrokForCausalLM(config).state_dict().items()}
    for name, shape in expected.items():
        if name not in found:
            raise _config_error(option, file, f"it implies {name} of shape {list(shape)}, which {where} do not hold")
        if found[name] != shape:
            raise _config_error(
                option, file, f"it implies {name} of shape {list(shape)}, {where} hold {list(found[name])}"
            )
    extra = sorted(set(found) - set(expected))
    if extra:
        raise _config_error(option, file, f"{where} hold {extra[0]}, which it does not describe")


def dcp_model_shapes(path: Path) -> dict[str, tuple]:
    """The model tensors a DCP checkpoint holds and their shapes, from its metadata alone."""
    try:
        saved = safe_dcp.read_metadata(path).state_dict_metadata
    except (UnsafeFileError, DamagedFileError):
        raise
    except Exception as error:  # a missing or unreadable .metadata
        raise CheckpointError(
            f"{path}: its DCP metadata is unreadable ({first_line(error)}); use another checkpoint"
        ) from None
    return {
        key.removeprefix("model."): tuple(item.size) if isinstance(item, TensorStorageMetadata) else ("not a tensor",)
        for key, item in saved.items()
        if key.startswith("model.")
    }


def export_weight_files(path: Path, option: str) -> list[Path]:
    """The safetensors files transformers loads from an export: model.safetensors, or the shards its index
    names (each a regular file of the folder). Any other *.safetensors in the folder is never read."""
    path = Path(path)
    fix = "export the checkpoint again"
    if os.path.lexists(path / SAFETENSORS_FILE):
        return [regular_file(path / SAFETENSORS_FILE, option, fix)]
    if not os.path.lexists(path / SAFETENSORS_INDEX):
        raise CheckpointError(
            f"{option} {path}: its weights cannot be loaded: neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX} "
            f"is there; {fix}"
        )
    index = read_json_object(path / SAFETENSORS_INDEX, option, fix)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise UntrustedFileError(f"{option} {path / SAFETENSORS_INDEX}: no weight_map of tensor names to files; {fix}")
    names = sorted(set(weight_map.values()), key=str)
    return [regular_file(name_inside(path, name, f"{option} {SAFETENSORS_INDEX}", fix), option, fix) for name in names]


def export_shapes(path: Path, option: str) -> dict[str, tuple]:
    """Every tensor of an export's weight files and its shape, from the safetensors headers alone."""
    found: dict[str, tuple] = {}
    for file in export_weight_files(path, option):
        try:
            with safe_open(file, "pt") as weights:
                slices = {name: weights.get_slice(name) for name in weights.keys()}  # noqa: SIM118 (not a dict)
                dtypes = {name: tensor.get_dtype() for name, tensor in slices.items()}
                found.update({name: tuple(tensor.get_shape()) for name, tensor in slices.items()})
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(
                f"{option} {file}: its weights cannot be loaded (not safetensors: {first_line(error)}); export the "
                f"checkpoint again"
            ) from None
        for name, dtype in dtypes.items():
            if dtype not in WEIGHT_DTYPES:
                raise CheckpointError(
                    f"{option} {file}: {name} is {dtype}, not one of {', '.join(WEIGHT_DTYPES)}; "
                    f"export the checkpoint again"
                )
    return found


def tokenizer_dir(path: Path) -> Path | None:
    """The folder's own tokenizer (checkpoints carry a copy since they record digests; exports too)."""
    return Path(path) if os.path.lexists(Path(path) / "tokenizer.json") else None


def check_tokenizer_files(folder: Path, option: str) -> None:
    """Each tokenizer file transformers would read from `folder` is a regular file of a tokenizer's size."""
    for name in TOKENIZER_READS:
        file = Path(folder) / name
        if os.path.lexists(file):
            regular_file(file, option, "copy the real tokenizer files into the folder")
            if file.stat().st_size > TOKENIZER_BYTES:
                raise UntrustedFileError(
                    f"{option} {file}: larger than {TOKENIZER_BYTES >> 20} MiB, not a tokenizer file; "
                    f"copy the real tokenizer files into the folder"
                )


def read_tokenizer_file(folder: Path, name: str, option: str) -> bytes:
    """A tokenizer file's bytes, from a regular file only (a link to a user's file is refused, not copied)."""
    return read_bytes(Path(folder) / name, option, "copy the real tokenizer files into the folder", TOKENIZER_BYTES)


def tokenizer_for(folder: Path, config: GrokConfig, option: str) -> PreTrainedTokenizerFast:
    """The folder's tokenizer, checked to fit the model: every id it makes must be a row of the embedding."""
    check_tokenizer_files(folder, option)
    tokenizer = load_tokenizer(folder)
    if len(tokenizer) > config.vocab_size:
        raise CheckpointError(
            f"{option} {Path(folder) / 'tokenizer.json'}: a {len(tokenizer)}-token vocabulary, larger than the "
            f"model's vocab_size {config.vocab_size}; use the tokenizer the model was trained with"
        )
    return tokenizer


def tokenizer_hash(path: Path, option: str) -> str:
    """sha256 of the tokenizer a checkpoint or export was trained with (what data must match)."""
    if tokenizer_dir(path) is None:
        raise CheckpointError(
            f"{option} {path}: has no tokenizer.json, so the data's tokenizer cannot be checked "
            f"against it; export it again from a checkpoint that has one"
        )
    return hashlib.sha256(read_tokenizer_file(path, "tokenizer.json", option)).hexdigest()


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
            weights = consolidated_weights(path)  # sized by DeepSpeed's own files, not by config.json
        except StateLoadError as error:
            raise CheckpointError(f"{option} {path}: {error}") from error
        check_shapes(config, {k: tuple(v.shape) for k, v in weights.items()}, option, path, "its DeepSpeed files")
        return config, weights
    check_shapes(config, dcp_model_shapes(path), option, path, "its DCP files")
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
    placement when asked (device_map="auto", max_memory, offload_folder). Its config is checked against the
    safetensors headers first; its generation settings come from the config, never from the folder."""
    config = read_model_config(path, option)
    check_shapes(config, export_shapes(path, option), option, path, "its safetensors files")
    transformers.utils.logging.disable_progress_bar()  # a tool prints its result, or one line of error
    try:
        return GrokForCausalLM.from_pretrained(
            path,
            config=config,
            dtype=dtype,
            use_safetensors=True,
            generation_config=GenerationConfig.from_model_config(config),
            **placement,
        )
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


def load_initial_weights(model: GrokForCausalLM, path: str, whole: bool = True) -> None:
    """model.init_from's weights into a model that may be split over ranks (each keeps its slices); not `whole`:
    a pipeline stage of it, which takes its own parameters' weights."""
    state = initial_weights(Path(path))
    if not whole:
        names = {canonical_name(key) for key in model.state_dict()}
        state = {key: value for key, value in state.items() if key in names}
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
