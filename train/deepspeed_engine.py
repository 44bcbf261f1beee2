"""DeepSpeed ZeRO as a training engine: parallel.strategy = "deepspeed", parallel.zero_stage = 1 | 2 | 3.

Our model and our AdamW go into `deepspeed.initialize` with a DeepSpeed config generated from ours: the
same global batch, micro batch and derived gradient accumulation, the same clipping, bf16 on GPU and fp32
on CPU. The optimizer is a torch one, so nothing is JIT-compiled on first use (DeepSpeed's fused CPU Adam
would compile for a minute on a fresh machine). ZeRO-1 shards optimizer state, ZeRO-2 also gradients,
ZeRO-3 also parameters; `parallel.offload_optimizer` keeps optimizer state and its update on the CPU.

Checkpoints are DeepSpeed's own files in `{checkpoint}/deepspeed/`, one set per data-parallel rank: they
resume on the same number of ranks, read with torch's weights-only unpickler (see weights_only_loading). `consolidated_weights` merges them into full fp32 weights for export.
"""

import contextlib
import logging
import os
import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import deepspeed
import torch
import torch.nn as nn
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from .config import TrainConfig
from .engine_api import StateLoadError, optimizer_state_tensors, tensor_bytes
from .optim import build_optimizer, set_lr
from .parallel import Env, apply_block_options

STATE_DIR = "deepspeed"  # the DeepSpeed "tag" inside our checkpoint folder
deepspeed.utils.logger.setLevel(logging.WARNING)  # its INFO lines would drown the progress bar
# DeepSpeed still calls collectives that torch has renamed; one warning per call and rank is noise to our users.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def deepspeed_config(config: TrainConfig, env: Env, grad_accumulation: int) -> dict:
    """Our config in DeepSpeed's terms. DeepSpeed checks train = micro x accumulation x world itself."""
    zero = {"stage": config.parallel.zero_stage}
    if config.parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": env.device.type == "cuda"}
    return {
        "train_batch_size": config.global_batch_sequences(),
        "train_micro_batch_size_per_gpu": config.batch.micro_batch_size,
        "gradient_accumulation_steps": grad_accumulation,
        "gradient_clipping": config.optim.grad_clip,  # 0 = off, as ours; the norm is computed either way
        "bf16": {"enabled": env.dtype == torch.bfloat16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # our torch AdamW
        "zero_force_ds_cpu_optimizer": False,  # ... also when offloading
        "steps_per_print": 2**31 - 1,  # we log; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }


@contextlib.contextmanager
def weights_only_loading():
    """DeepSpeed reads its files with torch.load(weights_only=False), which would run any pickled code in a
    checkpoint. Force torch's safe unpickler, allowing the few plain DeepSpeed types its ZeRO files hold."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler]):
            yield
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


@contextlib.contextmanager
def refused_pickles():
    """Read DeepSpeed files under weights_only_loading; what that unpickler refuses becomes one line."""
    try:
        with weights_only_loading():
            yield
    except pickle.UnpicklingError as error:
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(error))
        raise StateLoadError(
            f"DeepSpeed state holds {unsafe.group(1) if unsafe else 'an object'}, which the "
            f"weights-only loader refuses; use only checkpoints this project wrote"
        ) from None


class DeepSpeedEngine:
    checkpoint_format = "deepspeed"
    pipeline = None  # ZeRO shards data-parallel state; it runs no pipeline stages here

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        env: Env,
        grad_accumulation: int,
        init_weights: Callable[[nn.Module], None],
    ):
        self.env, self.stage = env, config.parallel.zero_stage
        init_weights(model)  # whole on every rank: DeepSpeed partitions it itself
        apply_block_options(model, config, env.device)
        optimizer = build_optimizer(model, config.optim, env.device)
        self.model, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            dist_init_required=False,
            config=deepspeed_config(config, env, grad_accumulation),
        )
        # bf16 DeepSpeed casts buffers too; the routing bias moves in steps of router_bias_update_rate, finer
        # than bf16 resolves near 1, so it goes back to fp32 (the router adds it to fp32 probabilities).
        for module in self.model.module.modules():
            if isinstance(getattr(module, "expert_bias", None), torch.Tensor):
                module.expert_bias = module.expert_bias.float()

    def micro_batch(self, last: bool):
        # DeepSpeed reduces gradients and steps only at the boundary we declare here.
        self.model.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def forward_context(self):
        return contextlib.nullcontext()  # DeepSpeed holds the model in bf16 itself (fp32 master weights)

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)  # divides by gradient_accumulation_steps

    def step(self, lr: float, skip: bool = False) -> torch.Tensor:
        # `skip` is for non-finite losses, whose gradients DeepSpeed's own overflow check finds and skips
        # (config validation keeps loss-spike skipping, which it cannot do, away from this engine).
        set_lr(self.model.optimizer, lr)
        self.model.step()  # clip by the global norm, update, zero the gradients
        norm = self.model.get_global_grad_norm()
        return torch.as_tensor(float("nan") if norm is None else float(norm))

    def memory_bytes(self) -> dict[str, int]:
        """This rank's parameters (ZeRO-3: its partition), gradients (ZeRO-2/3: a partition) and optimizer
        state: the fp32 master partition and AdamW's moments on it."""
        params = list(self.model.module.parameters())
        held = tensor_bytes(p.ds_tensor for p in params) if self.stage == 3 else tensor_bytes(params)
        zero = self.model.optimizer
        # the flat fp32 partitions that our AdamW (zero.optimizer) steps
        master = zero.fp32_partitioned_groups_flat if self.stage == 3 else zero.single_partition_of_fp32_groups
        grads = tensor_bytes(master) if self.stage >= 2 else tensor_bytes(params)
        return {
            "params": held,
            "grads": grads,
            "optim": tensor_bytes(master) + tensor_bytes(optimizer_state_tensors(zero.optimizer)),
        }

    def save_state(self, folder: Path) -> None:
        self.model.save_checkpoint(str(folder), tag=STATE_DIR, client_state={}, save_latest=False)

    def load_state(self, folder: Path) -> None:
        saved = saved_world_size(folder)
        if saved != self.env.world_size:
            # DeepSpeed's universal checkpoints would reshard, but their converter needs Megatron-style
            # metadata for ZeRO-1/2 and did not restore our ZeRO-3 optimizer state exactly (tried, 0.19.8).
            raise StateLoadError(
                f"DeepSpeed ZeRO state of {saved} ranks loads only on {saved} ranks; resume with {saved} processes, "
                f"or start a new run on {self.env.world_size} from its weights (optimizer state and schedule "
                f"restart): --model.init_from={folder} --run.resume=never"
            )
        with refused_pickles():
            path, _ = self.model.load_checkpoint(str(folder), tag=STATE_DIR, load_module_strict=True)
        if path is None:
            raise StateLoadError(
                f"DeepSpeed found no state in {Path(folder) / STATE_DIR}; resume from another "
                f"checkpoint or with run.resume=never"
            )


def saved_world_size(folder: Path) -> int:
    """Data-parallel ranks that wrote a DeepSpeed checkpoint: one optimizer-state file each."""
    files = list((Path(folder) / STATE_DIR).glob("*zero_pp_rank_*_optim_states.pt"))
    if not files:
        raise StateLoadError(f"no DeepSpeed ZeRO files in {Path(folder) / STATE_DIR}")
    return len(files)


def consolidated_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Full fp32 model weights merged from every rank's ZeRO partition (runs in one process, on CPU)."""
    with refused_pickles():
        state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=STATE_DIR)
    return {key.replace("_checkpoint_wrapped_module.", ""): value for key, value in state.items()}
