"""Software profiles: a plan assumes one named training stack, and the search tries only what that stack
offers (its data-parallel kinds, schedules, model-parallel dimensions and checkpointing), with its kernels."""

import json
from dataclasses import replace

import pytest
from conftest import in_process

from toolbox import plan
from toolbox.planner.hardware import FABRICS, GPUS, Cluster
from toolbox.planner.job import Job, Parallelism
from toolbox.planner.layout import estimate
from toolbox.planner.search import candidates, search
from toolbox.planner.software import SOFTWARE
from toolbox.planner.spec import model_spec


def grok_job(software: str, gpus: int = 2048) -> Job:
    return Job(model_spec("grok-1"), Cluster(GPUS["h100"], FABRICS["roce400"]), gpus, 8192, software=SOFTWARE[software])


def test_the_search_tries_only_what_the_software_offers():
    for name in ("megatron-lm-2021", "deepseek", "pytorch-fsdp", "megatron-core"):
        profile = SOFTWARE[name]
        found = search(grok_job(name, gpus=1024), fitting_only=False)
        assert found, name
        for result in found:
            layout = result.parallelism
            assert layout.data_parallel in profile.data_parallel and layout.checkpointing in profile.checkpointing
            assert layout.schedule in profile.schedules
            split = {dimension for dimension in ("tp", "pp", "ep", "cp") if getattr(layout, dimension) > 1}
            assert split <= set(profile.model_parallel), (name, layout)
    assert any(r.parallelism.schedule == "dualpipe" for r in search(grok_job("deepseek"), fitting_only=False))


def test_a_profile_without_flash_attention_keeps_the_attention_scores():
    layout = Parallelism("ddp", tp=8, pp=16, checkpointing="full")
    modern, old = (estimate(grok_job(name), layout) for name in ("megatron-core", "megatron-lm-2021"))
    assert old.memory_gib["activations"] > modern.memory_gib["activations"]
    assert estimate(replace(grok_job("any")), layout).memory_gib["activations"] == modern.memory_gib["activations"]


def test_a_megatron_stack_keeps_bf16_weights_and_an_fp32_gradient_buffer():
    layout = Parallelism("ddp", tp=8, pp=16)
    megatron, trainer = (estimate(grok_job(name), layout).memory_gib for name in ("megatron-core", "minicolossus"))
    # 2 + 4 + 12 bytes a parameter (BigScience's "18 bytes"), against this trainer's fp32 4 + 4 + 8
    assert megatron["params"] == pytest.approx(trainer["params"] / 2)
    assert megatron["grads"] == pytest.approx(trainer["grads"])
    assert megatron["optimizer"] == pytest.approx(trainer["optimizer"] * 12 / 8)


def test_the_cli_plans_for_a_named_software_and_refuses_an_unknown_one():
    args = ("--model", "grok-1", "--gpus", "16384", "--search", "--top", "3", "--json")
    result = in_process(plan.main, *args, "--software", "pytorch-fsdp", "--global-batch-tokens", "134217728")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 0 and rows, result.stderr
    assert all(row["software"] == "pytorch-fsdp" and row["tp"] == row["pp"] == 1 for row in rows)
    unknown = in_process(plan.main, "--model", "grok-1", "--gpus", "8", "--software", "jax")
    assert unknown.returncode == 2 and "--software" in unknown.stderr


def test_a_stack_that_reduces_after_the_backward_exposes_the_whole_all_reduce():
    layout = Parallelism("ddp", tp=8, pp=16, checkpointing="full")
    for name, exposed_whole in (("megatron-lm-2021", True), ("megatron-core", False)):
        reduce = next(t for t in estimate(grok_job(name), layout).traffic if t.name.startswith("dp all-reduce"))
        assert (reduce.exposed_s == reduce.seconds) == exposed_whole, (name, reduce)


def test_megatron_cuts_even_stages_where_other_stacks_take_any_depth():
    # Grok-1, 64 layers: Megatron-LM asserts layers % (pp x v) == 0; Meta's and this trainer's stacks do not
    job = Job(model_spec("grok-1"), Cluster(GPUS["h100"], FABRICS["roce400"]), 1536, 8192, 1536 * 8192)
    megatron = [p for p in candidates(replace(job, software=SOFTWARE["megatron-core"])) if p.pp > 1]
    assert megatron and all(64 % (p.pp * p.virtual_stages) == 0 for p in megatron)
    uneven = {(p.pp, p.virtual_stages) for p in candidates(replace(job, software=SOFTWARE["minicolossus"]))}
    assert (3, 7) in uneven and (3, 21) in uneven and (3, 22) not in uneven  # 64 layers: a layer a chunk at most
