"""Distributed, resumable loading of a prepared corpus (no `datasets` import: training needs none).

Training sample i is the window tokens[i * seq_len : (i + 1) * seq_len + 1] of the train stream:
inputs and shifted targets, packed across document boundaries. The order of samples is fixed by
the seed alone: epoch e visits them in a seeded permutation, and global sample index g is sample
perm_{g // n}[g % n]. Global batch k is global indices k*B .. k*B+B-1; rank r of R takes its
contiguous 1/R slice. So the loader's whole state is how many global samples were consumed: restoring
it, on any number of ranks, continues the exact order an uninterrupted run would have seen.
"""

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .shards import DataError, TokenStream, check_tokenizer


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    if device.type == "cuda":  # pinned host memory lets the copy overlap with compute
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def document_ids(inputs: torch.Tensor, eos_id: int) -> torch.Tensor:
    """The document each token of packed windows belongs to, numbered from 0 in each row: EOS ends its
    document, so the token after it starts the next."""
    ends = (inputs == eos_id).long()
    return ends.cumsum(-1) - ends


class PackedDocuments:
    """The model's inputs that keep attention inside each document of packed windows (data.document_mask).
    Positions are not restarted at documents: under RoPE a token that sees only its own document sees only
    positions relative to it, so restarting them changes nothing (tests/test_document_mask.py)."""

    def __init__(self, eos_id: int):
        self.eos_id = eos_id

    def __call__(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"document_ids": document_ids(inputs, self.eos_id)}


class SampleOrder:
    """Global sample index -> sample id, one seeded permutation per epoch (of each source of a mixture)."""

    def __init__(self, num_samples: int, seed: int, source: int | None = None):
        self.num_samples, self.seed = num_samples, seed
        self._key = [seed] if source is None else [seed, source]
        self._epoch, self._perm = -1, None

    def __getitem__(self, global_index: int) -> int:
        epoch, position = divmod(global_index, self.num_samples)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([*self._key, epoch]).permutation(self.num_samples)
        return int(self._perm[position])


class MixtureSchedule:
    """Which source each global sample comes from: the source furthest below its share so far (Megatron's
    blended datasets pick the same way), so every prefix of the run holds each source's weight to within a
    sample, with no randomness. Its state is the samples taken from each source."""

    def __init__(self, weights: list[float]):
        total = sum(weights)
        self.shares = np.array([weight / total for weight in weights])
        self.taken = np.zeros(len(weights), dtype=np.int64)

    def next(self) -> tuple[int, int]:
        """(source, its sample index) of the next global sample."""
        source = int(np.argmax(self.shares * (self.taken.sum() + 1) - self.taken))
        self.taken[source] += 1
        return source, int(self.taken[source] - 1)


