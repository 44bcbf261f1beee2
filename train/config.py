"""The training config: one TOML file, validated by a pydantic schema, the same at every scale.

    python -m train --config configs/tiny.toml --run.max_steps=100 --parallel.strategy=fsdp

Every error is one line naming the key (`ConfigError`), raised before any process group starts.
The batch is fixed globally (sequences or tokens) plus a micro batch per device; gradient
accumulation is derived from the data-parallel world size, so the optimisation is the same math on
1 CPU process or 1,000 GPUs.
"""

import os
import stat
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from groundwork.errors import UserError
from model import GrokConfig
from model.presets import PRESETS


class ConfigError(UserError, ValueError):
    """A config problem; the message is one line naming the key and what to do."""


CONFIG_FILE_BYTES = 1 << 20  # a config is a few hundred bytes
MAX_STEPS = 10**9  # more steps than any run makes (a year at 30 ms a step)


class Section(BaseModel):
    # strict: `true` is not a step count and "3" is not a learning rate; no NaN or infinity anywhere.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class ModelSection(Section):
    preset: str = "tiny"
    # GrokConfig fields to override, e.g. {attn_backend = "sdpa", attn_logit_softcap = 0}.
    # vocab_size defaults to the prepared data's tokenizer.
    overrides: dict[str, Any] = {}
    # Start from these weights instead of a random init: a checkpoint folder (any strategy, any world size)
    # or an exported Hugging Face folder. Optimizer, schedule and data order start fresh; a checkpoint to
    # resume from (run.resume) takes precedence.
    init_from: str | None = None

    @model_validator(mode="after")
    def _known(self):
        if self.preset not in PRESETS:
            raise ValueError(f"model.preset {self.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
        fields = GrokConfig.__dataclass_fields__
        for key in self.overrides:
            if key not in fields:
                raise ValueError(f"model.overrides.{key} is not a GrokConfig field")
        return self


class MixtureSource(Section):
    path: str  # a folder made by `python -m data.prepare`
    weight: float = Field(gt=0, allow_inf_nan=False)  # its share of the samples, relative to the others'


class DataSection(Section):
    path: str = "runs/data/stdlib"  # a folder made by `python -m data.prepare`
    mixture: list[MixtureSource] | None = None  # weighted prepared folders: replaces `path` where given
    seq_len: int = Field(128, gt=0)
    prefetch: int = Field(2, ge=0, le=64)  # batches read ahead; a few hide the reads
    verify_checksums: bool = True
    document_mask: bool = False  # attention stays inside each document of a packed window

    @model_validator(mode="after")
    def _mixture_sources(self):
        if self.mixture is not None:
            paths = [str(Path(source.path).resolve()) for source in self.mixture]
            if not paths:
                raise ValueError("data.mixture: an empty mixture; list prepared folders with weights, or drop it")
            repeated = next((source.path for source, path in zip(self.mixture, paths) if paths.count(path) > 1), None)
            if repeated is not None:
                raise ValueError(f"data.mixture: {repeated} is listed twice; give it one entry with the summed weight")
            names = [Path(path).name for path in paths]
            twice = next((name for name in names if names.count(name) > 1), None)
            if twice is not None:
                raise ValueError(
                    f"data.mixture: two sources are folders named {twice!r}, and a folder's name names its logged "
                    f"tokens and val loss; rename one"
                )
        return self

    @property
    def sources(self) -> list[tuple[str, float]]:
        """The prepared folders the run trains on, with their weights: the mixture's, or `path` alone."""
        return [(source.path, source.weight) for source in self.mixture] if self.mixture else [(self.path, 1.0)]

    @property
    def tokenizer_path(self) -> str:
        """The folder whose tokenizer and manifest describe the run's data (every source shares them)."""
        return self.sources[0][0]


class OptimSection(Section):
    name: Literal["adamw", "muon"] = "adamw"  # muon: Muon for the blocks' matrices, AdamW for the rest
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # final lr = lr * min_lr_ratio
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(20, ge=0)
    decay_fraction: float = Field(0.2, gt=0, le=1)  # wsd: the last fraction of steps decays
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping (the norm is still logged)
    muon_momentum: float = Field(0.95, ge=0, lt=1)


class BatchSection(Section):
    global_batch_size: int | None = Field(None, gt=0)  # sequences per optimizer step (default 32)
    global_batch_tokens: int | None = Field(None, gt=0)  # or tokens per step (a multiple of data.seq_len)
    micro_batch_size: int = Field(8, gt=0)  # sequences per forward/backward on one device

    @model_validator(mode="after")
    def _one_of(self):
        if self.global_batch_size is not None and self.global_batch_tokens is not None:
            raise ValueError("batch: set only one of batch.global_batch_size and batch.global_batch_tokens")
        if self.global_batch_size is None and self.global_batch_tokens is None:
            self.__dict__["global_batch_size"] = 32
        return self


class ParallelSection(Section):
    strategy: Literal["none", "ddp", "fsdp", "hsdp", "deepspeed"] = "none"
    replicate_size: int | None = Field(None, gt=0)  # hsdp: replicas (nodes); default world / shard_size
    shard_size: int | None = Field(None, gt=0)  # hsdp: shard group (GPUs per node); default LOCAL_WORLD_SIZE
    ep_size: int = Field(1, gt=0)  # fsdp/hsdp: expert parallelism, ranks that split each MoE layer's experts
    tp_size: int = Field(1, gt=0)  # fsdp/hsdp: tensor parallelism, ranks that split each matmul (one node)
    cp_size: int = Field(1, gt=0)  # fsdp/hsdp: context parallelism, ranks that split each sequence
    pp_size: int = Field(1, gt=0)  # fsdp/hsdp: pipeline parallelism, ranks that split the blocks into stages
    pp_schedule: Literal["1f1b", "interleaved", "zero-bubble", "dualpipev"] = "1f1b"
    pp_virtual_stages: int | None = Field(None, gt=1)  # interleaved: stages per rank (default 2)
    # micro-batches a pipeline pass schedules; a step makes as many passes as its micro-batches fill (default:
    # all of them in one pass, the smallest bubble)
    pp_microbatches: int | None = Field(None, gt=0)
    # fsdp/hsdp: free gathered params after each forward (ZeRO-3 memory). Default: yes, but not under pp, whose
    # micro-batches would each gather again (torchtitan's default); the schedules free them after the step.
    reshard_after_forward: bool | None = None
    activation_checkpointing: bool = False
    # torch.compile: the whole model with one process, else per block; ~30 s cold, then cached for re-runs
    compile: bool = False
    zero_stage: Literal[1, 2, 3] = 2  # deepspeed: 1 shards optimizer state, 2 + gradients, 3 + parameters
    offload_optimizer: bool = False  # deepspeed: optimizer state and its update on the CPU (ZeRO-Offload)


class PrecisionSection(Section):
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU


class CheckpointSection(Section):
    dir: str | None = None  # default: {run.out_dir}/checkpoints
    every: int = Field(0, ge=0)  # steps; 0 = only at the end
    keep: int = Field(2, gt=0)  # complete checkpoints kept
    async_save: bool = False  # write shards in the background while training goes on (DCP strategies)


class EvalSection(Section):
    every: int = Field(0, ge=0)  # steps; 0 = only at the end
    max_sequences: int | None = Field(None, gt=0)  # first N val windows (same at any scale); None = all
    batch_size: int | None = Field(None, gt=0)  # default: batch.micro_batch_size


class LogSection(Section):
    every: int = Field(1, gt=0)
    progress: bool = True  # progress bar on rank 0
    tensorboard: bool = False
    profile_steps: list[int] | None = None  # [START, STOP]: torch.profiler over these steps (train/profiling.py)
    memory_snapshot: bool = False  # the CUDA allocator's history over the profiled steps (GPU only)

    @model_validator(mode="after")
    def _window(self):
        window = self.profile_steps
        if window is not None and (len(window) != 2 or not 1 <= window[0] <= window[1]):
            raise ValueError(f"log.profile_steps must be [START, STOP] with 1 <= START <= STOP, got {window}")
        if self.memory_snapshot and window is None:
            raise ValueError("log.memory_snapshot records the profiled steps: set log.profile_steps = [START, STOP]")
        return self


class RunSection(Section):
    out_dir: str = "runs/tiny"
    max_steps: int = Field(200, gt=0, le=MAX_STEPS)
    seed: int = Field(0, ge=0, lt=2**63)
    resume: str = "auto"  # auto: latest complete checkpoint if any | never | a checkpoint folder
    device: Literal["auto", "cpu", "cuda"] = "auto"
    timeout_s: int = Field(600, gt=0, le=7 * 86400)  # process-group (collective) timeout
    max_skipped_steps: int = Field(5, gt=0)  # consecutive skipped updates (non-finite, spikes) before stopping
    loss_spike_factor: float = Field(0.0, ge=0)  # skip an update whose loss exceeds this x the recent mean; 0 = off


class TrainConfig(Section):
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    batch: BatchSection = BatchSection()
    parallel: ParallelSection = ParallelSection()
    precision: PrecisionSection = PrecisionSection()
    checkpoint: CheckpointSection = CheckpointSection()
    eval: EvalSection = EvalSection()
    log: LogSection = LogSection()
    run: RunSection = RunSection()

    @model_validator(mode="after")
    def _combinations(self):
        if self.run.loss_spike_factor and self.parallel.strategy == "deepspeed":
            raise ValueError(
                "run.loss_spike_factor: DeepSpeed applies every update it is given (it skips only "
                "non-finite ones); set it to 0 or use none/ddp/fsdp/hsdp"
            )
        if self.checkpoint.async_save and self.parallel.strategy == "deepspeed":
            raise ValueError(
                "checkpoint.async_save: DeepSpeed writes its own checkpoint files synchronously; set it "
                "to false or use none/ddp/fsdp/hsdp"
            )
        if self.data.document_mask and (self.parallel.cp_size > 1 or self.parallel.pp_size > 1):
            raise ValueError(
                "data.document_mask: context- and pipeline-parallel attention do not take document masks yet; "
                "set parallel.cp_size and parallel.pp_size to 1 or data.document_mask = false"
            )
        if self.optim.name == "muon" and self.parallel.strategy == "deepspeed":
            raise ValueError(
                "optim.name: muon orthogonalises whole matrices, which DeepSpeed's flat ZeRO partitions "
                "do not keep; use adamw or none/ddp/fsdp/hsdp"
            )
        return self

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.run.out_dir) / "checkpoints")

    def global_batch_sequences(self) -> int:
        if self.batch.global_batch_size is not None:
            return self.batch.global_batch_size
        if self.batch.global_batch_tokens % self.data.seq_len:
            raise ConfigError(
                f"batch.global_batch_tokens {self.batch.global_batch_tokens} is not a multiple of "
                f"data.seq_len {self.data.seq_len}"
            )
        return self.batch.global_batch_tokens // self.data.seq_len

    def grad_accumulation(self, data_parallel_size: int) -> int:
        """Micro-batches per rank per step; errors with the nearest valid global batch sizes."""
        sequences = self.global_batch_sequences()
        per_step = self.batch.micro_batch_size * data_parallel_size
        if sequences % per_step:
            # the two nearest multiples; below one micro-batch per rank, the smallest two there are
            lower = max(per_step, sequences // per_step * per_step)
            upper = lower + per_step
            smaller_micro = (
                f" or batch.micro_batch_size {sequences // data_parallel_size}"
                if sequences >= data_parallel_size and sequences % data_parallel_size == 0
                else ""
            )
            raise ConfigError(
                f"batch.global_batch_size {sequences} is not divisible by micro_batch_size "
                f"{self.batch.micro_batch_size} x {data_parallel_size} data-parallel ranks; use {lower} or {upper}"
                f"{smaller_micro or ' (or change batch.micro_batch_size)'}"
            )
        return sequences // per_step

    def dump_toml(self) -> str:
        lines = []
        for name, section in self:
            lines.append(f"[{name}]")
            for key, value in section.model_dump().items():
                if value is not None and not isinstance(value, dict):
                    lines.append(f"{key} = {_toml_value(value)}")
            for key, value in section.model_dump().items():
                if isinstance(value, dict) and value:
                    lines.append(f"[{name}.{key}]")
                    lines += [f"{k} = {_toml_value(v)}" for k, v in value.items()]
            lines.append("")
        return "\n".join(lines)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):  # data.mixture: an array of inline tables
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {_toml_value(item)}" for key, item in value.items()) + "}"
    return repr(value)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if not item.startswith("--") or "=" not in item:
        raise ConfigError(f"argument {item!r}: overrides look like --section.key=value")
    key, raw = item[2:].split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string such as --run.out_dir=runs/x
    return key.split("."), value


