"""Validation: loss and bits per byte over fixed windows of a split. The trainer's periodic validation and
scripts/evaluate.py both compute them with `loss_sums`, so their numbers are the same numbers."""

import contextlib
import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
import torch.nn as nn

from data.loader import val_batches
from data.shards import TokenStream
from data.tokenizer import load as load_tokenizer
from data.tokenizer import token_byte_lengths

from .config import TrainConfig
from .parallel import Env, Pipeline, all_reduce_sum
from .parallel.context import whole_sequence


@torch.no_grad()
def loss_sums(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    byte_lengths: torch.Tensor,
    autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    split_sequence: Callable = whole_sequence,
    pipeline: Pipeline | None = None,
    documents: Callable[[torch.Tensor], dict] | None = None,
) -> torch.Tensor:
    """[nats, tokens, UTF-8 bytes] summed over the batches' targets (-100 ignored), in float64, so that
    sums from several ranks add up before the division (a rank of a cp group: over its chunks of each sequence;
    under pipeline parallelism, the ranks that hold the last stage). `documents` (data.loader.PackedDocuments)
    keeps attention inside each document, as the run trained."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=byte_lengths.device)
    for whole_inputs, whole_targets in batches:
        inputs, targets, positions = split_sequence(whole_inputs, whole_targets)
        with autocast():
            if pipeline is not None:
                lm_loss = pipeline.evaluate(inputs, targets)
            else:
                packing = {"position_ids": positions, **(documents(inputs) if documents is not None else {})}
                lm_loss = model(inputs, targets=targets, **packing).lm_loss
        valid = targets != -100
        n_valid = valid.sum()
        if n_valid == 0 or lm_loss is None:  # a padding batch of a rank with fewer windows; not the last stage
            continue
        sums += torch.stack([lm_loss.double() * n_valid, n_valid.double(), byte_lengths[targets[valid]].sum().double()])
    return sums


def summarize(sums: torch.Tensor) -> dict:
    """What the trainer logs: val_loss in nats per token, val_bpb in bits per byte, val_tokens."""
    nats, tokens, n_bytes = sums.tolist()
    return {"val_loss": nats / tokens, "val_bpb": nats / math.log(2) / n_bytes, "val_tokens": int(tokens)}


def eval_batch_rows(config: TrainConfig, val_tokens: int, dp_size: int) -> int:
    """The evaluation batch: eval.batch_size (default: the micro-batch), at most the windows one rank evaluates.
    A larger batch would add only padding rows (targets ignored): the same numbers, in more memory."""
    windows = (val_tokens - 1) // config.data.seq_len
    if config.eval.max_sequences is not None:
        windows = min(windows, config.eval.max_sequences)
    per_rank = -(-windows // dp_size)
    return max(1, min(config.eval.batch_size or config.batch.micro_batch_size, per_rank))


class Validator:
    """The trainer's periodic validation: fixed windows of the val split, each data-parallel rank its share,
    summed over ranks. Owns its cadence (`due`)."""

    def __init__(
        self,
        config: TrainConfig,
        env: Env,
        model: nn.Module,
        forward_context: Callable,
        split_sequence: Callable = whole_sequence,
        pipeline: Pipeline | None = None,
        documents: Callable[[torch.Tensor], dict] | None = None,
    ):
        self.config, self.env, self.model, self.forward_context = config, env, model, forward_context
        self.split_sequence, self.pipeline, self.documents = split_sequence, pipeline, documents
        self.every = config.eval.every
        tokenizer = load_tokenizer(config.data.tokenizer_path)
        self.byte_lengths = torch.from_numpy(token_byte_lengths(tokenizer)).to(env.device)
        # each source's val split (one, or a mixture's each), with its own batch rows
        self.batch_sizes = {
            path: eval_batch_rows(config, len(TokenStream(path, "val", verify_checksums=False)), env.dp_size)
            for path, _ in config.data.sources
        }

    def due(self, step: int, last: bool) -> bool:
        """Every `eval.every` steps (0: only at the end) and at the last step."""
        return bool(self.every and step % self.every == 0) or last

    def __call__(self) -> dict:
        """Val loss (nats/token) and bits per byte over the val split, summed across ranks; for a mixture, over
        every source's val split pooled, and each source's as val_loss/NAME and val_bpb/NAME."""
        config, env = self.config, self.env
        by_source = {}
        for path, batch_size in self.batch_sizes.items():
            batches = val_batches(
                path,
                config.data.seq_len,
                batch_size,
                env.dp_rank,
                env.dp_size,
                env.device,
                config.eval.max_sequences,
                verify_checksums=False,  # check_before_start verified the split
            )
            sums = loss_sums(
                self.model,
                batches,
                self.byte_lengths,
                self.forward_context,
                self.split_sequence,
                self.pipeline,
                self.documents,
            )
            by_source[Path(path).name] = all_reduce_sum(sums)
        row = summarize(sum(by_source.values()))
        if config.data.mixture:
            for name, sums in by_source.items():
                source = summarize(sums)
                row |= {f"val_loss/{name}": source["val_loss"], f"val_bpb/{name}": source["val_bpb"]}
        return row
