"""Published GPU training runs the planner was never tuned to: the held-out check of its predictions.

Frozen before the planner's compute, network and memory models were reworked, from 9 sources. Each run is what
its publication states: the model, the cluster, the layout (knobs it leaves open are `open`, filled as the
search would fill them), the batch, and its figure exactly as printed (`stated`), converted once, here, to
tokens per second per GPU with the publication's own FLOP counting (`tokens_per_gpu_s`; the conversion is in
`stated`). Half or fewer are marked `calibration`: a constant of the planner may be fitted to those, never to
the others, whose error is the one reported. `pair` marks two layouts of one model on one cluster, both
measured: the planner must rank the faster first.

Sources (the row keys are those of the research notes the table was made from):
  S1  Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM",
      arXiv:2104.04473, tables 1 and 2 (TFLOP/s by its eq. 3, recomputation included)
  S2  Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
      arXiv:2205.05198, tables 3 and 5, section 6.3 (iteration times; MFU by model FLOPs, 72 B s l h^2 (...))
  S3  Jiang et al. 2024, "MegaScale", arXiv:2402.15627, tables 1 and 2: the Megatron-LM baseline's tokens/s
  S5  NVIDIA 2024, "Nemotron-4 15B Technical Report", arXiv:2402.16819, table 2 (iteration times)
  S6  NVIDIA 2024, "Nemotron-4 340B Technical Report", arXiv:2406.11704, table 2 (iteration times; read in
      three public transcriptions that agree, not in the primary text)
  S8  BigScience, BLOOM-176B training log, github.com/bigscience-workshop/bigscience train/tr11-176B-ml
      (iteration time at iteration 85376)
  S9  Smith et al. 2022, "Using DeepSpeed and Megatron to Train Megatron-Turing NLG 530B", arXiv:2201.11990,
      section 2.4 (iteration times; as quoted in github.com/cli99/llm-analysis, not the primary text)
  S11 MosaicML llm-foundry, scripts/train/benchmarking/README.md (Apr 2024): tokens/s per GPU
  S14 NVIDIA Megatron-Bridge performance archive, 26.04.01 container: GPT-OSS-120B BF16 tokens/s per GPU
"""

from dataclasses import dataclass

from .job import Parallelism
from .spec import ModelSpec


def gpt(name: str, layers: int, hidden: int, heads: int, vocab: int = 51200, seq_len: int = 2048) -> ModelSpec:
    """A GPT-3-style model: multi-head attention, a 4h GELU FFN (two matrices), a tied embedding."""
    return ModelSpec(
        name, layers, hidden, heads, heads, hidden // heads, vocab, 4 * hidden, seq_len, False, tied_embeddings=True
    )


GPT_1_7B = gpt("GPT 1.7B", 24, 2304, 24)
GPT_7_5B = gpt("GPT 7.5B", 36, 4096, 32)
GPT_18B = gpt("GPT 18.4B", 40, 6144, 48)
GPT_76B = gpt("GPT 76.1B", 60, 10240, 80)
GPT_175B = gpt("GPT-3 175B", 96, 12288, 96)
GPT_310B = gpt("GPT 310B", 96, 16384, 128)
GPT_530B = gpt("GPT 530B", 105, 20480, 128)
GPT_22B = gpt("GPT 22B", 48, 6144, 64)
MEGASCALE_175B = gpt("MegaScale 175B", 96, 12288, 128, vocab=64000)
BLOOM = gpt("BLOOM 176B", 70, 14336, 112, vocab=250680)
MPT_70B = gpt("MPT-70B", 80, 8192, 64, vocab=50368)
MPT_30B = gpt("MPT-30B", 48, 7168, 56, vocab=50368)
# squared-ReLU FFNs (two matrices), GQA, untied; FFN widths as 4h (15B) and 73728 (340B): not stated in the reports
NEMOTRON_15B = ModelSpec("Nemotron-4 15B", 32, 6144, 48, 8, 128, 256000, 24576, 4096, False)
NEMOTRON_340B = ModelSpec("Nemotron-4 340B", 96, 18432, 96, 8, 192, 256000, 73728, 4096, False)
GPT_OSS_120B = ModelSpec("GPT-OSS-120B", 36, 2880, 64, 8, 64, 201088, 0, 4096, experts=128, top_k=4, expert_ffn=2880)