class TrainLoader:
    """Yields this rank's share of each global batch: (inputs, targets), each [B / R, seq_len] int64.

    `sources` is one prepared folder or a mixture of (folder, weight): global sample g comes from the source
    MixtureSchedule gives it, as that source's k-th sample in its own seeded order."""

    def __init__(
        self,
        sources: Path | str | list[tuple[Path | str, float]],
        seq_len: int,
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        device: torch.device | str = "cpu",
        prefetch: int = 2,
        vocab_size: int | None = None,
        tokenizer_sha256: str | None = None,
        verify_checksums: bool = True,
    ):
        if global_batch_size % world_size != 0:
            raise DataError(f"global batch of {global_batch_size} sequences does not split over {world_size} ranks")
        mixture = not isinstance(sources, (str, Path))
        weighted = list(sources) if mixture else [(sources, 1.0)]
        self.folders = [Path(folder) for folder, _ in weighted]
        self.streams = [TokenStream(folder, "train", verify_checksums) for folder in self.folders]
        self.stream = self.streams[0]
        for folder, stream in zip(self.folders, self.streams):
            check_tokenizer(
                stream.manifest, folder, vocab_size, tokenizer_sha256 or self.stream.manifest["tokenizer"]["sha256"]
            )
        self.seq_len, self.seed = seq_len, seed
        self.global_batch_size, self.rank, self.world_size = global_batch_size, rank, world_size
        self.local_batch_size = global_batch_size // world_size
        self.orders = []
        for index, (folder, stream) in enumerate(zip(self.folders, self.streams)):
            num_samples = (len(stream) - 1) // seq_len
            if num_samples < 1:
                raise DataError(
                    f"{folder}: the train split has {len(stream)} tokens, fewer than seq_len + 1 = "
                    f"{seq_len + 1}; use a shorter seq_len or more data"
                )
            self.orders.append(SampleOrder(num_samples, seed, index if mixture else None))
        self.order = self.orders[0]
        # a mixture's schedule runs ahead with the batches read ahead; `consumed` is where the trainer is
        self.schedule = MixtureSchedule([weight for _, weight in weighted]) if mixture else None
        self.consumed = np.zeros(len(self.folders), dtype=np.int64)
        self.device = torch.device(device)
        self.samples_consumed = 0
        self._prefetch = prefetch
        self._executor = ThreadPoolExecutor(max_workers=1) if prefetch > 0 else None
        self._pending: deque = deque()  # (global start index, samples, future) of batches being read ahead

    @property
    def num_samples(self) -> int:
        return self.order.num_samples

    @property
    def epoch(self) -> int:
        return self.samples_consumed // self.num_samples

    def samples(self, global_start: int) -> list[tuple[int, int]]:
        """(source, sample id) of every row of the global batch that starts at global_start, in order."""
        if self.schedule is None:
            return [(0, self.order[g]) for g in range(global_start, global_start + self.global_batch_size)]
        picks = [self.schedule.next() for _ in range(self.global_batch_size)]
        return [(source, self.orders[source][index]) for source, index in picks]

    def mine(self, rows: list) -> list:
        """This rank's contiguous slice of a global batch's rows."""
        return rows[self.rank * self.local_batch_size : (self.rank + 1) * self.local_batch_size]

    def sample_ids(self, global_start: int) -> list[int]:
        """Sample ids of this rank's slice of the global batch that starts at global_start (one source)."""
        return self.mine([self.order[g] for g in range(global_start, global_start + self.global_batch_size)])

    def _read(self, rows: list[tuple[int, int]]) -> np.ndarray:
        return np.stack([self.streams[s].read(i * self.seq_len, self.seq_len + 1) for s, i in self.mine(rows)])

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.samples_consumed
        if self._executor is None:
            rows = self.samples(start)
            windows = self._read(rows)
        else:
            while len(self._pending) <= self._prefetch:  # keep `prefetch` batches in flight after this one
                ahead = start + len(self._pending) * self.global_batch_size
                ahead_rows = self.samples(ahead)
                self._pending.append((ahead, ahead_rows, self._executor.submit(self._read, ahead_rows)))
            ahead, rows, future = self._pending.popleft()
            assert ahead == start
            windows = future.result()
        self.samples_consumed += self.global_batch_size
        for source, _ in rows:
            self.consumed[source] += 1
        batch = _to_device(windows, self.device)
        return batch[:, :-1], batch[:, 1:]

    def tokens_by_source(self) -> dict[str, int]:
        """Tokens of the global batches consumed so far, by source folder name (a mixture's)."""
        return {folder.name: int(count) * self.seq_len for folder, count in zip(self.folders, self.consumed)}

    def state_dict(self) -> dict:
        state = {
            "samples_consumed": self.samples_consumed,
            "epoch": self.epoch,
            "seed": self.seed,
            "seq_len": self.seq_len,
        }
        if self.schedule is not None:
            state["source_samples"] = [int(count) for count in self.consumed]
            state["source_shares"] = [float(share) for share in self.schedule.shares]
        return state

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint's loader state (a file anyone can edit): a count that is not a whole number >= 0 would
        only fail at the first batch, or silently replay samples."""
        samples = state.get("samples_consumed") if isinstance(state, dict) else None
        if isinstance(samples, bool) or not isinstance(samples, int) or not 0 <= samples < 2**62:
            raise DataError(
                f"loader state: samples_consumed {samples!r} is not a whole number >= 0; resume from another checkpoint"
            )
        if state.get("seq_len") != self.seq_len or state.get("seed") != self.seed:
            raise DataError(
                f"loader state is for seq_len {state.get('seq_len')} / seed {state.get('seed')}, this run uses "
                f"seq_len {self.seq_len} / seed {self.seed}; keep them fixed when resuming"
            )
        consumed = [samples]
        if self.schedule is not None:
            consumed = state.get("source_samples")
            if (
                not isinstance(consumed, list)
                or len(consumed) != len(self.folders)
                or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in consumed)
                or sum(consumed) != samples
            ):
                raise DataError(
                    f"loader state: source_samples {consumed!r} is not one count per source of data.mixture adding "
                    f"up to samples_consumed {samples}; resume with the same data.mixture or from another checkpoint"
                )
            shares = state.get("source_shares")
            if not isinstance(shares, list) or not np.allclose(shares, self.schedule.shares, rtol=1e-9, atol=0):
                raise DataError(
                    f"loader state: the checkpoint's mixture shares {shares!r} are not this run's "
                    f"{[round(float(share), 6) for share in self.schedule.shares]}; resume with the same data.mixture "
                    f"weights, or start a new run"
                )
            self.schedule.taken[:] = consumed
        for _, _, future in self._pending:
            future.cancel()
        self._pending.clear()
        self.samples_consumed = samples
        self.consumed[:] = consumed

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


class ArrayStream:
    """Tokens already in memory, read like a TokenStream (e.g. a text file tokenised for evaluation)."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = np.asarray(tokens, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.tokens)

    def read(self, start: int, length: int) -> np.ndarray:
        return self.tokens[start : start + length]


