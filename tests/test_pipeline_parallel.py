"""Pipeline parallelism with real processes (gloo): pp 2 under each schedule, alone and with data-parallel shards,
tensor and expert parallelism, follows the single-process run step for step (the MoE `tiny`, whose router losses
every stage contributes, and a dense model); its checkpoints resume on one process and on plain FSDP, and export
the single-process weights."""

import pytest
from conftest import STEPS, assert_exports_the_same_weights, assert_same_run, checkpointed_run, losses, train

from train.parallel.pipeline_plan import (
    V_SHAPED,
    V_SHAPED_ON_GLOO_SINCE,
    rank_stages,
    stage_layer_counts,
    v_shaped_runs_on_gloo,
)

PP2 = ["--parallel.pp_size=2"]
DENSE = ["--model.overrides.num_local_experts=1", "--model.overrides.num_experts_per_tok=1"]


@pytest.mark.parametrize(
    "layers, stages, last_extra, counts",
    [
        (4, 2, 0.0, [2, 2]),
        (4, 2, 1.0, [2, 2]),  # 3 + 0 or 2 + (2 + 1): the busiest stage is as light either way; the last keeps 2
        (4, 4, 5.0, [1, 1, 1, 1]),  # at least one block each, however heavy the output
        (10, 4, 1.5, [3, 3, 3, 1]),  # busiest 3: the last holds 1 (+1.5 = 2.5); 2 blocks there would make 3.5
        (126, 16, 2.0, [8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 6]),  # Llama 3 405B's 126 layers over pp 16
    ],
)
def test_blocks_are_placed_so_that_the_busiest_stage_is_as_light_as_whole_blocks_allow(
    layers, stages, last_extra, counts
):
    assert stage_layer_counts(layers, stages, last_extra) == counts


def test_each_schedule_gives_every_stage_to_one_rank():
    for schedule, virtual, pp in (
        ("1f1b", None, 4),
        ("interleaved", 3, 4),
        ("zero-bubble", None, 4),
        ("dualpipev", None, 2),
    ):
        held = [stage for rank in range(pp) for stage in rank_stages(rank, pp, schedule, virtual)]
        assert sorted(held) == list(range(len(held)))
    assert rank_stages(0, 4, "zero-bubble", None) == [0, 7]  # a V: the first and the last stage on rank 0


@pytest.fixture(scope="module")
def pp_run(data_dir, tmp_path_factory):
    return checkpointed_run(data_dir, tmp_path_factory, "pp2", *PP2, nproc=2)


@pytest.mark.distributed
@pytest.mark.compat
def test_pp2_1f1b_follows_the_single_process_run(reference, pp_run):
    assert_same_run(pp_run[0], reference[0])


@pytest.mark.distributed
@pytest.mark.parametrize(
    "schedule",
    [
        pytest.param(["--parallel.pp_schedule=interleaved"], marks=pytest.mark.compat),  # 2 x 2 stages of 1 block
        ["--parallel.pp_schedule=zero-bubble", "--batch.micro_batch_size=2"],  # a V needs 2 x pp micro-batches
        ["--parallel.pp_schedule=dualpipev", "--batch.micro_batch_size=2"],
    ],
    ids=["interleaved", "zero-bubble", "dualpipev"],
)
def test_pp2_schedules_follow_the_single_process_run(data_dir, tmp_path, schedule):
    if any(name in schedule[0] for name in V_SHAPED) and not v_shaped_runs_on_gloo():
        pytest.skip(f"V-shaped schedules need torch {V_SHAPED_ON_GLOO_SINCE} on gloo")
    micro = [flag for flag in schedule if flag.startswith("--batch.")]
    single = train(data_dir, tmp_path / "single", *micro, steps=4)
    assert_same_run(train(data_dir, tmp_path / "pp", *PP2, *schedule, nproc=2, steps=4), single)


@pytest.mark.distributed
def test_pp2_in_two_passes_a_step_follows_the_single_process_run(data_dir, tmp_path):
    """parallel.pp_microbatches 2 of 4 micro-batches a step: two pipeline passes whose gradients accumulate."""
    micro = ["--batch.micro_batch_size=2"]
    single = train(data_dir, tmp_path / "single", *micro, steps=4)
    passes = ["--parallel.pp_microbatches=2", "--parallel.pp_schedule=interleaved"]
    assert_same_run(train(data_dir, tmp_path / "pp", *PP2, *micro, *passes, nproc=2, steps=4), single)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "schedule",
    [
        [],
        ["--parallel.pp_schedule=interleaved"],
        ["--parallel.pp_schedule=zero-bubble", "--batch.micro_batch_size=2"],
    ],
    ids=["1f1b", "interleaved", "zero-bubble"],
)
def test_pp2_on_a_dense_model_with_an_untied_output_follows_the_single_process_run(data_dir, tmp_path, schedule):
    if schedule and "zero-bubble" in schedule[0] and not v_shaped_runs_on_gloo():
        pytest.skip(f"V-shaped schedules need torch {V_SHAPED_ON_GLOO_SINCE} on gloo")
    flags = [*DENSE, "--model.overrides.tie_word_embeddings=false"]
    micro = [flag for flag in schedule if flag.startswith("--batch.")]
    single = train(data_dir, tmp_path / "single", *flags, *micro, steps=4)
    assert_same_run(train(data_dir, tmp_path / "pp", *PP2, *flags, *schedule, nproc=2, steps=4), single)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "flags",
    [
        ["--batch.micro_batch_size=2"],  # fsdp 2 x pp 2: the same micro-batches as one process's
        ["--parallel.tp_size=2", "--model.overrides.num_key_value_heads=2"],
        ["--parallel.ep_size=2", "--batch.micro_batch_size=2"],  # ep borrows the 2 data-parallel ranks
    ],
    ids=["fsdp2-x-pp2", "pp2-x-tp2", "pp2-x-ep2"],
)
def test_pp2_with_another_dimension_on_four_processes_follows_the_single_process_run(data_dir, tmp_path, flags):
    model = [flag for flag in flags if flag.startswith(("--batch.", "--model."))]
    single = train(data_dir, tmp_path / "single", *model, steps=4)
    assert_same_run(train(data_dir, tmp_path / "pp", *PP2, *flags, nproc=4, steps=4), single)