def read_config_file(path: Path) -> str:
    """A config file's text, read bounded: a regular file (a link to one is fine: it is only read), UTF-8."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block start-up
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file; see configs/ for examples") from None
    except OSError as error:
        raise ConfigError(f"--config {path}: cannot be read ({error.strerror}); give a TOML file") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ConfigError(f"--config {path}: not a regular file; give a TOML file (see configs/)")
        content = f.read(CONFIG_FILE_BYTES + 1)
    if len(content) > CONFIG_FILE_BYTES:
        raise ConfigError(f"--config {path}: larger than {CONFIG_FILE_BYTES >> 20} MiB, not a config; give a TOML file")
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"--config {path}: not UTF-8 text (byte {error.start}); save it as UTF-8") from None


# The global batch in sequences or in tokens: setting one on the command line replaces the other (the file's or
# an earlier flag's), so that a flag never contradicts the file.
BATCH_SIZE_FIELDS = ("global_batch_size", "global_batch_tokens")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    raw: dict = {}
    if path is not None:
        path = Path(path)
        try:
            raw = tomllib.loads(read_config_file(path))
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: not valid TOML: {error}") from error
    for item in overrides:
        keys, value = _parse_override(item)
        if len(keys) < 2:
            raise ConfigError(f"argument {item!r}: name a section and a key, e.g. --run.max_steps=100")
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"argument {item!r}: {key} is not a section")
        node[keys[-1]] = value
        if keys[0] == "batch" and keys[-1] in BATCH_SIZE_FIELDS:  # one form of the global batch replaces the other
            node.pop(next(field for field in BATCH_SIZE_FIELDS if field != keys[-1]), None)
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        message = first["msg"].removeprefix("Value error, ")
        prefix = "" if message.startswith(where) else f"{where}: "
        raise ConfigError(
            f"{prefix}{message}"
            + (
                f" (got {first['input']!r})"
                if first["type"] not in ("value_error", "missing") and not isinstance(first["input"], dict)
                else ""
            )
        ) from error
