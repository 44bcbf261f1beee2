"""The planner's memory per GPU against what published runs measured.

BigScience measured Megatron-DeepSpeed layouts for BLOOM before training it (github.com/bigscience-workshop/
bigscience @9e64ede, train/tr11-176B-ml/chronicles-prequel.md, "48 node contenders", 2022-02-21: 72 layers of
hidden 14336, 64 heads, vocabulary 250k, 2048 tokens, bf16, ZeRO-1, full activation checkpointing; "Mem" is the
first or last stage's, which hold the embedding). torchtitan measured Llama 3.1 8B under FSDP2 on H100s
(github.com/pytorch/torchtitan @b5bcd76, benchmarks/llama3_h100_202412_torchtitan.md, tables 1 and 3: bf16,
eager, selective activation checkpointing, local batch 2 of 8192 tokens). Both report what the GPU held, the
CUDA context and the caching allocator's spare blocks included, which the planner leaves to its 10% margin
(hardware.GPU.usable_memory_gib): its figure is up to a fifth below theirs, never above.
"""

import pytest

from toolbox.planner.hardware import FABRICS, GIB, GPUS, Cluster
from toolbox.planner.heldout import gpt
from toolbox.planner.job import Job, Parallelism
from toolbox.planner.layout import estimate
from toolbox.planner.software import SOFTWARE
from toolbox.planner.spec import ModelSpec

BLOOM_CONTENDER = gpt("BLOOM contender", 72, 14336, 64, vocab=250680)
LLAMA_3_1_8B = ModelSpec("Llama 3.1 8B", 32, 4096, 32, 8, 128, 128256, 14336)


@pytest.mark.parametrize(
    ("dp", "pp", "micro_batch", "measured_gb"),
    [(4, 12, 1, 29), (4, 12, 2, 37), (4, 12, 4, 49), (4, 12, 8, 69), (8, 6, 1, 38), (8, 6, 2, 44), (8, 6, 4, 56)],
)
def test_megatron_deepspeed_memory_matches_bigscience_measurements(dp, pp, micro_batch, measured_gb):
    cluster = Cluster(GPUS["a100"], FABRICS["opa-4x100"])
    job = Job(BLOOM_CONTENDER, cluster, dp * 8 * pp, 2048, 2048 * 2048, software=SOFTWARE["megatron-deepspeed"])
    predicted = estimate(job, Parallelism("zero1", tp=8, pp=pp, micro_batch=micro_batch, checkpointing="full"))
    ratio = predicted.mem_gib * GIB / 1e9 / measured_gb
    assert 0.8 <= ratio <= 1.0, (predicted.memory_gib, measured_gb)


def test_the_checkpointed_inputs_are_what_grows_with_the_micro_batch():
    # BigScience's 8 sequences a micro-batch took 40 GB more than 1 on 12 stages: each of a stage's 6 layers keeps
    # its input, whole on every tp rank (no sequence parallelism), for the 12 micro-batches 1F1B holds
    cluster = Cluster(GPUS["a100"], FABRICS["opa-4x100"])
    job = Job(BLOOM_CONTENDER, cluster, 384, 2048, 2048 * 2048, software=SOFTWARE["megatron-deepspeed"])
    one, eight = (
        estimate(job, Parallelism("zero1", tp=8, pp=12, micro_batch=size, checkpointing="full")) for size in (1, 8)
    )
    grown = (eight.memory_gib["activations"] - one.memory_gib["activations"]) * GIB
    checkpoints = 7 * 6 * 12 * 2048 * 14336 * 2  # the rest: the layer being recomputed, the logits
    assert 0.75 * grown < checkpoints < grown and 0.8 * 40e9 <= grown <= 40e9


@pytest.mark.parametrize(("gpus", "measured_gib"), [(8, 82.4), (128, 67.0)])
def test_fsdp_memory_matches_torchtitan_measurements(gpus, measured_gib):
    job = Job(LLAMA_3_1_8B, Cluster(GPUS["h100"], FABRICS["roce400"]), gpus, 8192, gpus * 2 * 8192)
    job = Job(job.spec, job.cluster, gpus, 8192, gpus * 2 * 8192, software=SOFTWARE["pytorch-fsdp"])
    predicted = estimate(job, Parallelism("fsdp", micro_batch=2, checkpointing="selective"))
    assert 0.8 <= predicted.mem_gib / measured_gib <= 1.0, predicted.memory_gib
