"""The training loop: one code path for 1 CPU process, a GPU node or many nodes.

Each optimizer step consumes one global batch. This rank's share (global / data-parallel ranks) is
split into micro-batches of batch.micro_batch_size; gradients accumulate over them and are synced on
the last. Every micro-batch has the same number of tokens (packed data, no padding), so averaging
per-micro-batch mean losses gives exactly the global mean: the same math at every scale.

`Trainer.fit` reads as phases: step -> validate if due -> log if due -> stop if diverged -> checkpoint if
due -> stop if preempted. Each component owns its cadence (`Validator.due`, `MetricsLogger.due`,
`Checkpointer.due`). The log comes before the checkpoint so that a run killed between the two re-logs
the step after resuming rather than losing its row.
"""

import math
from pathlib import Path

import torch

from data.loader import PackedDocuments, TrainLoader
from data.shards import DataError, read_manifest
from groundwork import folders, untrusted
from groundwork.errors import UserError
from model import GrokForCausalLM, count_parameters, flops_per_token

from . import fault_injection, preemption
from .balance import ExpertBias
from .checkpoint import Checkpointer, latest_checkpoint
from .checkpoint_files import check_resumable
from .config import TrainConfig
from .engine import build_engine
from .initialization import materialize
from .metrics import MetricsLogger, peak_memory_mib
from .optim import lr_at
from .parallel import Env, LaunchError, all_reduce_max, all_reduce_sum, sequence_split, setup, teardown
from .profiling import StepProfiler
from .startup import build_model_config, check_before_start, check_model_config, take_folders
from .validation import Validator
from .weights import load_initial_weights

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped on request with a checkpoint; relaunching resumes


class TrainingError(UserError, RuntimeError):
    """Training cannot usefully go on (e.g. only non-finite losses); one line, the last good checkpoint kept."""


class Preempted(Exception):
    """SIGTERM/SIGUSR1 arrived: every rank finished its step and the checkpoint is written."""