@pytest.mark.distributed
@pytest.mark.parametrize("schedule", ["zero-bubble", "dualpipev"])
@pytest.mark.parametrize(
    "flags",
    [
        ["--batch.micro_batch_size=1"],  # a V needs 2 x pp micro-batches a step
        ["--parallel.tp_size=2", "--model.overrides.num_key_value_heads=2", "--batch.micro_batch_size=2"],
    ],
    ids=["fsdp2-x-pp2", "pp2-x-tp2"],
)
def test_v_shaped_schedules_with_fsdp_in_each_stage_follow_the_single_process_run(data_dir, tmp_path, schedule, flags):
    """The V's split backward computes weight gradients after the input gradients: FSDP must keep the stage's
    parameters gathered until then (the default under pp), and the schedule reduces them after the last."""
    if not v_shaped_runs_on_gloo():
        pytest.skip(f"V-shaped schedules need torch {V_SHAPED_ON_GLOO_SINCE} on gloo")
    model = [flag for flag in flags if flag.startswith(("--batch.", "--model."))]
    single = train(data_dir, tmp_path / "single", *model, steps=4)
    flags = [*PP2, f"--parallel.pp_schedule={schedule}", *flags]
    assert_same_run(train(data_dir, tmp_path / "pp", *flags, nproc=4, steps=4), single)


@pytest.mark.distributed  # (the pp2 run, and fsdp-x2)
@pytest.mark.parametrize("layout", [[], ["--parallel.strategy=fsdp"]], ids=["one-process", "fsdp-x2"])
def test_a_pp2_checkpoint_resumes_on_another_layout(data_dir, reference, pp_run, tmp_path, layout):
    resume = f"--run.resume={pp_run[1] / 'checkpoints' / 'step_00000006'}"
    rows = train(data_dir, tmp_path, resume, *layout, nproc=2 if layout else 1)
    assert [row["step"] for row in rows] == list(range(7, STEPS + 1))
    assert max(abs(a - b) for a, b in zip(losses(rows), losses(reference[0][6:]))) < 1e-5


@pytest.mark.distributed
def test_a_pp2_x_tp2_checkpoint_resumes_on_one_process(data_dir, tmp_path):
    kv2 = ["--model.overrides.num_key_value_heads=2", "--checkpoint.every=6"]
    single = train(data_dir, tmp_path / "single", *kv2)
    train(data_dir, tmp_path / "pp-tp", *kv2, *PP2, "--parallel.tp_size=2", nproc=4)
    resume = f"--run.resume={tmp_path / 'pp-tp' / 'checkpoints' / 'step_00000006'}"
    rows = train(data_dir, tmp_path / "resumed", *kv2, resume)
    assert [row["step"] for row in rows] == list(range(7, STEPS + 1))
    assert max(abs(a - b) for a, b in zip(losses(rows), losses(single[6:]))) < 1e-5


@pytest.mark.distributed
def test_pp2_x_cp2_on_four_processes_follows_the_single_process_run(data_dir, tmp_path):
    single = train(data_dir, tmp_path / "single", steps=4)
    assert_same_run(train(data_dir, tmp_path / "pp-cp", *PP2, "--parallel.cp_size=2", nproc=4, steps=4), single)


@pytest.mark.distributed  # (the pp2 run)
def test_a_one_process_checkpoint_resumes_on_pp2(data_dir, reference, tmp_path):
    resume = f"--run.resume={reference[1] / 'checkpoints' / 'step_00000006'}"
    rows = train(data_dir, tmp_path, resume, *PP2, nproc=2)
    assert max(abs(a - b) for a, b in zip(losses(rows), losses(reference[0][6:]))) < 1e-5


@pytest.mark.distributed  # (the pp2 run)
def test_a_pp2_checkpoint_exports_the_weights_one_process_trained(reference, pp_run, tmp_path):
    assert_exports_the_same_weights(pp_run[1], reference[1], tmp_path)
