"""MoE balancing: the auxiliary-loss-free routing bias (choice only, moved once per optimizer step from the
global batch's load, the same in every layout), the sequence-wise balance loss, and the capacity factor."""

import pytest
import torch
from conftest import losses, small_config, train
from safetensors.torch import load_file

from model.moe import MoE, sequence_balance_loss
from toolbox.export import main as export_main

STEPS = 6


def moe(**overrides) -> MoE:
    torch.manual_seed(0)
    layer = MoE(small_config(num_local_experts=4, num_experts_per_tok=2, **overrides))
    with torch.no_grad():
        for weight in (layer.w_gate, layer.w_up, layer.w_down, layer.router.weight):
            weight.normal_(0, 0.2)
    return layer


def test_the_bias_steers_the_choice_and_the_gates_stay_the_probabilities():
    layer = moe(router_bias_update_rate=0.01)
    x = torch.randn(2, 5, 32)
    probs = torch.softmax(layer.router(x.reshape(-1, 32)), dim=-1)
    layer.expert_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 5.0]))  # experts 2 and 3 win every choice
    out, stats = layer(x)
    assert stats.expert_token_counts.tolist() == [0, 0, 10, 10]
    expected = torch.zeros(10, 32)
    for expert in (2, 3):  # each expert's output weighted by the router's own probability, not the biased score
        hidden = torch.nn.functional.gelu(x.reshape(-1, 32) @ layer.w_gate[expert], approximate="tanh")
        expected += probs[:, expert, None] * (
            (hidden * (x.reshape(-1, 32) @ layer.w_up[expert])) @ layer.w_down[expert]
        )
    torch.testing.assert_close(out.reshape(-1, 32), expected, rtol=1e-4, atol=1e-5)


def test_a_capacity_keeps_each_experts_highest_gates_and_counts_the_rest():
    dropless, limited = moe(), moe(capacity_factor=0.5)  # 20 assignments, 4 experts: 3 each at most
    x = torch.randn(2, 5, 32)
    full, full_stats = dropless(x)
    out, stats = limited(x)
    counts = full_stats.expert_token_counts
    assert stats.expert_token_counts.tolist() == counts.tolist()  # the load is what was routed
    assert stats.dropped.item() == (counts - counts.clamp(max=3)).sum().item() > 0
    # by hand: each expert's assignments sorted by gate, the top 3 kept
    probs = torch.softmax(limited.router(x.reshape(-1, 32)), dim=-1)
    gates, chosen = probs.topk(2, dim=-1)
    kept = torch.zeros_like(gates, dtype=torch.bool)
    for expert in range(4):
        rows, slots = (chosen == expert).nonzero(as_tuple=True)
        best = gates[rows, slots].argsort(descending=True)[:3]
        kept[rows[best], slots[best]] = True
    expected = torch.zeros(10, 32)
    tokens = x.reshape(-1, 32)
    for row, slot in kept.nonzero().tolist():
        expert = chosen[row, slot]
        hidden = torch.nn.functional.gelu(tokens[row] @ limited.w_gate[expert], approximate="tanh")
        expected[row] += gates[row, slot] * ((hidden * (tokens[row] @ limited.w_up[expert])) @ limited.w_down[expert])
    torch.testing.assert_close(out.reshape(-1, 32), expected, rtol=1e-4, atol=1e-5)


def test_a_capacity_nothing_exceeds_computes_what_dropless_computes():
    x = torch.randn(2, 5, 32)
    out, stats = moe(capacity_factor=2.0)(x)  # 2 x the even share: above any expert's 10 of 20 here
    torch.testing.assert_close(out, moe()(x)[0], rtol=1e-6, atol=1e-6)
    assert stats.dropped.item() == 0


def test_the_sequence_wise_loss_sees_what_the_batch_wise_one_averages_away():
    # two sequences, each all on its own pair of experts: the batch is even, each sequence is not
    probs = torch.full((8, 4), 0.25)
    chosen = torch.tensor([[0, 1]] * 4 + [[2, 3]] * 4)
    assert sequence_balance_loss(probs, chosen, 1).item() == pytest.approx(1.0)
    assert sequence_balance_loss(probs, chosen, 2).item() == pytest.approx(1.0)  # uniform probabilities: 1 anyway
    skewed = torch.tensor([[0.4, 0.4, 0.1, 0.1]] * 4 + [[0.1, 0.1, 0.4, 0.4]] * 4)
    assert sequence_balance_loss(skewed, chosen, 1).item() == pytest.approx(1.0)
    assert sequence_balance_loss(skewed, chosen, 2).item() == pytest.approx(1.6)


# the loss-free setting (the Switch loss off: it is per micro-batch, so accumulation would change it); 2 KV heads
# so that tp 2 can split them
BIAS = [
    "--model.overrides.router_bias_update_rate=0.01",
    "--model.overrides.router_aux_loss_coef=0",
    "--model.overrides.num_key_value_heads=2",
]


