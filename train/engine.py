"""TorchEngine: none / ddp / fsdp / hsdp, with tensor and expert parallelism, on torch.distributed;
the model split by train/parallel, our AdamW, DCP for sharded state. The contract it shares with the
DeepSpeed engine is engine_api.Engine."""

import contextlib
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from . import safe_dcp
from .config import TrainConfig
from .engine_api import DCP_ERRORS, Engine, StateLoadError, dcp_cause, first_line, optimizer_state_tensors, tensor_bytes
from .optim import build_optimizer, set_lr
from .parallel import Env, autocast, clip_grad_norm, forward_context, gradient_sync, parallelize, parallelize_pipeline
from .parallel.expert import expert_gradient_scale, expert_parameters, scale_expert_gradients
from .safe_dcp import DamagedFileError, UnsafeFileError, read_metadata


class TorchEngine:
    """none / ddp / fsdp / hsdp: our AdamW on the wrapped model, DCP for sharded state."""

    # DCP files sit directly in the checkpoint folder, which any world size and strategy of this engine reads.
    checkpoint_format = "dcp"

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        env: Env,
        grad_accumulation: int,
        init_weights: Callable[[nn.Module], None],
    ):
        self.env, self.grad_accumulation = env, grad_accumulation
        self.grad_clip = config.optim.grad_clip
        if env.layout.pp > 1:  # this rank's stages, each its own module (and optimizer) under the whole model's names
            self.pipeline = parallelize_pipeline(model, config, env, init_weights, grad_accumulation)
            self.parts = self.pipeline.parts
            self.model = nn.ModuleList(self.parts)  # train() / eval() and the memory count reach every stage
        else:
            self.pipeline = None
            self.model = parallelize(model, config, env, init_weights)
            self.parts = [self.model]
        self.parameters = list(self.model.parameters())  # fixed from here on; walking the modules costs ~0.4 ms
        self.counted = self.pipeline.norm_parameters(self.parameters) if self.pipeline else None
        expert_parallel = env.layout.ep > 1
        self.expert_parameters = expert_parameters(self.model) if expert_parallel else []
        self.expert_gradient_scale = expert_gradient_scale(env.layout)
        self.optimizers = [build_optimizer(part, config.optim, env.device) for part in self.parts]
        self.gradient_bytes = 0  # measured in the first step, before its gradients are freed

    def micro_batch(self, last: bool):
        stack = contextlib.ExitStack()
        stack.enter_context(gradient_sync(self.model, enabled=last))
        stack.enter_context(self.forward_context())
        return stack

    def forward_context(self):
        """Autocast, and the vocabulary-parallel loss under tensor parallelism (forward and backward)."""
        stack = contextlib.ExitStack()
        stack.enter_context(autocast(self.env.device, self.env.dtype))
        stack.enter_context(forward_context(self.env.layout.tp > 1))
        return stack

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accumulation).backward()

    def step(self, lr: float, skip: bool = False) -> torch.Tensor:
        """Update unless told to skip or the gradient norm is not finite; returns the norm either way."""
        if self.pipeline is not None:
            self.pipeline.sum_tied_embedding_gradients()
        scale_expert_gradients(self.expert_parameters, self.expert_gradient_scale)
        pipeline_group = self.pipeline.group if self.pipeline is not None else None
        grad_norm = clip_grad_norm(self.parameters, self.grad_clip, self.counted, pipeline_group)
        if not self.gradient_bytes:  # the same parameters get gradients every step: counted once
            self.gradient_bytes = tensor_bytes(p.grad for p in self.parameters if p.grad is not None)
        for optimizer in self.optimizers:
            if not skip and torch.isfinite(grad_norm):
                set_lr(optimizer, lr)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def memory_bytes(self) -> dict[str, int]:
        """What this rank holds: its shards only under FSDP. Gradients are counted as the last step held them
        (they are freed between steps; the first step counts them)."""
        return {
            "params": tensor_bytes(self.model.parameters()),
            "grads": self.gradient_bytes,
            "optim": sum(tensor_bytes(optimizer_state_tensors(optimizer)) for optimizer in self.optimizers),
        }

    def part_states(self) -> list[tuple[dict, dict]]:
        """Each part's (model, optimizer) state, keyed by the whole model's parameter names, the optimizer's
        flattened to entries per parameter: so that the stages of a pipeline merge, and any layout reads any
        other's."""
        return [
            get_state_dict(part, optimizer, options=FLAT_OPTIMIZER_STATE)
            for part, optimizer in zip(self.parts, self.optimizers)
        ]

    def state(self, parts: list[tuple[dict, dict]] | None = None) -> dict:
        """{"model": ..., "optim": ...}: every part's state in one (a tied embedding's two copies are equal)."""
        state = {"model": {}, "optim": {}}
        for model_state, optim_state in parts or self.part_states():
            state["model"].update(model_state)
            state["optim"].update(optim_state)
        return state

    def save_state(self, folder: Path) -> None:
        dcp.save(self.state(), checkpoint_id=folder)

    def save_state_async(self, folder: Path, process_group: dist.ProcessGroup | None) -> Future:
        """Stage a copy of the state in memory (the only part the step loop waits for), then write it from
        a background thread over `process_group`; the future completes when every file is written."""
        return dcp.async_save(self.state(), checkpoint_id=folder, process_group=process_group)

    def load_state(self, folder: Path) -> None:
        parts = self.part_states()
        state = self.state(parts)
        check_model_shapes(folder, state["model"], whole=self.pipeline is None)
        try:
            safe_dcp.load(state, folder)
        except DCP_ERRORS as error:
            cause = dcp_cause(error)
            if isinstance(cause, (UnsafeFileError, DamagedFileError)):
                raise StateLoadError(str(cause)) from None
            raise StateLoadError(
                f"cannot be loaded into this model/optimizer ({type(cause).__name__}: "
                f"{first_line(error)}); the checkpoint may be incomplete or corrupted: resume from "
                f"another one or with run.resume=never"
            ) from error
        for part, optimizer, (model_state, optim_state) in zip(self.parts, self.optimizers, parts):
            set_state_dict(
                part,
                optimizer,
                model_state_dict={key: state["model"][key] for key in model_state},
                optim_state_dict={key: state["optim"][key] for key in optim_state},
                options=FLAT_OPTIMIZER_STATE,
            )


