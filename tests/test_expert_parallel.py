"""Expert parallelism with real processes (gloo): the all-to-all dispatch computes what one process computes,
training follows the single-process run, and its checkpoints resume and export on other layouts."""

import pytest
import ranks
import torch
import torch.distributed as dist
from conftest import REPO, STEPS, losses, small_config, train
from safetensors.torch import load_file

from model.moe import MoE
from toolbox.export import main as export_main
from train.__main__ import main as train_main
from train.parallel import Layout, build_world_mesh
from train.parallel.expert import apply_expert_parallel, expert_major_order

# Which expert each rank's tokens pick (top-1): rank 1 sends nothing to experts 2 and 3, which rank 1 owns,
# and rank 0 sends them nothing either: rank 1 receives zero rows, and experts 2, 3 get no tokens at all.
CHOICES = {0: [0, 1, 1, 0, 1], 1: [0, 0, 1]}


def routed_moe() -> MoE:
    torch.manual_seed(0)
    moe = MoE(small_config(num_local_experts=4, num_experts_per_tok=1))
    with torch.no_grad():
        for weight in (moe.w_gate, moe.w_up, moe.w_down):
            weight.normal_(0, 0.2)
        moe.router.weight.zero_()
        moe.router.weight[:, :4] = 10 * torch.eye(4)  # token i picks the expert its coordinate selects
    return moe


