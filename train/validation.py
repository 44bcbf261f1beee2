"""Validation: loss and bits per byte over fixed windows of a split. The trainer's periodic validation and
scripts/evaluate.py both compute them with `loss_sums`, so their numbers are the same numbers."""

import contextlib
import math

import torch


@torch.no_grad()
def loss_sums(model, batches, byte_lengths: torch.Tensor, autocast=contextlib.nullcontext) -> torch.Tensor:
    """[nats, tokens, UTF-8 bytes] summed over the batches' targets (-100 ignored), in float64, so that
    sums from several ranks add up before the division."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=byte_lengths.device)
    for inputs, targets in batches:
        with autocast():
            out = model(inputs, targets=targets)
        valid = targets != -100
        n_valid = valid.sum()
        if n_valid == 0:  # a padding batch of a rank with fewer windows: it still ran the forward
            continue
        sums += torch.stack(
            [out.lm_loss.double() * n_valid, n_valid.double(), byte_lengths[targets[valid]].sum().double()]
        )
    return sums


def summarize(sums: torch.Tensor) -> dict:
    """What the trainer logs: val_loss in nats per token, val_bpb in bits per byte, val_tokens."""
    nats, tokens, n_bytes = sums.tolist()
    return {"val_loss": nats / tokens, "val_bpb": nats / math.log(2) / n_bytes, "val_tokens": int(tokens)}
