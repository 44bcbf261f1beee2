"""Published training runs, each with its parallelism and figure, against which the planner is checked.

A publication gives its parallel degrees and some of its knobs; what it leaves open (an interleaved
schedule's depth, the micro-batch, checkpointing where it says nothing) the planner fills in as it would for
a plan of its own: the fastest choice that fits, or the fastest if none does (`PublishedRun.open`).

Each figure is converted to the publication's own FLOP counting before it is compared: Llama 3 counts the
causal attention it computes (its 430 TFLOP/s on 8,192 GPUs only reproduce with half the context); Megatron-LM
counts its recomputed forward too (96 B s l h^2 (1 + s / 6h + V / 16 l h) per batch); DeepSeek-V3 states
GPU-hours per trillion tokens, which needs no FLOP counting at all.
"""

from dataclasses import dataclass

from .hardware import FABRICS, GPUS, Cluster
from .job import Job, Parallelism
from .layout import Estimate
from .search import fill_open
from .software import SOFTWARE
from .spec import REFERENCES, ModelSpec


@dataclass(frozen=True)
class PublishedRun:
    name: str
    model: str
    gpu: str
    fabric: str
    gpus: int
    seq_len: int
    global_batch_tokens: int
    parallelism: Parallelism
    figure: float
    unit: str  # "TFLOP/s per GPU" or "GPU-hours per 1T tokens"
    source: str
    # what the run's software offered (toolbox/planner/software.py): the search is ranked among the same choices
    software: str = "any"
    open: tuple[str, ...] = ("micro_batch",)  # the knobs of its parallelism the publication does not state

    def estimate(self) -> Estimate:
        """The published parallelism, its open knobs filled in as the search would fill them."""
        return fill_open(self.job(), self.parallelism, self.open)

    def job(self) -> Job:
        return Job(
            REFERENCES[self.model],
            Cluster(GPUS[self.gpu], FABRICS[self.fabric]),
            self.gpus,
            self.seq_len,
            self.global_batch_tokens,
            software=SOFTWARE[self.software],
        )

    def predicted(self, result: Estimate | None = None) -> float:
        result = result or self.estimate()
        per_gpu_tokens = result.tokens_per_s / self.gpus
        if self.unit.startswith("GPU-hours"):
            return 1e12 / per_gpu_tokens / 3600
        return per_gpu_tokens * published_flops_per_token(self.model, REFERENCES[self.model], self.seq_len) / 1e12


def published_flops_per_token(model: str, spec: ModelSpec, seq_len: int) -> float:
    if model == "megatron-1t":  # Narayanan et al. (2021), eq. 3, per token
        h, layers, vocab = spec.hidden, spec.layers, spec.vocab
        return 96 * layers * h * h * (1 + seq_len / (6 * h) + vocab / (16 * layers * h))
    return 6 * spec.params_active + spec.attention_flops(seq_len, causal=True)


LLAMA_BATCH = 2048 * 8192  # 16M tokens
# Llama 3 interleaves its pipeline without saying how deep; at 8K it states no activation checkpointing
LLAMA_OPEN = ("micro_batch", "virtual_stages")
RUNS = (
    PublishedRun(
        "Llama 3 405B, 8K GPUs",
        "llama3-405b",
        "h100",
        "roce400",
        8192,
        8192,
        LLAMA_BATCH,
        Parallelism("zero1", tp=8, pp=16, schedule="interleaved"),
        430,
        "TFLOP/s per GPU",
        "Dubey et al. 2024, table 4",
        software="llama3",
        open=LLAMA_OPEN,
    ),
    PublishedRun(
        "Llama 3 405B, 16K GPUs",
        "llama3-405b",
        "h100",
        "roce400",
        16384,
        8192,
        LLAMA_BATCH,
        Parallelism("zero1", tp=8, pp=16, schedule="interleaved"),
        400,
        "TFLOP/s per GPU",
        "Dubey et al. 2024, table 4",
        software="llama3",
        open=LLAMA_OPEN,
    ),
    PublishedRun(
        "Llama 3 405B, 16K GPUs, 128K context",
        "llama3-405b",
        "h100",
        "roce400",
        16384,
        131072,
        LLAMA_BATCH,
        Parallelism("zero1", tp=8, pp=16, cp=16, schedule="interleaved"),
        380,
        "TFLOP/s per GPU",
        "Dubey et al. 2024, table 4",
        software="llama3",
        open=(*LLAMA_OPEN, "checkpointing"),
    ),
    # DualPipe; it recomputes the norms and MLA's up-projections in the backward (selective checkpointing)
    PublishedRun(
        "DeepSeek-V3, 2,048 H800",
        "deepseek-v3",
        "h800",
        "ib-ndr",
        2048,
        4096,
        15360 * 4096,
        Parallelism("zero1", pp=16, ep=64, schedule="dualpipe", checkpointing="selective"),
        180e3,
        "GPU-hours per 1T tokens",
        "DeepSeek-AI 2024, sections 1 and 3.2",
    ),
    PublishedRun(
        "Megatron-LM 1T GPT, 3,072 A100",
        "megatron-1t",
        "a100",
        "ib-hdr",
        3072,
        2048,
        3072 * 2048,
        Parallelism("ddp", tp=8, pp=64, checkpointing="full"),
        163,
        "TFLOP/s per GPU",
        "Narayanan et al. 2021, table 1",
        software="megatron-lm-2021",  # no distributed optimizer, no flash attention, no sequence parallelism
    ),
)
