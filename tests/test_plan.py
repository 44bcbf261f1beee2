"""The Colossus planner: its memory per rank is checked against what the trainer measures, its throughput against
published runs, and its verdicts for Grok-1 at Colossus scale against the arithmetic."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import ranks
from conftest import REPO, assert_same_run, base_args, in_process, train

from model import preset_config
from toolbox import plan
from toolbox.planner.hardware import FABRICS, GPUS, Cluster
from toolbox.planner.job import InvalidParallelism, Job, Parallelism
from toolbox.planner.launch import trainer_flags
from toolbox.planner.layout import estimate, forward_flops_per_token, work_flops_per_token
from toolbox.planner.pipeline import bubble, slowest_stage
from toolbox.planner.published import RUNS
from toolbox.planner.search import search
from toolbox.planner.spec import REFERENCES, from_config, model_spec
from toolbox.planner.traffic import sharded_traffic
from train.metrics import read_metrics

STRATEGY_RUNS = {  # name -> (processes, trainer overrides, the planner's parallelism at the trainer's micro-batch)
    "ddp": (2, ["--parallel.strategy=ddp"], Parallelism("ddp", micro_batch=4)),
    "fsdp": (2, ["--parallel.strategy=fsdp"], Parallelism("fsdp", micro_batch=4)),
    "hsdp": (
        2,
        ["--parallel.strategy=hsdp", "--parallel.replicate_size=1", "--parallel.shard_size=2"],
        Parallelism("hsdp", shard_size=2, micro_batch=4),
    ),
    "tp2": (2, ["--parallel.strategy=fsdp", "--parallel.tp_size=2"], Parallelism("fsdp", tp=2, micro_batch=4)),
    "cp2": (2, ["--parallel.strategy=fsdp", "--parallel.cp_size=2"], Parallelism("fsdp", cp=2, micro_batch=4)),
    "pp2": (2, ["--parallel.strategy=fsdp", "--parallel.pp_size=2"], Parallelism("fsdp", pp=2, micro_batch=4)),
    "pp2-x-dp2": (
        4,
        ["--parallel.strategy=fsdp", "--parallel.pp_size=2", "--batch.micro_batch_size=2"],
        Parallelism("fsdp", pp=2, micro_batch=2),
    ),
    "ep2": (2, ["--parallel.strategy=fsdp", "--parallel.ep_size=2"], Parallelism("fsdp", ep=2, micro_batch=4)),
    "zero1": (2, ["--parallel.strategy=deepspeed", "--parallel.zero_stage=1"], Parallelism("zero1", micro_batch=4)),
    "zero2": (2, ["--parallel.strategy=deepspeed", "--parallel.zero_stage=2"], Parallelism("zero2", micro_batch=4)),
    "zero3": (2, ["--parallel.strategy=deepspeed", "--parallel.zero_stage=3"], Parallelism("zero3", micro_batch=4)),
    "ddp-4": (4, ["--parallel.strategy=ddp", "--batch.micro_batch_size=2"], Parallelism("ddp", micro_batch=2)),
    "fsdp-4": (4, ["--parallel.strategy=fsdp", "--batch.micro_batch_size=2"], Parallelism("fsdp", micro_batch=2)),
    "hsdp-2x2": (
        4,
        [
            "--parallel.strategy=hsdp",
            "--parallel.replicate_size=2",
            "--parallel.shard_size=2",
            "--batch.micro_batch_size=2",
        ],
        Parallelism("hsdp", shard_size=2, micro_batch=2),
    ),
}


def measured_run(data_dir, out, preset, processes, overrides) -> dict:
    """Memory the trainer logs and bytes its second step sends (rank 0), counted by toolbox/planner/traffic_probe."""
    args = [str(out / "traffic.json"), *base_args(data_dir, out, steps=2), f"--model.preset={preset}", *overrides]
    result = ranks.run_main("toolbox.planner.traffic_probe", args, nproc=processes, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    row = read_metrics(out)[-1]
    sent = json.loads((out / "traffic.json.rank0").read_text())
    return {"params": row["param_mib"], "state": row["state_mib"], "bytes": sent["bytes"]}


@pytest.mark.distributed
@pytest.mark.parametrize("preset", ["small"])  # one preset: every strategy is a run of its own
def test_predicted_memory_and_traffic_per_rank_match_real_runs_within_10_percent(data_dir, tmp_path, preset):
    names = list(STRATEGY_RUNS)
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        names = [name for name in names if not name.startswith("zero")]
    for name in names:
        processes, overrides, parallelism = STRATEGY_RUNS[name]
        measured = measured_run(data_dir, tmp_path / name, preset, processes, overrides)
        # the trainer's CPU runs: fp32, the test corpus's byte vocabulary, 8 sequences of 64 a step
        job = Job(
            from_config(preset, preset_config(preset, vocab_size=260)),
            Cluster(GPUS["h100"], FABRICS["roce400"]),
            gpus=processes,
            seq_len=64,
            global_batch_tokens=8 * 64,
            model_bytes=4,
        )
        predicted = estimate(job, parallelism)
        state = (
            predicted.memory_gib["params"] + predicted.memory_gib["grads"] + predicted.memory_gib["optimizer"]
        ) * 1024
        assert abs(state / measured["state"] - 1) < 0.10, (name, state, measured)
        assert abs(predicted.memory_gib["params"] * 1024 / measured["params"] - 1) < 0.10, (name, predicted, measured)
        sent = sum(t.bytes_per_step for t in predicted.traffic)
        assert abs(sent / measured["bytes"] - 1) < 0.10, (name, sent, measured, predicted.traffic)


@pytest.mark.compat
def test_parameter_counts_match_the_model_and_the_publications():
    import torch

    from model import GrokForCausalLM, count_parameters

    for name in ("grok-1", "grok-2", "small"):
        with torch.device("meta"):
            counts = count_parameters(GrokForCausalLM(preset_config(name)))
        spec = model_spec(name)
        assert spec.params_total == pytest.approx(counts.total, rel=2e-3)
        assert spec.params_active == pytest.approx(counts.active, rel=3e-3)
    assert REFERENCES["llama3-405b"].params_total == pytest.approx(405e9, rel=0.01)
    assert REFERENCES["deepseek-v3"].params_total == pytest.approx(671e9, rel=0.01)
    assert REFERENCES["deepseek-v3"].params_active == pytest.approx(37e9, rel=0.02)
    assert REFERENCES["megatron-1t"].params_total == pytest.approx(1.008e12, rel=0.01)


@pytest.mark.parametrize("run", RUNS, ids=[run.name for run in RUNS])
def test_published_runs_are_predicted_within_20_percent(run):
    predicted = run.predicted()
    assert abs(predicted / run.figure - 1) < 0.20, (run.name, predicted, run.figure)


@pytest.mark.parametrize("run", RUNS, ids=[run.name for run in RUNS])
def test_search_ranks_the_published_parallelism_within_15_percent_of_its_best(run):
    published = run.estimate()
    best = search(run.job(), top=1)[0]
    assert published.tokens_per_s >= 0.85 * best.tokens_per_s, (run.name, best.parallelism.describe())


def test_a_published_parallelism_keeps_what_its_paper_states_and_fills_in_only_what_it_leaves_open():
    llama, deepseek = RUNS[0], RUNS[3]
    filled = llama.estimate().parallelism
    assert (filled.tp, filled.pp, filled.schedule, filled.checkpointing) == (8, 16, "interleaved", "none")
    # any depth that leaves each of a rank's chunks a layer (126 layers on 16 stages: 2 to 7)
    assert filled.virtual_stages in range(2, 8) and filled.virtual_stages != llama.parallelism.virtual_stages
    stated = deepseek.estimate().parallelism
    assert (stated.pp, stated.ep, stated.schedule, stated.checkpointing) == (16, 64, "dualpipe", "selective")
    # the search finds what DeepSeek-V3 found: with DualPipe, experts spread over many nodes pay (its best DualPipe
    # layout is within 3% of the best of any schedule, an interleaved one with fewer experts a rank)
    ranked = search(deepseek.job())
    dualpipe = next(result for result in ranked if result.parallelism.schedule == "dualpipe")
    assert dualpipe.parallelism.ep >= 64 and dualpipe.tokens_per_s >= 0.97 * ranked[0].tokens_per_s


def test_the_step_breakdown_adds_up_to_the_step():
    job = RUNS[0].job()
    for parallelism in (
        Parallelism("zero1", tp=8, pp=16, schedule="interleaved", virtual_stages=4),  # sends exposed in fill and drain
        Parallelism("fsdp", tp=8, pp=16, micro_batch=1),
        Parallelism("zero3", tp=8, checkpointing="full"),
    ):
        result = estimate(job, parallelism)
        assert result.bubble_s > 0 or parallelism.pp == 1
        parts = result.compute_s + result.optimizer_s + result.bubble_s + result.exposed_comm_s
        assert result.optimizer_s > 0 and result.step_s == pytest.approx(parts, rel=1e-12)


def test_dualpipe_hides_the_all_to_all_behind_the_other_micro_batch_at_twice_the_parameters():
    deepseek = RUNS[3]
    job, dualpipe = deepseek.job(), deepseek.parallelism
    one_f_one_b = estimate(job, replace(dualpipe, schedule="1f1b"))
    two = estimate(job, dualpipe)
    by_name = {t.name: t for t in two.traffic}
    assert (
        one_f_one_b.traffic[0].name == "ep all-to-all"
        and one_f_one_b.traffic[0].exposed_s > 0.3 * one_f_one_b.compute_s
    )
    assert by_name["ep all-to-all"].exposed_s == 0.0  # ~1:1 with the compute, as DeepSeek reports, so hidden
    assert two.memory_gib["params"] == pytest.approx(2 * one_f_one_b.memory_gib["params"], rel=0.01)
    # its compute runs on the SMs the communication leaves (20 of 132), paced by its busiest pair of stages
    paces = [slowest_stage(job.spec, 16, schedule, job.seq_len) for schedule in ("1f1b", "dualpipe")]
    assert two.compute_s == pytest.approx(one_f_one_b.compute_s / paces[0] * paces[1] / (1 - 20 / 132), rel=1e-6)
    # the bubble: (pp/2 - 1)(F&B + B - 3W) against 1F1B's (pp - 1)(F + B), in micro-batch times
    work = work_flops_per_token(job.spec, job.seq_len, "selective")
    forward = forward_flops_per_token(job.spec, job.seq_len) / work
    weights = 2 * (job.spec.params_active + job.spec.mtp_params_active) / work
    idle = bubble(16, "dualpipe", 1, forward, weights)
    assert idle == pytest.approx(7 * (1 + (1 - forward) - 3 * weights))
    assert bubble(16, "1f1b", 1, forward, weights) == 15 and 0 < idle < 0.5 * 15
    assert two.bubble_s == pytest.approx(idle * two.compute_s / two.micro_batches)  # nothing exposed per micro-batch
    with pytest.raises(
        InvalidParallelism, match="dualpipe"
    ):  # 120 sequences per dp rank in micro-batches of 4: 30 < 2 x pp
        estimate(job, replace(dualpipe, micro_batch=4))


def test_a_pipeline_runs_at_the_pace_of_its_busiest_rank():
    # Megatron-LM's 1T GPT: 128 layers on 64 stages, two each; the last also holds the output matrix (a sixth
    # of a layer: 6 V h = 7.9 GFLOP a token against 47.5), so it sets the pace: 2.165 layers against 2.003
    megatron = REFERENCES["megatron-1t"]
    assert slowest_stage(megatron, 64, "1f1b", 2048) == pytest.approx(2.165 / 2.0026, rel=0.002)
    assert slowest_stage(megatron, 32, "interleaved", 2048) == pytest.approx(4.165 / (128.165 / 32), rel=0.002)
    assert slowest_stage(megatron, 1, "1f1b", 2048) == 1.0
    # DeepSeek-V3's last stage holds the output matrix and the multi-token-prediction module (~3.9 layers):
    # on 16 stages it is as busy as 4.9 layers against 4.06; DualPipe pairs it with the first stage
    deepseek = REFERENCES["deepseek-v3"]
    assert slowest_stage(deepseek, 16, "1f1b", 4096) > 1.15
    assert 1.0 < slowest_stage(deepseek, 16, "dualpipe", 4096) < 1.15


@pytest.mark.parametrize("run", [run for run in RUNS if run.model == "llama3-405b"], ids=lambda run: run.name)
def test_the_search_pipelines_llama3_as_meta_did(run):
    # ZeRO-3 without a pipeline looks as fast only if its gathers could hide behind the whole step's compute;
    # phase by phase, a forward's gathers have only the forward to hide behind
    # (at 128K the best trades some of Meta's pipeline depth for more context parallelism: pp 8, cp 32)
    best = search(run.job(), top=1)[0]
    layout = best.parallelism
    assert (layout.tp, layout.data_parallel) == (8, "zero1") and layout.pp >= 8, layout.describe()
    assert layout.pp == 16 or run.seq_len > 8192, layout.describe()


def test_sharded_gathers_hide_only_behind_their_own_phase():
    # One H100 node's worth of fabric: Llama 3 405B under ZeRO-3 with tp 8 over 16 nodes, one 8K sequence a
    # step. The forward's gather of a tp rank's 50.6B bf16 weights takes ~2.4 s on 40 GB/s but its compute
    # ~1.3 s: ~1.1 s of it is exposed however long the backward that follows.
    job = Job(REFERENCES["llama3-405b"], Cluster(GPUS["h100"], FABRICS["roce400"]), 128, 8192, 16 * 8192)
    result = estimate(job, Parallelism("zero3", tp=8, checkpointing="selective"))
    gather = next(t for t in result.traffic if t.name.startswith("dp all-gather"))
    forward = (
        result.compute_s * forward_flops_per_token(job.spec, 8192) / work_flops_per_token(job.spec, 8192, "selective")
    )
    one_gather = gather.seconds / 2  # once for the forward, once for the backward (beyond the reuse distance)
    assert one_gather > forward and gather.exposed_s >= one_gather - forward
    assert result.step_s >= result.compute_s + one_gather - forward


def test_fsdp_reduces_in_the_last_backward_only_and_later_collectives_get_what_it_leaves():
    # Two FSDP groups on one link, 4 micro-batches, 10 layers: each forward has 1 s of compute, each backward 3 s.
    # The dense group's 2 s reduce-scatter runs in the last backward only (after its 0.5 s re-gather), so the
    # experts' re-gathers hide in every backward but their 1 s reduce-scatter finds the last one used up.
    windows = {"forward": 1.0, "backward": 3.0, "last backward": 3.0}
    fsdp = Parallelism("fsdp")
    dense = sharded_traffic(fsdp, "dense", "fabric", 4, (0.5, 1.0), (2.0, 1.0), windows, 10, 1e9)
    experts = sharded_traffic(fsdp, "experts", "fabric", 4, (0.5, 1.0), (1.0, 1.0), windows, 10, 1e9)
    assert [t.seconds for t in dense] == [4.0, 2.0]  # a gather for each forward and each backward; one reduce
    assert [t.exposed_s for t in dense] == pytest.approx([0.05, 0.2])  # only the layer with nothing before it
    assert [t.exposed_s for t in experts] == pytest.approx([0.05, 1.0])
    assert windows == pytest.approx({"forward": 0.0, "backward": 2.0, "last backward": 0.0})
    # ZeRO-3 reduces in every backward and, within its reuse distance, gathers once a micro-batch: pieces of 1e7
    # parameters fit its 5e7 prefetch bucket and hide
    windows = {"forward": 1.0, "backward": 3.0, "last backward": 3.0}
    zero3 = sharded_traffic(Parallelism("zero3"), "dense", "fabric", 4, (0.5, 1.0), (2.0, 1.0), windows, 10, 1e8)
    assert [t.seconds for t in zero3] == [2.0, 8.0] and [t.exposed_s for t in zero3] == pytest.approx([0.05, 0.2])
    # pieces of 1e8 are gathered half ahead, half on demand: 4 x 0.25 s exposed, and the first piece
    windows = {"forward": 1.0, "backward": 3.0, "last backward": 3.0}
    zero3 = sharded_traffic(Parallelism("zero3"), "dense", "fabric", 4, (0.5, 1.0), (2.0, 1.0), windows, 10, 1e9)
    assert [t.exposed_s for t in zero3] == pytest.approx([1.05, 0.2])


def test_fsdp_over_the_whole_of_colossus_is_bound_by_its_all_gathers():
    # Every GPU gathers Grok-1's 631 GB of bf16 weights for each forward and again for each backward through a
    # ~50 GB/s NIC: ~25 s of traffic against ~8 s of compute (one 8K sequence per GPU, 819M tokens a step).
    job = Job(model_spec("grok-1"), Cluster(GPUS["h100"], FABRICS["roce400"]), 100_000, 8192, 100_000 * 8192)
    fsdp = estimate(job, Parallelism("fsdp", checkpointing="full"))
    gathers = sum(t.bytes_per_step for t in fsdp.traffic if "all-gather" in t.name)
    assert gathers == pytest.approx(2 * 2 * model_spec("grok-1").params_total, rel=0.01)
    assert fsdp.fits and fsdp.exposed_comm_s > 3 * fsdp.compute_s and fsdp.mfu < 0.15
    ddp = estimate(job, Parallelism("ddp", checkpointing="full"))
    assert not ddp.fits and ddp.memory_gib["optimizer"] > 2000  # 8 bytes of AdamW state x 315.7B on every GPU
    best = search(job, top=1)[0]  # expert parallelism keeps each GPU's gathers to its own experts
    # (exposed: what the compute does not hide, and the SMs the hidden collectives hold)
    assert best.parallelism.ep > 1 and best.mfu > 0.3 and best.exposed_comm_s < 0.15 * best.step_s


@pytest.mark.compat
@pytest.mark.distributed  # runs a command in a fresh interpreter
def test_cli_prints_json_with_the_fields_and_exits_1_when_it_does_not_fit():
    run = subprocess.run(
        [
            sys.executable,
            "scripts/plan.py",
            "--model",
            "grok-1",
            "--gpus",
            "8",
            "--gpu",
            "h100",
            "--strategy",
            "ddp",
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stderr
    row = json.loads(run.stdout)
    assert row["fits"] is False and {"tflops_per_gpu", "mfu", "step_s", "exposed_comm_s", "mem_gib"} <= set(row)
    ranked = in_process(plan.main, "--model", "llama3-405b", "--gpus", "8192", "--search", "--top", "3", "--json")
    rows = [json.loads(line) for line in ranked.stdout.splitlines()]
    assert ranked.returncode == 0 and len(rows) == 3 and all(r["fits"] for r in rows)
    assert rows[0]["tflops_per_gpu"] >= rows[1]["tflops_per_gpu"] >= rows[2]["tflops_per_gpu"]
    bad = in_process(plan.main, "--model", "grok-1", "--gpus", "12", "--tp", "8")
    assert bad.returncode == 2 and "does not divide 12 GPUs" in bad.stderr


def test_the_flags_the_planner_prints_make_the_trainer_build_its_layout():
    from train.config import load_config
    from train.parallel import Layout, layout_of

    job = Job(from_config("tiny", preset_config("tiny")), Cluster(GPUS["h100"], FABRICS["roce400"]), 16, 4096)
    cases = {
        Parallelism("fsdp", tp=2, cp=2, ep=4, micro_batch=2): (1, 4, 2, 4, 2),
        Parallelism("hsdp", cp=2, shard_size=2, micro_batch=1): (4, 2, 1, 1, 2),
        Parallelism("zero2", micro_batch=4): (1, 16, 1, 1, 1),
    }
    for parallelism, (replicate, shard, tp, ep, cp) in cases.items():
        config = load_config(REPO / "configs" / "tiny.toml", trainer_flags(job, parallelism, 2**20))
        layout = layout_of(config, job.gpus, 8)
        assert (layout.dp_replicate, layout.dp_shard, layout.tp, layout.ep, layout.cp) == (replicate, shard, tp, ep, cp)
        assert config.batch.micro_batch_size == parallelism.micro_batch and config.data.seq_len == 4096
        assert config.global_batch_sequences() * 4096 == 2**20
    interleaved = Parallelism("fsdp", pp=2, tp=2, schedule="interleaved", virtual_stages=2, micro_batch=1)
    config = load_config(REPO / "configs" / "tiny.toml", trainer_flags(job, interleaved, 2**20))
    assert layout_of(config, job.gpus, 8) == Layout(1, 4, 2, 1, pp=2)
    assert (config.parallel.pp_schedule, config.parallel.pp_virtual_stages) == ("interleaved", 2)
    assert trainer_flags(job, Parallelism("zero1", tp=2), 2**20) is None  # ZeRO does not split matmuls here
    dualpipe = load_config(
        REPO / "configs" / "tiny.toml", trainer_flags(job, Parallelism("fsdp", pp=2, schedule="dualpipe"), 2**20)
    )
    assert layout_of(dualpipe, job.gpus, 8) == Layout(1, 8, 1, 1, pp=2) and dualpipe.parallel.pp_schedule == "dualpipev"


@pytest.mark.distributed
def test_the_best_layout_for_tiny_on_4_ranks_runs_with_the_flags_the_search_prints(data_dir, tmp_path):
    searched = in_process(
        plan.main,
        "--model",
        "tiny",
        "--gpus",
        "4",
        "--seq-len",
        "64",
        "--global-batch-tokens",
        "512",
        "--search",
        "--top",
        "500",
        "--json",
    )
    rows = [json.loads(line) for line in searched.stdout.splitlines()]
    best = next((row for row in rows if row["trainer_flags"] is not None), None)  # the best the trainer runs
    assert best is not None, [row["not_runnable"] for row in rows[:3]]
    flags = best["trainer_flags"]
    micro = [flag for flag in flags if flag.startswith("--batch.")]
    single = train(data_dir, tmp_path / "single", *micro, steps=4)
    assert_same_run(train(data_dir, tmp_path / "planned", *flags, nproc=4, steps=4), single)
