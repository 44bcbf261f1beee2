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
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from . import safe_dcp
from .config import TrainConfig
from .engine_api import DCP_ERRORS, Engine, StateLoadError, dcp_cause, first_line, optimizer_state_tensors, tensor_bytes
from .optim import build_optimizer, set_lr
from .parallel import Env, autocast, clip_grad_norm, forward_context, gradient_sync, parallelize
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
        self.model = parallelize(model, config, env, init_weights)
        self.parameters = list(self.model.parameters())  # fixed from here on; walking the modules costs ~0.4 ms
        expert_parallel = env.layout.ep > 1
        self.expert_parameters = expert_parameters(self.model) if expert_parallel else []
        self.expert_gradient_scale = expert_gradient_scale(env.layout)
        self.optimizer = build_optimizer(self.model, config.optim, env.device)
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
        scale_expert_gradients(self.expert_parameters, self.expert_gradient_scale)
        grad_norm = clip_grad_norm(self.parameters, self.grad_clip)
        if not self.gradient_bytes:  # the same parameters get gradients every step: counted once
            self.gradient_bytes = tensor_bytes(p.grad for p in self.parameters if p.grad is not None)
        if not skip and torch.isfinite(grad_norm):
            set_lr(self.optimizer, lr)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def memory_bytes(self) -> dict[str, int]:
        """What this rank holds: its shards only under FSDP. Gradients are counted as the last step held them
        (they are freed between steps; the first step counts them)."""
        return {
            "params": tensor_bytes(self.model.parameters()),
            "grads": self.gradient_bytes,
            "optim": tensor_bytes(optimizer_state_tensors(self.optimizer)),
        }

    def save_state(self, folder: Path) -> None:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder)

    def save_state_async(self, folder: Path, process_group: dist.ProcessGroup | None) -> Future:
        """Stage a copy of the state in memory (the only part the step loop waits for), then write it from
        a background thread over `process_group`; the future completes when every file is written."""
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return dcp.async_save(
            {"model": model_state, "optim": optim_state}, checkpoint_id=folder, process_group=process_group
        )

    def load_state(self, folder: Path) -> None:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        check_model_shapes(folder, model_state)
        state = {"model": model_state, "optim": optim_state}
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
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def check_model_shapes(folder: Path, model_state: dict) -> None:
    """Name the parameters that differ between a DCP checkpoint and this model, before DCP fails on them."""
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
    differences += [f"{key} not in model" for key in saved if key not in ours]
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
