"""Batch sizes against memory, before the run: a batch that cannot fit fails in one line naming its field at
start-up, not after hours of steps (an evaluation batch is first used at the end of a run).

The estimates are lower bounds, so nothing that fits is refused: the fp32 logits of one micro-batch (the
loss needs them whole), the residual stream each layer keeps for the backward (one layer's for evaluation,
which keeps none), and the token windows the loader holds (the rank's share of a step, plus the prefetched
ones). They are compared with the memory free where they live: the GPU's (torch.cuda.mem_get_info) or, on
CPU, the host's available memory shared by the ranks of this host.
"""

import os

import psutil
import torch

from model import GrokConfig

from .config import ConfigError, TrainConfig
from .parallel import Layout

FLOAT_BYTES = 4
TOKEN_BYTES = 8  # int64 ids


def forward_bytes(model_config: GrokConfig, rows: int, seq_len: int, tp: int, training: bool, pp: int = 1) -> int:
    """At least what one forward (and backward) of `rows` sequences of `seq_len` tokens (this rank's part of
    each, under context parallelism) holds at once on one rank (a pipeline rank: its share of the layers)."""
    tokens = rows * seq_len
    logits = tokens * model_config.vocab_size // tp * FLOAT_BYTES
    residual = tokens * model_config.hidden_size * FLOAT_BYTES
    return logits + residual * (model_config.num_hidden_layers // pp if training else 1)


def free_bytes(use_cuda: bool) -> tuple[int, str]:
    """Memory free for this rank, and where."""
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if use_cuda:
        device = local_rank % max(1, torch.cuda.device_count())
        return torch.cuda.mem_get_info(device)[0], f"GPU {device}"
    return psutil.virtual_memory().available // max(1, local_world), "host memory (per rank on this host)"


def _refuse(field: str, value: int, need: int, free: int, where: str, what: str) -> ConfigError:
    return ConfigError(
        f"{field} {value}: {what} needs at least {need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB of "
        f"{where} free; lower {field}"
    )


def check_batches_fit(
    config: TrainConfig, model_config: GrokConfig, layout: Layout, eval_rows: int, use_cuda: bool
) -> None:
    """The training micro-batch, the loader's share of a step and the evaluation batch (`eval_rows`, already
    clamped to the validation windows a rank has) against the memory free for them."""
    seq_len, tp = config.data.seq_len // layout.cp, layout.tp
    device_free, device = free_bytes(use_cuda)
    host_free, host = free_bytes(False) if use_cuda else (device_free, device)
    micro = config.batch.micro_batch_size
    need = forward_bytes(model_config, micro, seq_len, tp, training=True, pp=layout.pp)
    if need > device_free:
        raise _refuse(
            "batch.micro_batch_size", micro, need, device_free, device, "one micro-batch's forward and backward"
        )
    evaluation = forward_bytes(model_config, eval_rows, seq_len, tp, training=False)
    if evaluation > device_free:
        field = "eval.batch_size" if config.eval.batch_size else "batch.micro_batch_size"
        raise _refuse(field, eval_rows, evaluation, device_free, device, "one evaluation batch")
    share = config.global_batch_sequences() // layout.dp_size
    windows = (
        share * (config.data.seq_len + 1) * TOKEN_BYTES * (config.data.prefetch + 2)
    )  # read ahead, current, on device
    if windows > host_free:
        field = "batch.global_batch_size" if config.batch.global_batch_size else "batch.global_batch_tokens"
        value = config.batch.global_batch_size or config.batch.global_batch_tokens
        raise _refuse(field, value, windows, host_free, host, f"this rank's {share} sequences a step (prefetched too)")
