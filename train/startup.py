"""Before the first step: everything that can fail on bad input is checked in one process, in one line,
before any heavy work (`check_before_start`); then rank 0 makes, marks and locks the run's folders
(`take_folders`), and every rank stops with the same message if it cannot."""

import os
from pathlib import Path

from data.shards import DataError, TokenStream, check_tokenizer, read_manifest
from groundwork import folders, untrusted
from model import GrokConfig, preset_config
from model.config import SHAPE_FIELDS

from . import checkpoint, checkpoint_files, fault_injection, weights
from .batch_memory import check_batches_fit
from .config import ConfigError, TrainConfig
from .parallel import Env, broadcast_from_main, check_model_fits, layout_of, uses_cuda
from .parallel.pipeline_plan import check_pipeline
from .validation import eval_batch_rows

# What the run writes in run.out_dir besides its checkpoints: each a regular file (or folder) of the run or
# absent, never a symlink (writing through one would change whatever it points to).
RUN_FILES = ("config.toml", "data_manifest.json", "metrics.jsonl", folders.LOCK)
RUN_FOLDERS = ("tensorboard",)


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
    if model_config.router_seq_aux_loss_coef > 0 and config.parallel.cp_size > 1:
        raise ConfigError(
            "model.overrides.router_seq_aux_loss_coef: the sequence-wise balance loss needs whole sequences, and "
            "context parallelism splits them; set parallel.cp_size = 1 or the coefficient to 0"
        )
    if model_config.attn_backend == "flex" and not uses_cuda(config):
        raise ConfigError(
            f"model: preset {config.model.preset!r} attends with flex_attention, which PyTorch cannot "
            f'train on CPU (no backward there); on CPU set model.overrides.attn_backend = "eager"'
        )
    return model_config


def check_before_start(config: TrainConfig) -> None:
    """Everything that can be checked without a process group: fail in one line, before heavy work."""
    data = Path(config.data.tokenizer_path)
    manifest = read_manifest(data)
    model_config = build_model_config(config, manifest["tokenizer"]["vocab_size"])
    val_tokens = 0
    for source, _ in config.data.sources:  # a mixture's sources must share the first one's tokenizer
        source_manifest = read_manifest(Path(source))
        check_tokenizer(source_manifest, Path(source), model_config.vocab_size, manifest["tokenizer"]["sha256"])
        for split in ("train", "val"):  # both, before step 1: a damaged val shard must not wait for the first eval
            tokens = len(TokenStream(source, split, config.data.verify_checksums))
            if tokens < config.data.seq_len + 1:
                raise DataError(
                    f"{source}: the {split} split has {tokens} tokens, fewer than data.seq_len + 1 = "
                    f"{config.data.seq_len + 1}; lower data.seq_len or prepare more data"
                )
            if split == "val":
                val_tokens = max(val_tokens, tokens)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    layout = layout_of(config, world_size, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    check_model_fits(layout, model_config, config.data.seq_len)
    check_pipeline(config, model_config, layout, config.grad_accumulation(layout.dp_size), uses_cuda(config))
    eval_rows = eval_batch_rows(config, val_tokens, layout.dp_size)
    check_batches_fit(config, model_config, layout, eval_rows, uses_cuda(config))
    fault_injection.from_env()  # a malformed MINICOLOSSUS_FAULT fails here, not mid-run
    if config.model.init_from:
        init_from = Path(config.model.init_from)
        weights.weights_kind(init_from)
        if weights.tokenizer_hash(init_from, "model.init_from") != manifest["tokenizer"]["sha256"]:
            raise ConfigError(
                f"model.init_from {init_from}: trained with another tokenizer than the data's ({data}); "
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
    claim_folders(config, create=False)
    resume_from = (
        checkpoint.latest_checkpoint(config.checkpoint_dir)
        if config.run.resume == "auto"
        else None
        if config.run.resume == "never"
        else Path(config.run.resume)
    )
    if resume_from is not None:  # what can be checked without hashing or loading it
        meta = checkpoint_files.read_meta(resume_from)
        checkpoint_files.check_resumable(resume_from, meta, config, manifest["tokenizer"]["sha256"])
        check_model_config(resume_from, model_config)


def check_model_config(folder: Path, model_config: GrokConfig) -> None:
    """The checkpoint's config.json describes the model this run builds (what fixes its parameters' shapes):
    later checkpoints and exports of the run must not inherit a config.json that lies about their weights."""
    path = Path(folder) / checkpoint_files.MODEL_CONFIG
    fix = "resume with the model.preset and model.overrides it was trained with, or start a new run.out_dir"
    saved = untrusted.read_json_object(path, "checkpoint model config", fix)
    for field in SHAPE_FIELDS:
        ours, theirs = getattr(model_config, field), saved.get(field)
        if theirs != ours or type(theirs) is not type(ours):
            raise checkpoint.CheckpointError(f"{path}: {field} is {theirs!r}, this run's model has {ours!r}; {fix}")


def check_run_files(out: Path) -> None:
    """run.out_dir's own files: absent, or a regular file (a folder) of the run; never a symlink or a FIFO."""
    for name in RUN_FILES + RUN_FOLDERS:
        path = Path(out) / name
        if path.is_symlink():
            raise folders.FolderError(
                f"run.out_dir {out}: {name} is a symlink; remove it (the run writes {name} itself, never "
                f"through a link, which would change the file it points to)"
            )
        kind_ok = path.is_dir() if name in RUN_FOLDERS else path.is_file()
        if path.exists() and not kind_ok:
            what = "a folder" if name in RUN_FOLDERS else "a regular file"
            raise folders.FolderError(
                f"run.out_dir {out}: {name} is not {what}; remove it or choose another run.out_dir"
            )


def claim_folders(config: TrainConfig, create: bool) -> list[folders.RunLock]:
    """The run folder and checkpoint folder must be new, empty or this project's of the right kind, and
    not in use by another run. With create (rank 0, after the process group): make, mark and lock them."""
    out, root = Path(config.run.out_dir), config.checkpoint_dir
    try:
        folders.claim(out, "run", "run.out_dir", create=create)
        check_run_files(out)
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