def tokens_for(rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(rank)
    x = 0.1 * torch.randn(1, len(CHOICES[rank]), 32, generator=generator)
    x[0, torch.arange(len(CHOICES[rank])), CHOICES[rank]] += 1.0
    return x.requires_grad_()


def dispatch_worker(rank: int) -> None:
    """One of 2 gloo ranks (tests/ranks.py starts them)."""
    x, upstream = tokens_for(rank), torch.randn(1, len(CHOICES[rank]), 32, generator=torch.Generator().manual_seed(9))

    local = routed_moe()
    out, stats = local(x)
    assert stats.expert_token_counts.tolist() == torch.bincount(torch.tensor(CHOICES[rank]), minlength=4).tolist()
    (out * upstream).sum().backward()
    x_grad = x.grad.clone()
    x.grad = None
    summed = [w.grad.clone() for w in (local.w_gate, local.w_up, local.w_down)]
    for grad in summed:  # the expert's owner receives every rank's rows: its gradient is the sum
        dist.all_reduce(grad)

    parallel = routed_moe()
    apply_expert_parallel(parallel, build_world_mesh(Layout(dp_shard=2, ep=2), "cpu"))
    out_ep, _ = parallel(x)
    (out_ep * upstream).sum().backward()
    torch.testing.assert_close(out_ep, out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_grad, rtol=1e-5, atol=1e-6)
    for weight, expected in zip((parallel.w_gate, parallel.w_up, parallel.w_down), summed):
        assert tuple(weight.shape) == tuple(expected.shape)  # global shape, as in checkpoints
        torch.testing.assert_close(weight.grad.to_local(), expected[2 * rank : 2 * rank + 2], rtol=1e-5, atol=1e-6)


@pytest.mark.distributed
@pytest.mark.compat
def test_dispatch_over_two_ranks_equals_local_experts_even_for_a_rank_that_receives_nothing():
    ranks.spawn(dispatch_worker, world_size=2)


def test_arrivals_are_regrouped_by_expert_stably():
    counts = torch.tensor([[2, 0], [1, 3]])  # source 0: 2 rows for expert 0; source 1: 1 for expert 0, 3 for 1
    assert expert_major_order(counts).tolist() == [0, 1, 2, 3, 4, 5]
    counts = torch.tensor([[1, 2], [0, 1]])
    assert expert_major_order(counts).tolist() == [0, 1, 2, 3]
    counts = torch.tensor([[0, 2], [2, 0]])
    assert expert_major_order(counts).tolist() == [2, 3, 0, 1]


@pytest.fixture(scope="module")
def expert_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ep2")
    return train(data_dir, out, "--parallel.ep_size=2", "--checkpoint.every=6", "--checkpoint.keep=3", nproc=2), out


@pytest.mark.distributed
@pytest.mark.compat
def test_ep2_follows_the_single_process_run_with_clipping_on_every_step(reference, expert_run):
    single, _ = reference
    rows, _ = expert_run
    assert len(rows) == STEPS and all(row["grad_norm"] > 0.5 for row in single)
    assert max(abs(a - b) for a, b in zip(losses(rows), losses(single))) < 1e-5
    # experts' and dense gradients on two meshes: a wrong scale of either (0.5x, 2x) moves the norm
    assert max(abs(a["grad_norm"] - b["grad_norm"]) for a, b in zip(rows, single)) < 1e-4
    assert max(abs(a - b) for a, b in zip(rows[-1]["expert_load_max"], single[-1]["expert_load_max"])) < 1e-6
    # the all-to-all's imbalance: a rank's 4 experts together are no busier than 4 x the busiest one
    assert "ep_load_max" not in single[-1] and len(rows[-1]["ep_load_max"]) == len(rows[-1]["expert_load_max"])
    assert all(1 <= ep <= expert for ep, expert in zip(rows[-1]["ep_load_max"], rows[-1]["expert_load_max"]))
    assert any(ep < expert for ep, expert in zip(rows[-1]["ep_load_max"], rows[-1]["expert_load_max"]))


@pytest.mark.distributed  # (the ep2 run itself, and fsdp-x2)
@pytest.mark.parametrize("layout", [[], ["--parallel.strategy=fsdp"]], ids=["one-process", "fsdp-x2"])
def test_an_ep2_checkpoint_resumes_on_another_layout(data_dir, reference, expert_run, tmp_path, layout):
    single, _ = reference
    _, out = expert_run
    rows = train(
        data_dir, tmp_path, f"--run.resume={out / 'checkpoints' / 'step_00000006'}", *layout, nproc=2 if layout else 1
    )
    assert [row["step"] for row in rows] == list(range(7, STEPS + 1))
    assert max(abs(a - b) for a, b in zip(losses(rows), losses(single[6:]))) < 1e-5


@pytest.mark.distributed  # (the ep2 run)
def test_an_ep2_checkpoint_exports_the_weights_one_process_trained(reference, expert_run, tmp_path):
    _, single_out = reference
    _, out = expert_run
    for name, run in (("ep", out), ("single", single_out)):
        assert export_main([str(run / "checkpoints" / "step_00000006"), str(tmp_path / name)]) == 0
    ep, single = (load_file(tmp_path / name / "model.safetensors") for name in ("ep", "single"))
    assert ep.keys() == single.keys() and any(".moe.w_gate" in key for key in ep)
    for key in ep:
        assert ep[key].shape == single[key].shape
        torch.testing.assert_close(ep[key], single[key], rtol=0, atol=2e-4)


@pytest.mark.distributed
def test_ep2_with_two_data_parallel_shards_on_four_processes(data_dir, tmp_path):
    micro = ["--batch.micro_batch_size=2"]  # 4 ranks x 2 = the global batch of 8
    single = train(data_dir, tmp_path / "single", *micro, steps=6)
    rows = train(data_dir, tmp_path / "ep", *micro, "--parallel.ep_size=2", nproc=4, steps=6)
    assert max(abs(a - b) for a, b in zip(losses(rows), losses(single))) < 1e-5
    assert max(abs(a["grad_norm"] - b["grad_norm"]) for a, b in zip(rows, single)) < 1e-4


@pytest.mark.parametrize(
    "world, flags, fragment",
    [
        (2, ["--parallel.strategy=ddp", "--parallel.ep_size=2"], "parallel.ep_size > 1 needs parallel.strategy fsdp"),
        (
            2,
            ["--parallel.strategy=deepspeed", "--optim.name=adamw", "--parallel.tp_size=2"],
            "parallel.tp_size > 1 needs parallel.strategy",
        ),
        (6, ["--parallel.ep_size=3"], "parallel.ep_size 3 must divide the model's 8 experts"),
        (2, ["--parallel.ep_size=4"], "parallel.ep_size 4 must divide the 2 data-parallel-shard x tensor ranks"),
        (
            2,
            [
                "--parallel.ep_size=2",
                "--model.overrides.num_local_experts=1",
                "--model.overrides.num_experts_per_tok=1",
            ],
            "needs a mixture-of-experts model",
        ),
        (3, ["--parallel.tp_size=2"], "parallel.tp_size 2 does not divide the world size 3"),
        (2, ["--parallel.tp_size=2"], "model num_key_value_heads (1)"),
        (
            2,
            ["--parallel.tp_size=2", "--model.overrides.num_key_value_heads=2", "--data.seq_len=63"],
            "data.seq_len (63)",
        ),
        (
            4,
            ["--parallel.ep_size=8", "--parallel.tp_size=2", "--model.overrides.num_key_value_heads=2"],
            "parallel.ep_size 8 must divide the 4 data-parallel-shard x tensor ranks",
        ),
        (4, ["--parallel.strategy=hsdp", "--parallel.replicate_size=3", "--parallel.tp_size=2"], "!= world size 4"),
        (2, ["--parallel.strategy=ddp", "--parallel.cp_size=2"], "parallel.cp_size > 1 needs parallel.strategy fsdp"),
        (3, ["--parallel.cp_size=2"], "parallel.cp_size 2 does not divide the world size 3"),
        (2, ["--parallel.strategy=ddp", "--parallel.pp_size=2"], "parallel.pp_size > 1 needs parallel.strategy fsdp"),
        (
            2,
            ["--parallel.pp_size=2", "--parallel.pp_schedule=interleaved", "--parallel.pp_virtual_stages=4"],
            "8 stages of at least one layer each, but the model has 4 layers",
        ),
        (2, ["--parallel.pp_size=2", "--batch.micro_batch_size=24"], "needs at least 2 micro-batches a step"),
        (
            4,
            [
                "--parallel.pp_size=2",
                "--parallel.pp_schedule=dualpipev",
                "--parallel.reshard_after_forward=true",
                "--batch.micro_batch_size=2",
            ],
            "with parallel.reshard_after_forward = true: its split backward",
        ),
        (2, ["--parallel.pp_virtual_stages=2"], "parallel.pp_virtual_stages is for the interleaved schedule"),
        (
            2,
            ["--parallel.pp_size=2", "--batch.micro_batch_size=2", "--parallel.pp_microbatches=5"],
            "parallel.pp_microbatches 5 does not divide this run's 12 micro-batches a step",
        ),
        (
            2,
            ["--parallel.pp_size=2", "--batch.micro_batch_size=2", "--parallel.pp_microbatches=1"],
            "needs at least 2 micro-batches a step, and this run has 1 (parallel.pp_microbatches); raise",
        ),
        (
            2,
            ["--parallel.cp_size=2", "--data.seq_len=62"],
            "2 x 2 equal chunks, which data.seq_len 62 is not a multiple",
        ),
    ],
)
def test_layout_errors_are_one_line_before_any_process_group(
    data_dir, tmp_path, monkeypatch, capsys, world, flags, fragment
):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(world))
    args = [
        "--config",
        str(REPO / "configs" / "tiny.toml"),
        f"--data.path={data_dir}",
        f"--run.out_dir={tmp_path / 'run'}",
        "--parallel.strategy=fsdp",
        "--batch.global_batch_size=24",
        "--batch.micro_batch_size=1",
        *flags,
    ]
    assert train_main(args) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and fragment in error, error
    assert not dist.is_initialized() and not (tmp_path / "run").exists()
