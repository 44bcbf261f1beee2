"""Tensor parallelism with real processes (gloo): tp 2 alone, with data-parallel shards, with hsdp and with expert
parallelism follows the single-process run step for step; its checkpoints resume and export on other layouts."""

import pytest
import torch
from conftest import STEPS, assert_exports_the_same_weights, assert_same_run, checkpointed_run, losses, train

KV2 = ["--model.overrides.num_key_value_heads=2"]  # tiny has 1 KV head; tp 2 splits heads over 2 ranks


@pytest.fixture(scope="module")
def single_kv2(data_dir, tmp_path_factory):
    return checkpointed_run(data_dir, tmp_path_factory, "single-kv2", *KV2)


@pytest.fixture(scope="module")
def tp_run(data_dir, tmp_path_factory):
    return checkpointed_run(data_dir, tmp_path_factory, "tp2", *KV2, "--parallel.tp_size=2", nproc=2)


@pytest.mark.distributed
@pytest.mark.compat
def test_tp2_follows_the_single_process_run(single_kv2, tp_run):
    assert_same_run(tp_run[0], single_kv2[0])


@pytest.mark.distributed
@pytest.mark.parametrize(
    "ffn",
    [
        # Grok-2: experts beside a shared FFN, an untied lm_head (split over the vocabulary), the temperature
        [
            "--model.overrides.shared_intermediate_size=64",
            "--model.overrides.tie_word_embeddings=false",
            "--model.overrides.attn_temperature_len=8",
        ],
        ["--model.overrides.num_local_experts=1", "--model.overrides.num_experts_per_tok=1"],  # dense GeGLU
    ],
    ids=["grok-2", "dense"],
)
def test_tp2_splits_the_dense_and_shared_ffn(data_dir, tmp_path, ffn):
    single = train(data_dir, tmp_path / "single", *KV2, *ffn, steps=4)
    assert_same_run(train(data_dir, tmp_path / "tp", *KV2, *ffn, "--parallel.tp_size=2", nproc=2, steps=4), single)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(["--parallel.strategy=fsdp"], marks=pytest.mark.compat),
        ["--parallel.strategy=hsdp", "--parallel.replicate_size=2", "--parallel.shard_size=1"],
    ],
    ids=["fsdp-2-x-tp-2", "hsdp-2x1-x-tp-2"],
)
def test_tp2_with_two_data_parallel_ranks_on_four_processes(data_dir, single_kv2, tmp_path, layout):
    # 2 data-parallel ranks x micro-batch 4 = the global batch of 8: each tp pair reads one micro-batch
    rows = train(data_dir, tmp_path, *KV2, *layout, "--parallel.tp_size=2", nproc=4)
    assert_same_run(rows, single_kv2[0])


@pytest.mark.distributed  # (the tp2 run itself, and fsdp-x2)
@pytest.mark.parametrize("layout", [[], ["--parallel.strategy=fsdp"]], ids=["one-process", "fsdp-x2"])
def test_a_tp2_checkpoint_resumes_on_another_layout(data_dir, single_kv2, tp_run, tmp_path, layout):
    rows = train(
        data_dir,
        tmp_path,
        *KV2,
        f"--run.resume={tp_run[1] / 'checkpoints' / 'step_00000006'}",
        *layout,
        nproc=2 if layout else 1,
    )
    assert [row["step"] for row in rows] == list(range(7, STEPS + 1))
    assert max(abs(a - b) for a, b in zip(losses(rows), losses(single_kv2[0][6:]))) < 1e-5


@pytest.mark.distributed  # (the tp2 run)
@pytest.mark.compat
def test_a_tp2_checkpoint_exports_the_weights_one_process_trained(single_kv2, tp_run, tmp_path):
    assert_exports_the_same_weights(tp_run[1], single_kv2[1], tmp_path)


@pytest.fixture(scope="module")
def tp_ep_run(data_dir, tmp_path_factory):
    return checkpointed_run(
        data_dir, tmp_path_factory, "tp2-ep2", *KV2, "--parallel.tp_size=2", "--parallel.ep_size=2", nproc=2
    )


@pytest.mark.distributed
@pytest.mark.compat
def test_ep2_borrowing_the_tp2_ranks_follows_the_single_process_run(single_kv2, tp_ep_run):
    assert_same_run(tp_ep_run[0], single_kv2[0])


@pytest.mark.distributed  # (the tp2-ep2 run)
def test_a_tp2_ep2_checkpoint_resumes_on_one_process(data_dir, single_kv2, tp_ep_run, tmp_path):
    rows = train(data_dir, tmp_path, *KV2, f"--run.resume={tp_ep_run[1] / 'checkpoints' / 'step_00000006'}")
    assert max(abs(a - b) for a, b in zip(losses(rows), losses(single_kv2[0][6:]))) < 1e-5


@pytest.mark.distributed
def test_ep4_across_tp2_and_two_data_parallel_ranks_on_four_processes(data_dir, single_kv2, tmp_path):
    rows = train(data_dir, tmp_path, *KV2, "--parallel.tp_size=2", "--parallel.ep_size=4", nproc=4)
    assert_same_run(rows, single_kv2[0])


@pytest.mark.compat
def test_each_rank_of_a_tp_group_sends_its_own_chunk_of_the_rows():
    from train.parallel.expert import chunk_counts, chunk_sizes

    counts = torch.tensor([3, 0, 4, 2])  # 9 rows sorted by expert: 000 2222 33
    assert chunk_sizes(9, 2) == [5, 4] and chunk_sizes(3, 4) == [1, 1, 1, 0]
    assert chunk_counts(counts, 0, 5).tolist() == [3, 0, 2, 0]
    assert chunk_counts(counts, 5, 9).tolist() == [0, 0, 2, 2]
    assert chunk_counts(counts, 9, 9).tolist() == [0, 0, 0, 0]
