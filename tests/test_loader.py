"""The loader's order contract: disjoint ranks, exact resume, resharded resume, full validation."""

from pathlib import Path

import pytest
import ranks
import torch
import torch.distributed as dist
from test_data import paragraphs

from data.loader import TrainLoader, val_batches
from data.prepare import main as prepare_main
from data.shards import DataError, TokenStream

SEQ_LEN = 16
GLOBAL_BATCH = 6  # divisible by 1, 2 and 3 ranks


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("loader")
    (folder / "corpus.txt").write_text("\n\n".join(paragraphs(60)))
    # ~9k tokens -> ~560 samples of 16: a few hundred batches, so tests also cross epoch boundaries
    assert (
        prepare_main(
            [
                "--source",
                str(folder / "corpus.txt"),
                "--out",
                str(folder / "p"),
                "--tokenizer",
                "byte",
                "--val-fraction",
                "0.1",
                "--shard-tokens",
                "1000",
            ]
        )
        == 0
    )
    return folder / "p"


def loader(prepared, rank=0, world_size=1, **kwargs) -> TrainLoader:
    return TrainLoader(prepared, SEQ_LEN, GLOBAL_BATCH, rank=rank, world_size=world_size, **kwargs)


def take(loader, n):
    return [torch.cat([x, y[:, -1:]], dim=1) for x, y in (next(loader) for _ in range(n))]


def test_windows_are_inputs_and_shifted_targets_of_the_stream(prepared):
    single = loader(prepared)
    inputs, targets = next(single)
    assert inputs.shape == targets.shape == (GLOBAL_BATCH, SEQ_LEN) and inputs.dtype == torch.int64
    stream = TokenStream(prepared, "train")
    for row, sample in enumerate(single.sample_ids(0)):
        window = torch.from_numpy(stream.read(sample * SEQ_LEN, SEQ_LEN + 1))
        assert torch.equal(inputs[row], window[:-1]) and torch.equal(targets[row], window[1:])


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_are_disjoint_and_together_the_global_batch(prepared, world_size):
    reference = take(loader(prepared), 5)
    per_rank = [take(loader(prepared, r, world_size), 5) for r in range(world_size)]
    for step in range(5):
        together = torch.cat([per_rank[r][step] for r in range(world_size)])
        assert torch.equal(together, reference[step])
    ids = [set(loader(prepared, r, world_size).sample_ids(0)) for r in range(world_size)]
    assert sum(map(len, ids)) == len(set().union(*ids)) == GLOBAL_BATCH


def test_every_sample_once_per_epoch_and_epochs_differ(prepared):
    single = loader(prepared, prefetch=0)
    n = single.num_samples
    epoch0 = [single.order[g] for g in range(n)]
    epoch1 = [single.order[g] for g in range(n, 2 * n)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1 and epoch0 != list(range(n))
    other_seed = loader(prepared, seed=1)
    assert [other_seed.order[g] for g in range(n)] != epoch0


@pytest.mark.compat
def test_resume_continues_exactly(prepared):
    steps = 200  # > one epoch of ~93 batches
    straight = take(loader(prepared), steps)
    first = loader(prepared)
    head = take(first, 120)
    state = first.state_dict()
    assert state["epoch"] == 120 * GLOBAL_BATCH // first.num_samples and set(state) == {
        "samples_consumed",
        "epoch",
        "seed",
        "seq_len",
    }
    resumed = loader(prepared)
    resumed.load_state_dict(state)
    tail = take(resumed, steps - 120)
    assert all(torch.equal(a, b) for a, b in zip(head + tail, straight))


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (3, 2)])
def test_resume_on_another_world_size_continues_the_global_order(prepared, before, after):
    reference = take(loader(prepared), 8)
    old_ranks = [loader(prepared, r, before) for r in range(before)]
    for rank_loader in old_ranks:
        take(rank_loader, 5)
    state = old_ranks[0].state_dict()
    assert all(r.state_dict() == state for r in old_ranks)  # the state is global, the same on every rank
    new_ranks = [loader(prepared, r, after) for r in range(after)]
    for rank_loader in new_ranks:
        rank_loader.load_state_dict(state)
    per_rank = [take(r, 3) for r in new_ranks]
    for step in range(3):
        assert torch.equal(torch.cat([per_rank[r][step] for r in range(after)]), reference[5 + step])