@pytest.fixture(scope="module")
def bias_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bias")
    rows = train(data_dir, out, *BIAS, "--checkpoint.every=3", "--checkpoint.keep=2", steps=STEPS)
    return rows, out


def biases(rows) -> list:
    return [row["expert_bias"] for row in rows]


def assert_same_biases(rows, reference) -> None:
    assert max(abs(a - b) for a, b in zip(losses(rows), losses(reference))) < 1e-5
    for mine, theirs in zip(biases(rows), biases(reference)):
        torch.testing.assert_close(torch.tensor(mine), torch.tensor(theirs), rtol=0, atol=1e-5)


def test_the_bias_moves_toward_the_lighter_experts_once_a_step(bias_run):
    rows, _ = bias_run
    first = torch.tensor(rows[0]["expert_bias"])
    assert torch.allclose(first.abs(), torch.tensor(0.01))  # one step: +-rate on every expert (no exact tie here)
    later = torch.tensor(rows[-1]["expert_bias"])
    assert (later.abs() <= 0.01 * STEPS + 1e-6).all() and not torch.equal(later, first)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "flags, nproc",
    [
        (["--batch.micro_batch_size=2"], 1),  # gradient accumulation of 4
        (["--parallel.strategy=fsdp"], 2),
        (["--parallel.strategy=fsdp", "--parallel.ep_size=2"], 2),
        (["--parallel.strategy=fsdp", "--parallel.ep_size=2", "--batch.micro_batch_size=2"], 4),
        (["--parallel.strategy=fsdp", "--parallel.tp_size=2"], 2),
        (["--parallel.strategy=fsdp", "--parallel.pp_size=2"], 2),
    ],
    ids=["accumulation-4", "fsdp2", "ep2", "ep2-dp2", "tp2", "pp2"],
)
def test_every_layout_holds_the_same_bias_and_losses_at_every_step(bias_run, data_dir, tmp_path, flags, nproc):
    rows = train(data_dir, tmp_path, *BIAS, *flags, nproc=nproc, steps=STEPS)
    assert_same_biases(rows, bias_run[0])


def test_the_bias_resumes_bitwise_and_exports(bias_run, data_dir, tmp_path):
    rows, out = bias_run
    resumed = train(
        data_dir, tmp_path / "resumed", *BIAS, f"--run.resume={out / 'checkpoints' / 'step_00000003'}", steps=STEPS
    )
    assert biases(resumed) == biases(rows[3:]) and losses(resumed) == losses(rows[3:])
    assert export_main([str(out / "checkpoints" / f"step_{STEPS:08d}"), str(tmp_path / "hf")]) == 0
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    layers = sorted(key for key in exported if key.endswith("expert_bias"))
    assert len(layers) == len(rows[-1]["expert_bias"])
    torch.testing.assert_close(torch.stack([exported[key] for key in layers]), torch.tensor(rows[-1]["expert_bias"]))


@pytest.mark.distributed
def test_a_capacity_drops_the_same_assignments_under_expert_parallelism(data_dir, tmp_path):
    """Each rank caps what it sends by its own micro-batch: ep 2's ranks hold the single process's micro-batches."""
    capacity = ["--model.overrides.capacity_factor=1.0"]
    single = train(data_dir, tmp_path / "single", *capacity, steps=4)
    rows = train(
        data_dir, tmp_path / "ep", *capacity, "--parallel.strategy=fsdp", "--parallel.ep_size=2", nproc=2, steps=4
    )
    assert all(row["dropped_share"] > 0 for row in single)
    assert max(abs(a - b) for a, b in zip(losses(rows), losses(single))) < 1e-5
    assert [row["dropped_share"] for row in rows] == pytest.approx([row["dropped_share"] for row in single], abs=1e-9)


def test_the_balance_benchmark_summarises_a_run_from_its_metrics():
    from toolbox.bench_balance import summarize

    rows = [
        {"step": 10, "expert_load_max": [4.0, 4.0], "ep_load_max": [2.0, 2.0], "tokens_per_s": 100.0},
        {"step": 30, "expert_load_max": [2.0, 1.0], "ep_load_max": [1.5, 1.0], "tokens_per_s": 300.0},
        {"step": 40, "expert_load_max": [1.0, 3.0], "ep_load_max": [1.0, 1.2], "tokens_per_s": 200.0},
        {"step": 40, "val_bpb": 2.5, "dropped_share": 0.25},
    ]
    assert summarize(rows) == {
        "val_bpb": 2.5,
        "busiest_expert_mean": 2.5,  # layers averaged per row (4, 1.5, 2), then over the run
        "busiest_expert_max": 3.0,  # after step 20 only: the 4.0 of step 10 is before any balancing
        "all_to_all_mean": 1.45,
        "all_to_all_max": 1.5,
        "tokens_per_s": 200,
        "dropped_share": 0.25,
    }
