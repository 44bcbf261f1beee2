"""Context parallelism with real processes (gloo): cp 2 alone, with data-parallel shards and with expert parallelism
follows the single-process run step for step (the MoE tiny and Grok-2's per-position attention temperature); its
checkpoints resume on one process and export the single-process weights."""

import pytest
import torch
from conftest import STEPS, assert_exports_the_same_weights, assert_same_run, checkpointed_run, losses, train

from train.parallel.context import chunk_positions


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_the_chunks_of_a_cp_group_cover_the_sequence_once_with_equal_causal_work(cp):
    seq_len = 64
    kept = [chunk_positions(rank, cp, seq_len) for rank in range(cp)]
    assert torch.equal(torch.cat(kept).sort().values, torch.arange(seq_len))
    # a query at position p attends to p + 1 keys: every rank's queries attend to as many as the others'
    work = {int((positions + 1).sum()) for positions in kept}
    assert len(work) == 1


@pytest.fixture(scope="module")
def cp_run(data_dir, tmp_path_factory):
    return checkpointed_run(data_dir, tmp_path_factory, "cp2", "--parallel.cp_size=2", nproc=2)


@pytest.mark.distributed
@pytest.mark.compat
def test_cp2_follows_the_single_process_run(reference, cp_run):
    assert_same_run(cp_run[0], reference[0])


@pytest.mark.distributed
@pytest.mark.parametrize(
    "flags, nproc",
    [
        (["--parallel.ep_size=2"], 2),  # the experts split over the two ranks that share each sequence
        (["--batch.micro_batch_size=2"], 4),  # 2 data-parallel shards x cp 2
    ],
    ids=["cp2-ep2", "fsdp2-x-cp2"],
)
def test_cp2_with_experts_or_data_parallel_ranks_follows_the_single_process_run(
    data_dir, reference, tmp_path, flags, nproc
):
    single = reference[0]
    if "--batch.micro_batch_size=2" in flags:  # the same micro-batches as the single process's
        single = train(data_dir, tmp_path / "single", *flags)
    assert_same_run(train(data_dir, tmp_path / "cp", "--parallel.cp_size=2", *flags, nproc=nproc), single)


@pytest.mark.distributed
def test_cp2_attends_at_the_true_positions(data_dir, tmp_path):
    # Grok-2: a per-position attention temperature from position 8 on, experts beside a shared FFN
    grok2 = [
        "--model.overrides.shared_intermediate_size=64",
        "--model.overrides.tie_word_embeddings=false",
        "--model.overrides.attn_temperature_len=8",
    ]
    single = train(data_dir, tmp_path / "single", *grok2, steps=4)
    assert_same_run(train(data_dir, tmp_path / "cp", *grok2, "--parallel.cp_size=2", nproc=2, steps=4), single)


@pytest.mark.distributed  # (the cp2 run, and fsdp-x2)
@pytest.mark.parametrize("layout", [[], ["--parallel.strategy=fsdp"]], ids=["one-process", "fsdp-x2"])
def test_a_cp2_checkpoint_resumes_on_another_layout(data_dir, reference, cp_run, tmp_path, layout):
    resume = f"--run.resume={cp_run[1] / 'checkpoints' / 'step_00000006'}"
    rows = train(data_dir, tmp_path, resume, *layout, nproc=2 if layout else 1)
    assert [row["step"] for row in rows] == list(range(7, STEPS + 1))
    assert max(abs(a - b) for a, b in zip(losses(rows), losses(reference[0][6:]))) < 1e-5


@pytest.mark.distributed  # (the cp2 run)
def test_a_cp2_checkpoint_exports_the_weights_one_process_trained(reference, cp_run, tmp_path):
    assert_exports_the_same_weights(cp_run[1], reference[1], tmp_path)