@dataclass(frozen=True)
class HeldOutRun:
    key: str
    source: str
    spec: ModelSpec
    gpu: str
    fabric: str
    gpus: int
    global_batch_sequences: int
    parallelism: Parallelism
    software: str  # the stack that ran it, as the publication names it (what it overlaps is the planner's model)
    stated: str  # the figure as published, and how it becomes tokens/s per GPU
    tokens_per_gpu_s: float
    calibration: bool = False
    pair: str | None = None
    open: tuple[str, ...] = ()  # knobs of `parallelism` the publication leaves open


def eq3_tokens(tflops: float, spec: ModelSpec) -> float:
    """Tokens/s per GPU from Megatron-LM's TFLOP/s (eq. 3: 96 B s l h^2 (1 + s/6h + V/16lh), recompute included)."""
    layers, hidden, seq, vocab = spec.layers, spec.hidden, spec.context, spec.vocab
    return tflops * 1e12 / (96 * layers * hidden**2 * (1 + seq / (6 * hidden) + vocab / (16 * layers * hidden)))


def iteration_tokens(sequences: int, seq_len: int, seconds: float, gpus: int) -> float:
    return sequences * seq_len / seconds / gpus


def mfu_tokens(mfu: float, peak: float, spec: ModelSpec) -> float:
    """Tokens/s per GPU from Korthikanti et al.'s MFU (model FLOPs 72 B s l h^2 (1 + s/6h + V/12lh))."""
    layers, hidden, seq, vocab = spec.layers, spec.hidden, spec.context, spec.vocab
    return mfu * peak / (72 * layers * hidden**2 * (1 + seq / (6 * hidden) + vocab / (12 * layers * hidden)))


MEGATRON_2021 = "Megatron-LM 2021"  # no sequence parallelism, no flash attention, full recompute, DP all-reduce
DEEPSPEED_ZERO3_2021 = "DeepSpeed ZeRO-3 2021"
MEGATRON_2022 = "Megatron-LM 2022"  # + sequence parallelism and selective recompute
MEGATRON_2023 = "Megatron-LM 2023"  # MegaScale's baseline commit
NEMO_2024 = "NeMo / Megatron-Core 2024"
MEGATRON_DEEPSPEED = "Megatron-DeepSpeed 2022"
LLM_FOUNDRY = "llm-foundry (PyTorch FSDP) 2024"
MEGATRON_BRIDGE = "Megatron-Bridge 2026"

S1, S2, S3 = "Narayanan et al. 2021", "Korthikanti et al. 2022", "Jiang et al. 2024 (MegaScale)"
S5, S6, S8 = "Nemotron-4 15B report", "Nemotron-4 340B report", "BLOOM-176B training log"
S9, S11, S14 = "MT-NLG 530B (Smith et al. 2022)", "llm-foundry benchmarks", "Megatron-Bridge performance"

INTERLEAVED = dict(schedule="interleaved")
FULL = dict(checkpointing="full")
SELECTIVE = dict(checkpointing="selective")
DEPTH_OPEN = ("micro_batch", "virtual_stages")


def s1(
    key: str,
    spec: ModelSpec,
    gpus: int,
    batch: int,
    tflops: float,
    calibration: bool = False,
    pair: str | None = None,
    **layout: int | str,
) -> HeldOutRun:
    """A run of Narayanan et al.'s tables: A100s on HDR InfiniBand, full recompute, an interleaved pipeline of
    unstated depth."""
    kind = layout.pop("data_parallel", "ddp")
    open_knobs = DEPTH_OPEN if layout.get("pp", 1) > 1 else ("micro_batch",)
    if "micro_batch" in layout:
        open_knobs = tuple(knob for knob in open_knobs if knob != "micro_batch")
    return HeldOutRun(
        key,
        f"{S1}, table {2 if pair else 1}",
        spec,
        "a100",
        "ib-hdr",
        gpus,
        batch,
        Parallelism(kind, **({**INTERLEAVED} if layout.get("pp", 1) > 1 else {}), **FULL, **layout),
        DEEPSPEED_ZERO3_2021 if kind == "zero3" else MEGATRON_2021,
        f"{tflops} TFLOP/s per GPU (eq. 3)",
        eq3_tokens(tflops, spec),
        calibration,
        pair,
        open_knobs,
    )


