"""The training loop: one code path for 1 CPU process, a GPU node or many nodes.

Each optimizer step consumes one global batch. This rank's share (global / data-parallel ranks) is
split into micro-batches of batch.micro_batch_size; gradients accumulate over them and are synced on
the last. Every micro-batch has the same number of tokens (packed data, no padding), so averaging
per-micro-batch mean losses gives exactly the global mean: the same math at every scale.
"""

import math
import os
import shutil
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from data.loader import TrainLoader, val_batches
from data.shards import DataError, TokenStream, check_tokenizer, read_manifest
from data.tokenizer import load as load_tokenizer
from data.tokenizer import token_byte_lengths
from groundwork import folders
from groundwork.errors import UserError
from model import GrokForCausalLM, count_parameters, flops_per_token, preset_config

from . import checkpoint, fault_injection, preemption, weights
from .config import ConfigError, TrainConfig
from .engine import build_engine
from .initialization import materialize
from .metrics import MetricsLogger, peak_memory_mib
from .optim import lr_at
from .parallel import (
    Env,
    LaunchError,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    broadcast_from_main,
    check_model_fits,
    layout_of,
    setup,
    teardown,
    uses_cuda,
)
from .validation import loss_sums, summarize

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped on request with a checkpoint; relaunching resumes


class TrainingError(UserError, RuntimeError):
    """Training cannot usefully go on (e.g. only non-finite losses); one line, the last good checkpoint kept."""


class Preempted(Exception):
    """SIGTERM/SIGUSR1 arrived: every rank finished its step and the checkpoint is written."""


def build_model_config(config: TrainConfig, vocab_size: int | None):
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


def load_initial_weights(model: GrokForCausalLM, path: str) -> None:
    """model.init_from's weights into a model that may be split over ranks (each keeps its slices)."""
    state = weights.initial_weights(Path(path))
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


