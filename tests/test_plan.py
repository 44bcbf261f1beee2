"""The Colossus planner: its per-rank state bytes are calibrated against what the trainer measures, and its
verdicts for Grok-1 at Colossus scale are the ones arithmetic gives."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, base_args, in_process
from train import plan
from train.metrics import read_metrics

STRATEGY_RUNS = {  # name -> (trainer overrides on 2 processes, the planner's arguments)
    "ddp": (["--parallel.strategy=ddp"], {"strategy": "ddp"}),
    "fsdp": (["--parallel.strategy=fsdp"], {"strategy": "fsdp"}),
    "hsdp": (["--parallel.strategy=hsdp", "--parallel.replicate_size=1", "--parallel.shard_size=2"],
             {"strategy": "hsdp"}),
    "tp2": (["--parallel.strategy=fsdp", "--parallel.tp_size=2"], {"strategy": "fsdp", "tp": 2}),
    "ep2": (["--parallel.strategy=fsdp", "--parallel.ep_size=2"], {"strategy": "fsdp", "ep": 2}),
    "zero1": (["--parallel.strategy=deepspeed", "--parallel.zero_stage=1"], {"strategy": "zero1"}),
    "zero2": (["--parallel.strategy=deepspeed", "--parallel.zero_stage=2"], {"strategy": "zero2"}),
    "zero3": (["--parallel.strategy=deepspeed", "--parallel.zero_stage=3"], {"strategy": "zero3"}),
}


def measured_state_mib(data_dir, out, preset, overrides) -> float:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train",
               *base_args(data_dir, out, steps=1), f"--model.preset={preset}", *overrides]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return read_metrics(out)[-1]["state_mib"]


@pytest.mark.parametrize("preset", ["small"])  # one preset: every strategy is a 2-process run of its own
def test_predicted_state_per_rank_matches_the_trainer_within_10_percent(data_dir, tmp_path, preset):
    names = list(STRATEGY_RUNS)
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        names = [name for name in names if not name.startswith("zero")]
    for name in names:
        overrides, planned = STRATEGY_RUNS[name]
        measured = measured_state_mib(data_dir, tmp_path / name, preset, overrides)
        predicted = plan.plan(preset, 2, "cpu", seq_len=64, shard_size=2, dtype="fp32", vocab_size=260,
                              **planned)["state_gib"] * 1024
        assert abs(predicted / measured - 1) < 0.10, (name, predicted, measured)


def test_grok1_at_colossus_scale():
    ddp = plan.plan("grok-1", 100_000, "h100", "ddp", activation_checkpointing=True)
    assert not ddp["fits"] and ddp["state_gib"] > 4000  # 16 bytes x 315.7B parameters on every GPU
    fsdp = plan.plan("grok-1", 100_000, "h100", "fsdp", activation_checkpointing=True, token_budget=6e12)
    assert fsdp["fits"]
    tokens_per_day = 100_000 * 989e12 * 0.4 / fsdp["flops_per_token"] * 86400
    assert fsdp["days"] == pytest.approx(6e12 / tokens_per_day)
    # 100,000 GPUs each need a sequence per step: the global batch is at least 100,000 x 8192 tokens
    assert fsdp["global_batch_tokens"] == 100_000 * 8192
    h200 = plan.plan("grok-1", 16, "h200", "zero3")  # 2 nodes of H200: 315.7B x 16 bytes / 16 GPUs
    assert not h200["fits"] and h200["state_gib"] == pytest.approx(315.68e9 * 16 / 16 / 2**30, rel=0.01)


def test_cli_prints_json_and_exits_1_when_it_does_not_fit():
    run = subprocess.run([sys.executable, "scripts/plan.py", "--model", "grok-1", "--gpus", "8", "--gpu", "h100",
                          "--strategy", "ddp", "--json"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and json.loads(run.stdout)["fits"] is False
    bad = in_process(plan.main, "--model", "grok-1", "--gpus", "12", "--strategy", "hsdp")
    assert bad.returncode == 2 and "not a multiple of --shard-size 8" in bad.stderr