RUNS = (
    s1("N1", GPT_1_7B, 32, 512, 137, calibration=True),
    s1("N3", GPT_7_5B, 128, 512, 142, tp=4),
    s1("N4", GPT_18B, 256, 1024, 135, calibration=True, tp=8),
    s1("N6", GPT_76B, 1024, 1792, 140, tp=8, pp=4),
    s1("N8", GPT_310B, 1920, 2160, 155, calibration=True, tp=8, pp=16),
    s1("N10", GPT_175B, 384, 1536, 144, pair="175B on 384 A100", data_parallel="zero3", micro_batch=4),
    s1("N16", GPT_175B, 384, 1536, 153, pair="175B on 384 A100", tp=8, pp=12, micro_batch=1),
    s1("N15", GPT_530B, 2240, 2240, 48, pair="530B on 2240 A100", data_parallel="zero3", micro_batch=1),
    s1("N21", GPT_530B, 2240, 2240, 159, pair="530B on 2240 A100", tp=8, pp=35, micro_batch=1),
    HeldOutRun(
        "K2",
        f"{S2}, table 5",
        GPT_22B,
        "a100",
        "ib-hdr",
        8,
        4,
        Parallelism("ddp", tp=8, micro_batch=4, **SELECTIVE),
        MEGATRON_2022,
        "1.1 s per iteration of 4 x 2048 tokens",
        iteration_tokens(4, 2048, 1.1, 8),
        calibration=True,
    ),
    HeldOutRun(
        "K4",
        f"{S2}, table 5",
        GPT_175B,
        "a100",
        "ib-hdr",
        64,
        64,
        Parallelism("ddp", tp=8, pp=8, virtual_stages=3, micro_batch=1, **INTERLEAVED, **SELECTIVE),
        MEGATRON_2022,
        "13.75 s per iteration of 64 x 2048 tokens",
        iteration_tokens(64, 2048, 13.75, 64),
    ),
    HeldOutRun(
        "K6",
        f"{S2}, table 5",
        GPT_530B,
        "a100",
        "ib-hdr",
        280,
        280,
        Parallelism("ddp", tp=8, pp=35, virtual_stages=3, micro_batch=1, **INTERLEAVED, **SELECTIVE),
        MEGATRON_2022,
        "37.83 s per iteration of 280 x 2048 tokens",
        iteration_tokens(280, 2048, 37.83, 280),
        calibration=True,
    ),
    HeldOutRun(
        "K9",
        f"{S2}, section 6.3",
        GPT_530B,
        "a100",
        "ib-hdr",
        2240,
        2240,
        Parallelism("ddp", tp=8, pp=35, virtual_stages=3, micro_batch=1, **INTERLEAVED, **SELECTIVE),
        MEGATRON_2022,
        "39.15 s per iteration of 2240 x 2048 tokens (MFU 54.2%)",
        iteration_tokens(2240, 2048, 39.15, 2240),
        pair="530B on 2240 A100, recompute",
    ),
    HeldOutRun(
        "K10",
        f"{S2}, abstract",
        GPT_530B,
        "a100",
        "ib-hdr",
        2240,
        2240,
        Parallelism("ddp", tp=8, pp=35, virtual_stages=3, micro_batch=1, **INTERLEAVED, **FULL),
        MEGATRON_2022,
        "MFU 42.1% with full recomputation",
        mfu_tokens(0.421, 312e12, GPT_530B),
        pair="530B on 2240 A100, recompute",
    ),
    *(
        HeldOutRun(
            key,
            f"{S3}, table 2 (Megatron-LM)",
            MEGASCALE_175B,
            "a100",
            "ib-hdr",
            gpus,
            batch,
            Parallelism("zero1", tp=8, pp=8, virtual_stages=6, **INTERLEAVED),
            MEGATRON_2023,
            f"{tokens:,} tokens/s on {gpus} GPUs",
            tokens / gpus,
            calibration=calibration,
            open=("micro_batch",),
        )
        for key, gpus, batch, tokens, calibration in (
            ("M1", 256, 768, 39300, True),
            ("M4", 1024, 768, 132700, False),
            ("M8", 12288, 6144, 1466800, False),
        )
    ),
    *(
        HeldOutRun(
            key,
            f"{S5}, table 2",
            NEMOTRON_15B,
            "h100",
            "ib-ndr",
            gpus,
            batch,
            Parallelism("zero1", tp=8),
            NEMO_2024,
            f"{seconds} s per iteration of {batch} x 4096 tokens",
            iteration_tokens(batch, 4096, seconds, gpus),
            calibration=calibration,
            open=("micro_batch", "checkpointing"),
        )
        for key, gpus, batch, seconds, calibration in (("F1", 768, 384, 0.57, True), ("F3", 2304, 1152, 0.64, False))
    ),
    *(
        HeldOutRun(
            key,
            f"{S6}, table 2",
            NEMOTRON_340B,
            "h100",
            "ib-ndr",
            gpus,
            batch,
            Parallelism("zero1", tp=8, pp=12, **INTERLEAVED),
            NEMO_2024,
            f"{seconds} s per iteration of {batch} x 4096 tokens",
            iteration_tokens(batch, 4096, seconds, gpus),
            calibration=calibration,
            open=("micro_batch", "virtual_stages", "checkpointing"),
        )
        for key, gpus, batch, seconds, calibration in (("G1", 1536, 768, 10.3, True), ("G3", 6144, 2304, 8.0, False))
    ),
    HeldOutRun(
        "B1",
        S8,
        BLOOM,
        "a100",
        "opa-4x100",
        384,
        2048,
        Parallelism("zero1", tp=4, pp=12, micro_batch=2, **FULL),
        MEGATRON_DEEPSPEED,
        "104.70 s per iteration of 2048 x 2048 tokens (149.77 TFLOP/s)",
        iteration_tokens(2048, 2048, 104.70, 384),
        calibration=True,
    ),
    *(
        HeldOutRun(
            key,
            f"{S9}, section 2.4",
            GPT_530B,
            "a100",
            "ib-hdr",
            gpus,
            1920,
            Parallelism("zero1", tp=8, pp=35, **FULL),
            MEGATRON_DEEPSPEED,
            f"{seconds} s per iteration of 1920 x 2048 tokens",
            iteration_tokens(1920, 2048, seconds, gpus),
            calibration=calibration,
            open=("micro_batch",),
        )
        for key, gpus, seconds, calibration in (("T1", 2240, 60.1, True), ("T3", 3360, 44.4, False))
    ),
    *(
        HeldOutRun(
            key,
            S11,
            spec,
            gpu,
            "ib-hdr" if gpu == "a100" else "roce400",
            gpus,
            batch,
            Parallelism("fsdp", micro_batch=8, **FULL),
            LLM_FOUNDRY,
            f"{tokens:,} tokens/s per GPU",
            tokens,
            calibration=calibration,
        )
        for key, spec, gpu, gpus, batch, tokens, calibration in (
            ("P1", MPT_70B, "h100", 512, 4096, 1007, True),
            ("P3", MPT_70B, "h100", 128, 1024, 1058, False),
            ("P6", MPT_70B, "a100", 64, 2048, 410, False),
            ("P10", MPT_30B, "h100", 512, 4096, 2115, True),
        )
    ),
    HeldOutRun(
        "Y1",
        S14,
        GPT_OSS_120B,
        "h100",
        "ib-ndr",
        64,
        1280,
        Parallelism("ddp", pp=4, ep=8, micro_batch=1),
        MEGATRON_BRIDGE,
        "5,824 tokens/s per GPU",
        5824,
        open=("checkpointing",),
    ),
)