class Trainer:
    def __init__(self, config: TrainConfig, env: Env):
        self.config, self.env = config, env
        self.grad_accumulation = config.grad_accumulation(env.dp_size)
        self.global_batch = config.global_batch_sequences()
        manifest = read_manifest(Path(config.data.tokenizer_path))  # every source of a mixture shares it
        self.tokenizer_sha256 = manifest["tokenizer"]["sha256"]
        self.model_config = build_model_config(config, manifest["tokenizer"]["vocab_size"])

        with torch.device("meta"):  # shapes only: each rank allocates just its shards, once the model is split
            model = GrokForCausalLM(self.model_config)
        counts = count_parameters(model)
        self.params_total, self.params_active = counts.total, counts.active
        self.flops_per_token = flops_per_token(self.model_config, counts.active, config.data.seq_len)

        def init_weights(split_model: GrokForCausalLM) -> None:
            materialize(split_model, env.device, config.run.seed)  # the same numbers in every layout
            if config.model.init_from:
                load_initial_weights(split_model, config.model.init_from, whole=env.layout.pp == 1)

        self.engine = build_engine(model, config, env, self.grad_accumulation, init_weights)
        self.model = self.engine.model
        self.loader = TrainLoader(
            config.data.sources if config.data.mixture else config.data.path,
            config.data.seq_len,
            self.global_batch,
            env.dp_rank,
            env.dp_size,
            config.run.seed,
            env.device,
            config.data.prefetch,
            vocab_size=self.model_config.vocab_size,
            verify_checksums=False,  # check_before_start verified both splits
        )
        self.expert_bias = None  # auxiliary-loss-free balancing: the biases, moved once per optimizer step
        if self.model_config.is_moe and self.model_config.router_bias_update_rate > 0:
            pipeline = self.engine.pipeline
            self.expert_bias = ExpertBias(
                [part.model for part in pipeline.parts] if pipeline is not None else [self.model],
                self.model_config.router_bias_update_rate,
                self.model_config.num_hidden_layers,
                env.world_size // env.layout.pp,
            )
        self.split_sequence = sequence_split(env.layout, env.rank)  # context parallelism: this rank's chunks
        self.documents = PackedDocuments(manifest["tokenizer"]["eos_id"]) if config.data.document_mask else None
        self.validator = Validator(
            config,
            env,
            self.model,
            self.engine.forward_context,
            self.split_sequence,
            self.engine.pipeline,
            self.documents,
        )
        self.step = 0
        self.tokens_seen = 0
        self.skipped_steps = 0  # updates skipped for a non-finite loss or gradient, or a loss spike
        self.bad_streak = 0  # ... of them in a row
        self.loss_mean = None  # running mean of accepted losses, for the spike guard
        self.profiler = StepProfiler(
            config.log.profile_steps, config.log.memory_snapshot, Path(config.run.out_dir), env.device, env.rank
        )
        self.faults = fault_injection.injector_from_env(env.rank)  # None unless MINICOLOSSUS_FAULT is set
        if self.faults is not None:
            pipeline = self.engine.pipeline
            outputs = [part for part in pipeline.parts if part.last] if pipeline is not None else [self.model]
            self.faults.poison_loss(outputs, lambda: self.step + 1)
        self.checkpointer = Checkpointer(
            config.checkpoint_dir,
            env,
            self.engine,
            every=config.checkpoint.every,
            keep=config.checkpoint.keep,
            async_save=config.checkpoint.async_save,
            model_config=self.model_config,
            tokenizer_folder=Path(config.data.tokenizer_path),
            trainer_state=self.checkpoint_record,
            check_state=self.check_resumable,
            shards_written=self.faults.shards_written if self.faults is not None else lambda step: None,
        )

    # --- resumable state: what a checkpoint's trainer.json holds besides model and optimizer ----------
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "loader": self.loader.state_dict(),
            "skipped_steps": self.skipped_steps,  # the guards resume too
            "loss_mean": self.loss_mean,
        }

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint's trainer.json, already checked (checkpoint_files.read_meta and check_resumable)."""
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

    def check_resumable(self, folder: Path, meta: dict) -> None:
        """Whether this run can go on from a checkpoint: its trainer.json and config.json against the run."""
        check_resumable(folder, meta, self.config, self.tokenizer_sha256)
        check_model_config(folder, self.model_config)

    def checkpoint_record(self) -> dict:
        """trainer.json: the resumable state, plus how the run was made (data_path for the record only,
        never read back)."""
        return {
            **self.state_dict(),
            "strategy": self.config.parallel.strategy,
            "preset": self.config.model.preset,
            "tokenizer_sha256": self.tokenizer_sha256,
            "data_path": str(Path(self.config.data.tokenizer_path).resolve()),
            **(
                {"data_mixture": [[str(Path(p).resolve()), w] for p, w in self.config.data.sources]}
                if self.config.data.mixture
                else {}
            ),
        }

    # --- one optimizer step --------------------------------------------------------------------------
    def train_step(self) -> dict:
        """Forward/backward over this rank's micro-batches, clip, update (or skip). Returns rank-local sums."""
        if not self.model.training:  # after an evaluation; a walk over every module costs ~0.5 ms a step
            self.model.train()
        inputs, targets, positions = self.split_sequence(*next(self.loader))
        if self.engine.pipeline is not None:  # the schedule runs the micro-batches through this rank's stages
            with self.engine.forward_context():
                sums, expert_counts = self.engine.pipeline.step(inputs, targets)
        else:
            sums, expert_counts = self.accumulate(inputs, targets, positions)
        # One small reduction per step so that every rank takes the same decisions: skip or not, stop or not.
        flags = torch.tensor([float(preemption.requested()), self.checkpointer.local_done()], device=sums.device)
        load = expert_counts.flatten() if self.expert_bias is not None else flags[:0]  # the global batch's, summed
        reduced = all_reduce_sum(torch.cat([sums[:1].double(), flags.double(), load.double()]))  # counts exact
        agreed = reduced[:3].tolist()
        loss = agreed[0] / (self.grad_accumulation * self.env.layout.stage_size)
        spike = bool(
            self.config.run.loss_spike_factor
            and self.loss_mean is not None
            and loss > self.config.run.loss_spike_factor * self.loss_mean
        )
        lr = lr_at(self.step, self.config.run.max_steps, self.config.optim)
        grad_norm = self.engine.step(lr, skip=spike or not math.isfinite(loss))
        if self.expert_bias is not None and not spike and math.isfinite(loss):  # with the weights, or not at all
            self.expert_bias.update(reduced[3:].view(expert_counts.shape))
        skipped_for = None
        if not math.isfinite(loss):
            skipped_for = f"non-finite loss {loss}"
        elif spike:
            skipped_for = (
                f"loss spike: {loss:.4g} > run.loss_spike_factor {self.config.run.loss_spike_factor:g} x the "
                f"recent mean {self.loss_mean:.4g}"
            )
        elif not math.isfinite(float(grad_norm)):
            skipped_for = f"non-finite gradient norm {float(grad_norm)}"
        if skipped_for:
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
            "skipped_for": skipped_for,  # the same on every rank: decided from reduced values
            "preempt": agreed[1] > 0,
            "saved_in_background": agreed[2] == self.env.world_size,
        }

    def accumulate(
        self, inputs: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of this rank's micro-batches, gradients synced on the last. Returns the sums over
        them of (loss, lm_loss, aux_loss, z_loss, seq_aux_loss, dropped) and of the experts' token counts."""
        micro_batch_size = self.config.batch.micro_batch_size
        sums = torch.zeros(6, device=self.env.device)
        expert_counts = None
        for micro_batch in range(self.grad_accumulation):
            last = micro_batch == self.grad_accumulation - 1
            rows = slice(micro_batch * micro_batch_size, (micro_batch + 1) * micro_batch_size)
            packing = {"position_ids": positions}
            if self.documents is not None:  # attention inside each document
                packing.update(self.documents(inputs[rows]))
            with self.engine.micro_batch(last):
                out = self.model(inputs[rows], targets=targets[rows], **packing)
                self.engine.backward(out.loss)
            sums += (
                torch.stack([out.loss, out.lm_loss, out.aux_loss, out.z_loss, out.seq_aux_loss, out.dropped])
                .detach()
                .float()
            )
            counts = out.expert_token_counts.detach()
            expert_counts = counts if expert_counts is None else expert_counts + counts
        return sums, expert_counts

    def metrics_row(self, local: dict) -> dict:
        """One reduction (on log steps only) for everything logged: means over micro-batches and ranks."""
        counts = local["expert_counts"]
        parts = [local["sums"], counts.flatten().float()]
        if self.expert_bias is not None:
            parts.append(self.expert_bias.local_rows(counts.shape[1], counts.device).flatten().float())
        reduced = all_reduce_sum(torch.cat(parts))
        means = (reduced[:6] / (self.grad_accumulation * self.env.layout.stage_size)).tolist()
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
        if self.config.data.mixture:  # the schedule is the same on every rank: no reduction
            row |= {f"tokens_seen/{name}": tokens for name, tokens in self.loader.tokens_by_source().items()}
        model = self.model_config
        if model.router_seq_aux_loss_coef > 0:
            row["seq_aux_loss"] = means[4]
        if counts.numel():
            load = reduced[6 : 6 + counts.numel()].view_as(counts)
            if model.capacity_factor > 0:  # replicas of a batch (tp) count both alike: the ratio is exact
                row["dropped_share"] = float(reduced[5] / load.sum())
            # per layer: busiest expert's share relative to a perfectly even share (1.0 = balanced)
            row["expert_load_max"] = (load.max(dim=1).values / load.mean(dim=1)).tolist()
            ep = self.env.layout.ep
            if ep > 1:  # the all-to-all waits for the rank whose experts (a contiguous block) got the most
                rank_load = load.view(load.shape[0], ep, -1).sum(dim=2)
                row["ep_load_max"] = (rank_load.max(dim=1).values / rank_load.mean(dim=1)).tolist()
            if self.expert_bias is not None:
                row["expert_bias"] = reduced[6 + counts.numel() :].view_as(counts).tolist()
        return row

    def memory_row(self) -> dict:
        """Peak device memory and the bytes this rank holds, the largest over ranks."""
        held = self.engine.memory_bytes()
        memory = torch.tensor([peak_memory_mib(self.env.device), held["params"] / 2**20, sum(held.values()) / 2**20])
        peak, params, state = all_reduce_max(memory).tolist()
        return {"peak_mem_mib": peak, "param_mib": params, "state_mib": state}

    # --- the loop ------------------------------------------------------------------------------------
    def fit(self) -> dict:
        config = self.config
        resumed = self.checkpointer.resume(config.run.resume)
        if resumed is not None:
            self.load_state_dict(resumed[1])
        self.announce(resumed[0] if resumed else None)
        logger = MetricsLogger(
            Path(config.run.out_dir),
            self.env.is_main,
            self.flops_per_token,
            self.env.device,
            config.run.max_steps,
            self.step,
            config.log.progress,
            config.log.tensorboard,
            every=config.log.every,
        )
        logger.throughput(self.tokens_seen)
        last_row = {}
        preemption.catch()  # already done by `python -m train`; this covers a Trainer built in-process
        try:
            while self.step < config.run.max_steps:
                if self.faults is not None:
                    self.faults.step_begins(self.step + 1)
                self.profiler.step_begins(self.step + 1)
                local = self.train_step()
                self.profiler.step_ends(self.step)
                last = self.step == config.run.max_steps
                validation = self.validator() if self.validator.due(self.step, last) else {}
                if logger.due(self.step, last, forced=bool(validation) or local["skipped"]):
                    last_row = {**self.metrics_row(local), **validation, **logger.throughput(self.tokens_seen)}
                    last_row.update(self.memory_row())
                    logger.log(last_row)
                logger.advance(self.step)
                if local["skipped_for"]:
                    logger.note(
                        f"warning: step {self.step}: update skipped ({local['skipped_for']}); {self.bad_streak} "
                        f"in a row, the run stops at run.max_skipped_steps={config.run.max_skipped_steps}; "
                        f"if this repeats, lower optim.lr"
                    )
                if local["saved_in_background"]:  # every rank's write is done: complete that checkpoint
                    self.checkpointer.wait()
                self.stop_if_diverged()
                if self.checkpointer.due(self.step, last, local["preempt"]):
                    saved = self.checkpointer.save(self.step)
                if local["preempt"] and not last:
                    self.stop_for_preemption(saved)
            self.checkpointer.wait()  # the run ends when its last checkpoint is complete
        finally:
            logger.close()
            self.loader.close()
        return last_row

    def announce(self, resumed_from: Path | None) -> None:
        """Rank 0: the run's config and data manifest into run.out_dir, and one line saying what runs."""
        config, env = self.config, self.env
        if not env.is_main:
            return
        out_dir = Path(config.run.out_dir)  # its files were checked at start-up: regular files or absent, no links
        folders.write_durably(out_dir / "config.toml", config.dump_toml())
        manifest = untrusted.read_bytes(
            Path(config.data.tokenizer_path) / "manifest.json", "data manifest", "prepare it again"
        )
        folders.write_durably(out_dir / "data_manifest.json", manifest)
        split = max(env.layout.tp, env.layout.ep, env.layout.cp, env.layout.pp) > 1
        layout = f" ({env.layout.describe()})" if split else ""
        print(
            f"minicolossus: {config.model.preset} ({self.params_total:,} params, {self.params_active:,} active) "
            f"| {config.parallel.strategy} x {env.world_size}{layout} on {env.device.type} "
            f"{str(env.dtype).removeprefix('torch.')} | global batch {self.global_batch} x "
            f"{config.data.seq_len} tokens = {self.grad_accumulation} micro-batch(es) of "
            f"{config.batch.micro_batch_size} per rank" + (f" | resumed from {resumed_from}" if resumed_from else ""),
            flush=True,
        )

    def stop_if_diverged(self) -> None:
        if self.bad_streak < self.config.run.max_skipped_steps:
            return
        last_good = latest_checkpoint(self.config.checkpoint_dir)
        raise TrainingError(
            f"{self.bad_streak} updates in a row skipped (non-finite loss or gradient norm, or loss "
            f"spikes) up to step {self.step}; stopped without saving. Last good checkpoint: "
            f"{last_good or 'none'}; lower optim.lr or raise run.max_skipped_steps"
        )

    def stop_for_preemption(self, saved: Path) -> None:
        self.checkpointer.wait()
        preemption.clear()
        raise Preempted(
            f"preempted at step {self.step}: checkpoint {saved} written; launch the same command again to resume"
        )


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


__all__ = ["PREEMPTED_EXIT", "Preempted", "Trainer", "TrainingError", "check_before_start", "run"]