def test_prefetch_changes_nothing_but_timing(prepared):
    assert all(
        torch.equal(a, b)
        for a, b in zip(take(loader(prepared, prefetch=0), 20), take(loader(prepared, prefetch=4), 20))
    )
    prefetching = loader(prepared, prefetch=3)
    take(prefetching, 4)  # batches 5..8 are already being read ahead
    prefetching.load_state_dict({"samples_consumed": GLOBAL_BATCH, "epoch": 0, "seed": 0, "seq_len": SEQ_LEN})
    assert torch.equal(take(prefetching, 1)[0], take(loader(prepared), 2)[1])


def test_resume_refuses_another_seq_len(prepared):
    state = loader(prepared).state_dict()
    other = TrainLoader(prepared, SEQ_LEN * 2, GLOBAL_BATCH)
    with pytest.raises(DataError, match="seq_len 16"):
        other.load_state_dict(state)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_validation_covers_the_whole_split_once(prepared, world_size):
    stream = TokenStream(prepared, "val")
    num_windows = (len(stream) - 1) // SEQ_LEN
    expected = sorted(tuple(stream.read(w * SEQ_LEN, SEQ_LEN + 1)[1:]) for w in range(num_windows))
    seen, batch_counts = [], []
    for rank in range(world_size):
        batches = list(val_batches(prepared, SEQ_LEN, 4, rank, world_size))
        batch_counts.append(len(batches))
        for _inputs, targets in batches:
            seen += [tuple(t.tolist()) for t in targets if (t != -100).any()]
    assert sorted(seen) == expected
    assert len(set(batch_counts)) == 1  # same number of forward passes on every rank
    again = [t for _, t in val_batches(prepared, SEQ_LEN, 4, 0, world_size)]
    assert all(
        torch.equal(a, b) for a, b in zip(again, [t for _, t in val_batches(prepared, SEQ_LEN, 4, 0, world_size)])
    )


def test_too_long_seq_len_is_rejected(prepared):
    with pytest.raises(DataError, match="val split has .* fewer than seq_len"):
        next(val_batches(prepared, 100_000, 4))
    with pytest.raises(DataError, match="train split has .* fewer than seq_len"):
        TrainLoader(prepared, 10_000_000, 4)
    with pytest.raises(DataError, match="does not split over 4 ranks"):
        TrainLoader(prepared, SEQ_LEN, 6, world_size=4)


def gather_ranked_batches(rank: int, folder: Path) -> int:
    """One of 2 gloo ranks (tests/ranks.py starts them): 10 steps of its loader, gathered, are the single
    loader's batches and disjoint; returns its samples_consumed."""
    world = dist.get_world_size()
    ranked = TrainLoader(folder, 16, 6, rank=rank, world_size=world)
    single = TrainLoader(folder, 16, 6)
    for step in range(10):
        inputs, _ = next(ranked)
        gathered = [torch.empty_like(inputs) for _ in range(world)]
        dist.all_gather(gathered, inputs)
        expected, _ = next(single)
        assert torch.equal(torch.cat(gathered), expected), f"step {step}"
        assert not set(map(tuple, gathered[0].tolist())) & set(map(tuple, gathered[1].tolist()))
    return ranked.state_dict()["samples_consumed"]


@pytest.mark.distributed
@pytest.mark.compat
def test_two_real_processes_gather_the_global_batch(prepared):
    assert ranks.spawn(gather_ranked_batches, prepared, world_size=2, timeout=120) == [60, 60]