class Trainer:
    def __init__(self, config: TrainConfig, env: Env):
        self.config, self.env = config, env
        self.grad_accumulation = config.grad_accumulation(env.dp_size)
        self.global_batch = config.global_batch_sequences()
        manifest = read_manifest(Path(config.data.path))
        self.tokenizer_sha256 = manifest["tokenizer"]["sha256"]
        self.model_config = build_model_config(config, manifest["tokenizer"]["vocab_size"])

        with torch.device("meta"):  # shapes only: each rank allocates just its shards, once the model is split
            model = GrokForCausalLM(self.model_config)
        counts = count_parameters(model)
        self.params_total, self.params_active = counts.total, counts.active
        self.flops_per_token = flops_per_token(self.model_config, counts.active, config.data.seq_len)

        def init_weights(split_model):
            materialize(split_model, env.device, config.run.seed)  # the same numbers in every layout
            if config.model.init_from:
                load_initial_weights(split_model, config.model.init_from)

        self.engine = build_engine(model, config, env, self.grad_accumulation, init_weights)
        self.model = self.engine.model
        self.loader = TrainLoader(
            config.data.path,
            config.data.seq_len,
            self.global_batch,
            env.dp_rank,
            env.dp_size,
            config.run.seed,
            env.device,
            config.data.prefetch,
            vocab_size=self.model_config.vocab_size,
            verify_checksums=False,
        )  # check_before_start verified both splits
        self.byte_lengths = torch.from_numpy(token_byte_lengths(load_tokenizer(config.data.path))).to(env.device)
        self.step = 0
        self.tokens_seen = 0
        self.skipped_steps = 0  # updates skipped for a non-finite loss or gradient, or a loss spike
        self.bad_streak = 0  # ... of them in a row
        self.loss_mean = None  # running mean of accepted losses, for the spike guard
        self.fault = fault_injection.from_env()
        self.checkpointer = checkpoint.Checkpointer(
            config.checkpoint_dir, env, config.checkpoint.keep, config.checkpoint.async_save
        )

    # --- resumable state: what a checkpoint's trainer.json holds besides model and optimizer ----------
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "loader": self.loader.state_dict(),
            "skipped_steps": self.skipped_steps,
            "loss_mean": self.loss_mean,
        }  # the guards resume too

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.skipped_steps, self.loss_mean = state.get("skipped_steps", 0), state.get("loss_mean")
        try:
            self.loader.load_state_dict(state["loader"])
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, DataError):
                raise
            raise DataError(
                f"checkpoint loader state is malformed ({error!r}); resume from another checkpoint"
            ) from error

    # --- checkpoints ---------------------------------------------------------------------------------
    def resume(self) -> Path | None:
        root, choice = self.config.checkpoint_dir, self.config.run.resume
        if self.env.is_main:
            checkpoint.remove_partial(root)
        barrier()
        if choice == "never":
            return None
        path = checkpoint.latest_checkpoint(root) if choice == "auto" else Path(choice)
        if path is None:
            return None
        self.load_state_dict(self.checkpointer.load(path, self.engine, self.tokenizer_sha256))
        return path

    def save(self) -> Path:
        meta = {
            **self.state_dict(),
            "strategy": self.config.parallel.strategy,
            "preset": self.config.model.preset,
            "tokenizer_sha256": self.tokenizer_sha256,
            "data_path": str(Path(self.config.data.path).resolve()),
        }  # for the record, never read back
        step = self.step
        return self.checkpointer.save(
            step,
            self.engine,
            meta,
            self.model_config,
            Path(self.config.data.path),
            after_state=lambda: fault_injection.inject(self.fault, "killsave", step, self.env.rank),
        )

    # --- one optimizer step --------------------------------------------------------------------------
    def train_step(self) -> dict:
        """Forward/backward over this rank's micro-batches, clip, update (or skip). Returns rank-local sums."""
        step, rank = self.step + 1, self.env.rank
        fault_injection.inject(self.fault, "kill", step, rank)
        fault_injection.inject(self.fault, "hang", step, rank)
        poison = fault_injection.inject(self.fault, "nan", step, rank)
        if not self.model.training:  # after an evaluation; a walk over every module costs ~0.5 ms a step
            self.model.train()
        inputs, targets = next(self.loader)
        micro = self.config.batch.micro_batch_size
        sums = torch.zeros(4, device=self.env.device)  # loss, lm_loss, aux_loss, z_loss
        expert_counts = None
        for i in range(self.grad_accumulation):
            last = i == self.grad_accumulation - 1
            rows = slice(i * micro, (i + 1) * micro)
            with self.engine.micro_batch(last):
                out = self.model(inputs[rows], targets=targets[rows])
                loss = out.loss * float("nan") if poison else out.loss
                self.engine.backward(loss)
            sums += torch.stack([loss, out.lm_loss, out.aux_loss, out.z_loss]).detach().float()
            counts = out.expert_token_counts.detach()
            expert_counts = counts if expert_counts is None else expert_counts + counts
        # One small reduction per step so that every rank takes the same decisions: skip or not, stop or not.
        flags = torch.tensor([float(preemption.requested()), self.checkpointer.local_done()], device=sums.device)
        agreed = all_reduce_sum(torch.cat([sums[:1], flags])).tolist()
        loss = agreed[0] / (self.grad_accumulation * self.env.world_size)
        spike = bool(
            self.config.run.loss_spike_factor
            and self.loss_mean is not None
            and loss > self.config.run.loss_spike_factor * self.loss_mean
        )
        lr = lr_at(self.step, self.config.run.max_steps, self.config.optim)
        grad_norm = self.engine.step(lr, skip=spike or not math.isfinite(loss))
        if spike or not math.isfinite(loss) or not math.isfinite(float(grad_norm)):
            self.skipped_steps += 1
            self.bad_streak += 1
        else:
            self.bad_streak = 0
            self.loss_mean = loss if self.loss_mean is None else 0.9 * self.loss_mean + 0.1 * loss
        self.step += 1
        self.tokens_seen += self.global_batch * self.config.data.seq_len

        return {
            "sums": sums,
            "expert_counts": expert_counts,
            "grad_norm": grad_norm,
            "lr": lr,
            "skipped": self.bad_streak > 0,
            "preempt": agreed[1] > 0,
            "saved_in_background": agreed[2] == self.env.world_size,
        }

    def metrics_row(self, local: dict) -> dict:
        """One reduction (on log steps only) for everything logged: means over micro-batches and ranks."""
        counts = local["expert_counts"]
        reduced = all_reduce_sum(torch.cat([local["sums"], counts.flatten().float()]))
        means = (reduced[:4] / (self.grad_accumulation * self.env.world_size)).tolist()
        row = {
            "step": self.step,
            "loss": means[0],
            "lm_loss": means[1],
            "aux_loss": means[2],
            "z_loss": means[3],
            "lr": local["lr"],
            "grad_norm": float(local["grad_norm"]),
            "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped_steps,
        }
        if counts.numel():
            load = reduced[4:].view_as(counts)
            # per layer: busiest expert's share relative to a perfectly even share (1.0 = balanced)
            row["expert_load_max"] = (load.max(dim=1).values / load.mean(dim=1)).tolist()
        return row

    # --- evaluation ----------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Val loss (nats/token) and bits per byte over the val split, summed across ranks."""
        batches = val_batches(
            self.config.data.path,
            self.config.data.seq_len,
            self.config.eval.batch_size or self.config.batch.micro_batch_size,
            self.env.dp_rank,
            self.env.dp_size,
            self.env.device,
            self.config.eval.max_sequences,
            verify_checksums=False,
        )
        return summarize(all_reduce_sum(loss_sums(self.model, batches, self.byte_lengths, self.engine.forward_context)))

    # --- the loop ------------------------------------------------------------------------------------
    def fit(self) -> dict:
        config, env = self.config, self.env
        resumed_from = self.resume()
        out_dir = Path(config.run.out_dir)
        if env.is_main:
            (out_dir / "config.toml").write_text(config.dump_toml())
            shutil.copy(Path(config.data.path) / "manifest.json", out_dir / "data_manifest.json")
            print(
                f"minicolossus: {config.model.preset} ({self.params_total:,} params, {self.params_active:,} active) "
                f"| {config.parallel.strategy} x {env.world_size}"
                + (f" ({env.layout.describe()})" if env.layout.tp > 1 or env.layout.ep > 1 else "")
                + f" on {env.device.type} "
                f"{str(env.dtype).removeprefix('torch.')} | global batch {self.global_batch} x "
                f"{config.data.seq_len} tokens = {self.grad_accumulation} micro-batch(es) of "
                f"{config.batch.micro_batch_size} per rank"
                + (f" | resumed from {resumed_from}" if resumed_from else ""),
                flush=True,
            )
        logger = MetricsLogger(
            out_dir,
            env.is_main,
            self.flops_per_token,
            env.device,
            config.run.max_steps,
            self.step,
            config.log.progress,
            config.log.tensorboard,
        )
        logger.throughput(self.tokens_seen)
        last = {}
        preemption.catch()  # already done by `python -m train`; this covers a Trainer built in-process
        try:
            while self.step < config.run.max_steps:
                local = self.train_step()
                done = self.step == config.run.max_steps
                row = {}
                if config.eval.every and self.step % config.eval.every == 0 or done:
                    row.update(self.evaluate())
                if self.step % config.log.every == 0 or done or row or local["skipped"]:  # always log those
                    row = {**self.metrics_row(local), **row, **logger.throughput(self.tokens_seen)}
                    held = self.engine.memory_bytes()
                    memory = torch.tensor(
                        [peak_memory_mib(env.device), held["params"] / 2**20, sum(held.values()) / 2**20]
                    )
                    row["peak_mem_mib"], row["param_mib"], row["state_mib"] = all_reduce_max(memory).tolist()
                    logger.log(row)
                    last = row
                logger.advance(self.step)
                if local["saved_in_background"]:  # every rank's write is done: complete that checkpoint
                    self.checkpointer.wait()
                if self.bad_streak >= config.run.max_skipped_steps:
                    last_good = checkpoint.latest_checkpoint(config.checkpoint_dir)
                    raise TrainingError(
                        f"{self.bad_streak} updates in a row skipped (non-finite loss or gradient norm, or loss "
                        f"spikes) up to step {self.step}; stopped without saving. Last good checkpoint: "
                        f"{last_good or 'none'}; lower optim.lr or raise run.max_skipped_steps"
                    )
                if config.checkpoint.every and self.step % config.checkpoint.every == 0 or done or local["preempt"]:
                    saved = self.save()
                if local["preempt"] and not done:
                    self.checkpointer.wait()
                    preemption.clear()
                    raise Preempted(
                        f"preempted at step {self.step}: checkpoint {saved} written; launch the same "
                        f"command again to resume"
                    )
            self.checkpointer.wait()  # the run ends when its last checkpoint is complete
        finally:
            logger.close()
            self.loader.close()
        return last


def run(config: TrainConfig) -> dict:
    check_before_start(config)
    env = setup(config)
    locks = []
    try:
        locks = take_folders(config, env)
        return Trainer(config, env).fit()
    except RuntimeError as error:  # a peer that hangs or died leaves this rank's collective to time out
        text = str(error)
        if "timed out" not in text.lower() and "timeout" not in text.lower():
            raise
        first = next((line.strip() for line in text.splitlines() if line.strip()), "")
        raise LaunchError(
            f"rank {env.rank}: a collective did not finish within run.timeout_s={config.run.timeout_s} "
            f"({first[:160]}); a rank is stuck or gone: check the other ranks' logs, or raise "
            f"run.timeout_s for slow steps"
        ) from error
    finally:
        for lock in locks:
            lock.release()
        teardown()


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


__all__ = [
    "run",
    "Trainer",
    "check_before_start",
    "ConfigError",
    "DataError",
    "TrainingError",
    "Preempted",
    "PREEMPTED_EXIT",
]
