"""The planner's compute by shape and collectives by size, against the published figures they come from."""

import pytest

from toolbox.planner import collectives, compute
from toolbox.planner.hardware import FABRICS, GPUS, Cluster
from toolbox.planner.job import Job, Parallelism
from toolbox.planner.software import SOFTWARE
from toolbox.planner.spec import REFERENCES


@pytest.mark.parametrize(
    ("gpu", "size", "share"),
    [("a100", 1024, 0.38), ("a100", 2048, 0.71), ("a100", 16384, 0.82), ("h100", 2048, 0.68), ("h100", 16384, 0.80)],
)
def test_a_square_gemm_sustains_what_the_published_sweep_measured(gpu, size, share):
    assert compute.gemm_efficiency(GPUS[gpu], size, size, size) == pytest.approx(share, rel=0.01)


def test_small_and_skinny_gemms_sustain_less_than_large_ones():
    h100 = GPUS["h100"]
    assert compute.gemm_efficiency(h100, 512, 512, 512) < compute.gemm_efficiency(h100, 1024, 1024, 1024) / 2
    # between two sweep points: in between, log-interpolated
    middle = compute.gemm_efficiency(h100, 2896, 2896, 2896)  # ~2^11.5
    assert 0.68 < middle < 0.75
    # a GEMM two tokens wide reads its whole weight for 2 x 2 x n FLOPs: bound by HBM, a sliver of the peak
    assert compute.gemm_efficiency(h100, 2, 8192, 8192) < 0.01
    # a dimension that is not a whole number of 128-wide tiles pays for the rest of the tile
    assert compute.gemm_efficiency(h100, 8192, 8192 + 1, 8192) < 0.995 * compute.gemm_efficiency(h100, 8192, 8192, 8192)


def job_with(software: str, gpu: str = "h100", seq_len: int = 8192) -> Job:
    return Job(
        REFERENCES["llama3-405b"], Cluster(GPUS[gpu], FABRICS["roce400"]), 8192, seq_len, software=SOFTWARE[software]
    )


def test_attention_costs_what_its_kernel_sustains():
    spec, layout = REFERENCES["llama3-405b"], Parallelism("zero1", tp=8)
    tokens = 8192
    meta, flash3 = (compute.attention_core_s(spec, job_with(name), layout, tokens) for name in ("llama3", "any"))
    minicolossus = compute.attention_core_s(spec, job_with("minicolossus"), layout, tokens)
    assert minicolossus / flash3 == pytest.approx(0.55 / 0.35)  # SDPA's FlashAttention-2 on Hopper
    assert meta == flash3  # Meta's Hopper-class kernel
    # an A100 runs FlashAttention-2 at 55% of its peak: a third of the H100's FLOP/s, so ~2x the time
    a100 = compute.attention_core_s(spec, job_with("any", "a100"), layout, tokens)
    assert a100 / flash3 == pytest.approx(989e12 * 0.55 / (312e12 * 0.55))
    # unfused attention writes T x T scores: at 8K they cost more than the fused kernel's whole time
    unfused = compute.attention_core_s(spec, job_with("megatron-lm-2021"), layout, tokens)
    assert unfused > 2 * flash3


def test_elementwise_work_is_memory_traffic_split_as_the_software_splits_it():
    spec = REFERENCES["llama3-405b"]
    with_sp, without_sp = job_with("megatron-core"), job_with("megatron-lm-2021")
    layout = Parallelism("zero1", tp=8)
    split = compute.elementwise_bytes_per_token(spec, with_sp, layout, moe=False)
    replicated = compute.elementwise_bytes_per_token(spec, without_sp, layout, moe=False)
    # norms and residuals (4 h of norms x 5 passes, 2 adds x 5) on every tp rank without sequence parallelism,
    # plus the 2021 stack's unfused T x T scores
    scores = spec.heads / 8 * 8192 * compute.UNFUSED_SCORE_BYTES
    assert replicated - scores - split == pytest.approx(2 * (2 * 5 + 2 * 5) * spec.hidden * (1 - 1 / 8))
    full = compute.elementwise_bytes_per_token(spec, with_sp, Parallelism("zero1", tp=8, checkpointing="full"), False)
    assert split < full < 1.5 * split  # a recompute repeats the forward's passes only


def test_the_optimizer_step_streams_its_state_once():
    h100 = GPUS["h100"]
    assert compute.optimizer_step_s(h100, 1e9) == pytest.approx(30e9 / (3.35e12 * 0.87))


@pytest.mark.parametrize(
    ("gpu", "size", "published"),
    [("h100", 16e6, 235e9), ("h100", 1e9, 466e9), ("a100", 16e6, 106e9), ("a100", 1e9, 229e9)],
)
def test_an_all_reduce_inside_a_node_has_the_bus_bandwidth_nccl_measures_by_size(gpu, size, published):
    cluster = Cluster(GPUS[gpu], FABRICS["ib-ndr"])
    kind, bandwidth, latency = cluster.link(8, 1)
    seconds, sent = collectives.all_reduce(size, 8, bandwidth, latency)
    # within a third: H100's NVLS all-reduce (480 GB/s) beats the ring (~370) the planner assumes for every collective
    assert kind == "nvlink" and sent / seconds == pytest.approx(published, rel=0.33)


def test_a_ring_across_many_nodes_pays_a_step_per_rank():
    cluster = Cluster(GPUS["h100"], FABRICS["ib-ndr"])
    kind, bandwidth, latency = cluster.link(2048, 8)
    small, _ = collectives.all_gather(2048 * 1e3, 2048, bandwidth, latency)
    assert kind == "fabric" and small == pytest.approx(2047 * 14e-6, rel=0.1)  # latency, not bandwidth
    tree, _ = collectives.all_reduce(2048 * 1e3, 2048, bandwidth, latency)
    assert tree < small / 10  # an all-reduce climbs a tree instead: log2(n) hops