FLAT_OPTIMIZER_STATE = StateDictOptions(flatten_optimizer_state_dict=True)


def check_model_shapes(folder: Path, model_state: dict, whole: bool = True) -> None:
    """Name the parameters that differ between a DCP checkpoint and this model, before DCP fails on them.
    `whole`: this rank's model is the whole model (not some pipeline stages), so every saved name is its."""
    try:
        saved = read_metadata(folder).state_dict_metadata
    except (UnsafeFileError, DamagedFileError) as error:
        raise StateLoadError(str(error)) from None
    except DCP_ERRORS as error:
        raise StateLoadError(
            f"unreadable checkpoint metadata ({type(error).__name__}: {str(error)[:200]}); resume "
            f"from another checkpoint or with run.resume=never"
        ) from error
    saved = {
        key.removeprefix("model."): list(meta.size)
        for key, meta in saved.items()
        if key.startswith("model.") and hasattr(meta, "size")
    }
    ours = {key: list(tensor.shape) for key, tensor in model_state.items()}
    differences = [
        f"{key} saved {saved[key]} vs model {ours[key]}" for key in ours if key in saved and saved[key] != ours[key]
    ]
    differences += [f"{key} not in checkpoint" for key in ours if key not in saved]
    differences += [f"{key} not in model" for key in saved if key not in ours and whole]
    if differences:
        more = f" (+{len(differences) - 3} more)" if len(differences) > 3 else ""
        raise StateLoadError(
            f"saved by a model of another shape: {'; '.join(differences[:3])}{more}; resume with "
            f"the model preset and overrides it was trained with, or run.resume=never"
        )


def build_engine(
    model: nn.Module, config: TrainConfig, env: Env, grad_accumulation: int, init_weights: Callable[[nn.Module], None]
) -> Engine:
    """`model` is on the meta device; `init_weights(model)` allocates and fills it once it is split."""
    if config.parallel.strategy == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine  # deepspeed is an optional extra

        return DeepSpeedEngine(model, config, env, grad_accumulation, init_weights)
    return TorchEngine(model, config, env, grad_accumulation, init_weights)