def val_batches(
    folder: Path | str,
    seq_len: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    max_windows: int | None = None,
    verify_checksums: bool = True,
    split: str = "val",
):
    """The val split (or another) of a prepared folder as window_batches."""
    stream = TokenStream(folder, split, verify_checksums)
    if len(stream) < seq_len + 1:
        raise DataError(
            f"{folder}: the {split} split has {len(stream)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
            f"use a shorter seq_len or prepare with a larger --val-fraction"
        )
    return window_batches(stream, seq_len, batch_size, rank, world_size, device, max_windows)


def window_batches(
    stream: TokenStream | ArrayStream,
    seq_len: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    max_windows: int | None = None,
):
    """A token stream in order (or its first max_windows windows, the same at any world size), as
    non-overlapping seq_len windows, each window on exactly one rank.

    Rank r takes windows r, r + R, ...; every rank yields the same number of batches (sharded models
    run collectives in forward), padding its last ones with rows whose targets are all -100 (ignored).
    """
    num_windows = (len(stream) - 1) // seq_len
    if max_windows is not None:
        num_windows = min(num_windows, max_windows)
    windows = list(range(rank, num_windows, world_size))
    per_rank = -(-num_windows // world_size)
    num_batches = -(-per_rank // batch_size)
    device = torch.device(device)
    for b in range(num_batches):
        chunk = windows[b * batch_size : (b + 1) * batch_size]
        inputs = np.zeros((batch_size, seq_len), dtype=np.int64)
        targets = np.full((batch_size, seq_len), -100, dtype=np.int64)
        for row, w in enumerate(chunk):
            tokens = stream.read(w * seq_len, seq_len + 1)
            inputs[row], targets[row] = tokens[:-1], tokens[1:]
        yield _to_device(inputs, device), _to_device(targets, device)
