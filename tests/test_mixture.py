"""Data mixtures: weighted prepared folders, sampled deterministically, resumable, the same at any world size."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import base_args, in_process, losses, train
from test_data import paragraphs

from data.loader import MixtureSchedule, TrainLoader
from data.prepare import main as prepare_main
from data.shards import DataError

SEQ_LEN = 16
GLOBAL_BATCH = 6


def prepare(folder: Path, name: str, texts: list[str], tokenizer: str = "byte") -> Path:
    (folder / f"{name}.txt").write_text("\n\n".join(texts))
    args = ["--source", str(folder / f"{name}.txt"), "--out", str(folder / name), "--tokenizer", tokenizer]
    assert prepare_main([*args, "--vocab-size", "300", "--val-fraction", "0.1", "--shard-tokens", "1000"]) == 0
    return folder / name


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("mixture")
    texts = paragraphs(120)
    return {
        "web": prepare(folder, "web", texts[:80]),
        "code": prepare(folder, "code", texts[80:]),
        "bpe": prepare(folder, "bpe", texts[80:], tokenizer="bpe"),
    }


def mixture(sources, rank=0, world_size=1, prefetch=0, **kwargs) -> TrainLoader:
    weighted = [(sources["web"], 0.7), (sources["code"], 0.3)]
    return TrainLoader(weighted, SEQ_LEN, GLOBAL_BATCH, rank=rank, world_size=world_size, prefetch=prefetch, **kwargs)


def test_the_schedule_holds_every_prefix_to_its_weights():
    schedule = MixtureSchedule([0.7, 0.2, 0.1])
    picks = [schedule.next()[0] for _ in range(1000)]
    for n in (10, 100, 1000):
        counts = np.bincount(picks[:n], minlength=3)
        assert np.all(np.abs(counts - n * np.array([0.7, 0.2, 0.1])) <= 1), (n, counts)
    again = MixtureSchedule([0.7, 0.2, 0.1])
    assert [again.next()[0] for _ in range(1000)] == picks  # no randomness: the same run every time


def test_a_mixture_draws_each_source_in_its_own_seeded_order(sources):
    loader = mixture(sources)
    batches = [next(loader) for _ in range(20)]
    tokens = loader.tokens_by_source()
    assert tokens == {"web": 84 * SEQ_LEN, "code": 36 * SEQ_LEN}  # 120 samples: 70% and 30%
    again = mixture(sources)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, (next(again) for _ in range(20))))
    other_seed = mixture(sources, seed=1)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(batches, (next(other_seed) for _ in range(20))))


def test_a_mixture_resumes_exactly_on_any_number_of_ranks(sources):
    whole = mixture(sources)
    expected = [next(whole)[0] for _ in range(12)]
    first = mixture(sources)
    for _ in range(5):
        next(first)
    state = first.state_dict()
    assert state["source_samples"] == [21, 9] and state["samples_consumed"] == 30
    halves = [mixture(sources, rank=rank, world_size=2) for rank in (0, 1)]
    for half in halves:
        half.load_state_dict(state)
    for batch in expected[5:]:
        assert torch.equal(torch.cat([next(half)[0] for half in halves]), batch)
    prefetched = mixture(sources, prefetch=3)
    prefetched.load_state_dict(state)
    assert all(torch.equal(next(prefetched)[0], batch) for batch in expected[5:])


def test_a_mixture_refuses_an_odd_tokenizer_and_a_malformed_state(sources):
    weighted = [(sources["web"], 0.5), (sources["bpe"], 0.5)]
    with pytest.raises(DataError, match="bpe: shards were made with tokenizer"):
        TrainLoader(weighted, SEQ_LEN, GLOBAL_BATCH, prefetch=0)
    loader = mixture(sources)
    state = {**loader.state_dict(), "samples_consumed": 6, "source_samples": [5, 2]}
    with pytest.raises(DataError, match="source_samples"):
        loader.load_state_dict(state)
    reweighted = TrainLoader([(sources["web"], 0.5), (sources["code"], 0.5)], SEQ_LEN, GLOBAL_BATCH, prefetch=0)
    with pytest.raises(DataError, match="resume with the same data.mixture weights"):
        reweighted.load_state_dict(loader.state_dict())


def test_the_trainer_trains_on_a_mixture_and_logs_each_source(sources, tmp_path):
    spec = f'--data.mixture=[{{path="{sources["web"]}", weight=3}}, {{path="{sources["code"]}", weight=1}}]'
    rows = train(sources["web"], tmp_path / "run", spec, "--data.seq_len=16", steps=4)
    last = rows[-1]
    assert last["tokens_seen/web"] == 3 * last["tokens_seen/code"] and all(np.isfinite(losses(rows)))
    assert {"val_bpb/web", "val_bpb/code", "val_loss/web", "val_loss/code"} <= last.keys()
    from train.__main__ import main as train_main

    odd = f'--data.mixture=[{{path="{sources["web"]}", weight=1}}, {{path="{sources["bpe"]}", weight=1}}]'
    result = in_process(train_main, *base_args(sources["web"], tmp_path / "odd"), odd, "--data.seq_len=16")
    assert result.returncode == 2 and "bpe" in result.stderr and len(result.stderr.strip().splitlines()) == 1
