"""Before the first step: everything that can fail on bad input is checked in one process, in one line,
before any heavy work (`check_before_start`); then rank 0 makes, marks and locks the run's folders
(`take_folders`), and every rank stops with the same message if it cannot."""

import os
from pathlib import Path

from data.shards import DataError, TokenStream, check_tokenizer, read_manifest
from groundwork import folders
from model import GrokConfig, preset_config

from . import checkpoint, fault_injection, weights
from .config import ConfigError, TrainConfig
from .parallel import Env, broadcast_from_main, check_model_fits, layout_of, uses_cuda


def build_model_config(config: TrainConfig, vocab_size: int | None) -> GrokConfig:
    """The preset with its overrides, checked against the data and the device. vocab_size: the prepared
    data's tokenizer (None keeps the preset's, for benchmarks on random tokens)."""
    overrides = {"vocab_size": vocab_size} if vocab_size else {}
    overrides.update(config.model.overrides)
    try:
        model_config = preset_config(config.model.preset, **overrides)
    except Exception as error:  # GrokConfig's validation: keep its first line, which names the field
        message = next(line.strip() for line in str(error).splitlines()[::-1] if line.strip())
        raise ConfigError(f"model.overrides: {message}") from error
    if config.data.seq_len > model_config.max_position_embeddings:
        raise ConfigError(
            f"data.seq_len {config.data.seq_len} exceeds the model's context "
            f"{model_config.max_position_embeddings}; lower data.seq_len or set "
            f"model.overrides.max_position_embeddings"
        )
    if model_config.attn_backend == "flex" and not uses_cuda(config):
        raise ConfigError(
            f"model: preset {config.model.preset!r} attends with flex_attention, which PyTorch cannot "
            f'train on CPU (no backward there); on CPU set model.overrides.attn_backend = "eager"'
        )
    return model_config


def check_before_start(config: TrainConfig) -> None:
    """Everything that can be checked without a process group: fail in one line, before heavy work."""
    data = Path(config.data.path)
    manifest = read_manifest(data)
    model_config = build_model_config(config, manifest["tokenizer"]["vocab_size"])
    check_tokenizer(manifest, data, vocab_size=model_config.vocab_size)
    for split in ("train", "val"):  # both, before step 1: a damaged val shard must not wait for the first eval
        stream = TokenStream(data, split, config.data.verify_checksums)
        if len(stream) < config.data.seq_len + 1:
            raise DataError(
                f"{data}: the {split} split has {len(stream)} tokens, fewer than data.seq_len + 1 = "
                f"{config.data.seq_len + 1}; lower data.seq_len or prepare more data"
            )
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    layout = layout_of(config, world_size, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    check_model_fits(layout, model_config, config.data.seq_len)
    config.grad_accumulation(layout.dp_size)
    fault_injection.from_env()  # a malformed MINICOLOSSUS_FAULT fails here, not mid-run
    if config.model.init_from:
        init_from = Path(config.model.init_from)
        weights.weights_kind(init_from)
        if weights.tokenizer_hash(init_from, "model.init_from") != manifest["tokenizer"]["sha256"]:
            raise ConfigError(
                f"model.init_from {init_from}: trained with another tokenizer than data.path {data}'s; "
                f"use data prepared with the tokenizer it was trained on"
            )
    if config.parallel.strategy == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ConfigError(
                "parallel.strategy 'deepspeed' needs DeepSpeed: pip install -e '.[deepspeed]' "
                "(or choose none, ddp, fsdp or hsdp)"
            ) from None
    if config.log.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("log.tensorboard = true needs the tensorboard package: pip install tensorboard") from None
    if config.run.resume not in ("auto", "never"):
        checkpoint.read_meta(Path(config.run.resume))
    claim_folders(config, create=False)


def claim_folders(config: TrainConfig, create: bool) -> list[folders.RunLock]:
    """The run folder and checkpoint folder must be new, empty or this project's of the right kind, and
    not in use by another run. With create (rank 0, after the process group): make, mark and lock them."""
    out, root = Path(config.run.out_dir), config.checkpoint_dir
    try:
        folders.claim(out, "run", "run.out_dir", create=create)
        checkpoint.check_root(root, config.run.resume, create=create)
    except OSError as error:
        raise ConfigError(
            f"run.out_dir / checkpoint.dir: cannot create folder ({error.strerror}: "
            f"{error.filename}); choose a writable location"
        ) from error
    if not create:
        return []
    locks = [folders.RunLock(out, "run.out_dir")]
    if out.resolve() not in root.resolve().parents:  # a checkpoint folder elsewhere is locked too
        locks.append(folders.RunLock(root, "checkpoint.dir"))
    try:
        for lock in locks:
            lock.acquire()
    except folders.FolderError:
        for lock in locks:
            lock.release()
        raise
    return locks


def take_folders(config: TrainConfig, env: Env) -> list[folders.RunLock]:
    """Rank 0 makes, marks and locks the run's folders; every rank stops with its message if it cannot."""
    locks, refusal = [], None
    if env.is_main:
        try:
            locks = claim_folders(config, create=True)
        except (folders.FolderError, checkpoint.CheckpointError, ConfigError) as error:
            refusal = str(error)
    refusal = broadcast_from_main(refusal)
    if refusal:
        raise ConfigError(refusal)
    return locks
