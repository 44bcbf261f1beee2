"""The training software a plan assumes, by name: what it offers (data-parallel kinds, pipeline schedules,
selective checkpointing) and its kernels (flash attention, sequence parallelism). A run is planned for one
software profile, chosen per run, so that the search tries only what that stack can do and a published run is
costed with what its stack had: never a per-run constant.
"""

from dataclasses import dataclass

from groundwork.errors import UserError

DATA_PARALLEL = ("ddp", "zero1", "zero2", "zero3", "fsdp", "hsdp")
CHECKPOINTING = ("none", "selective", "full")


@dataclass(frozen=True)
class Software:
    name: str
    description: str
    data_parallel: tuple[str, ...]
    schedules: tuple[str, ...]  # the planner's names: 1f1b, interleaved, dualpipe
    model_parallel: tuple[str, ...] = ("tp", "pp", "ep", "cp")  # the dimensions it splits a model along
    selective_checkpointing: bool = True
    # the attention kernel (compute.ATTENTION_EFFICIENCY): "unfused" (batched GEMMs around a softmax that writes
    # the T x T scores), "flash2" (FlashAttention-2, PyTorch's SDPA) or "flash3" (FlashAttention-3 / cuDNN's
    # fused attention on Hopper and later)
    attention_kernel: str = "flash3"
    sequence_parallel: bool = True  # the residual stream split over tp ranks between blocks
    # tp's all-gathers and reduce-scatters cut in chunks and run beside the GEMMs that use them (Megatron-Core's
    # --tp-comm-overlap, 2023-10; torchtitan's async TP)
    tp_comm_overlap: bool = False
    # What it overlaps with compute. DDP / ZeRO-1/2 gradient all-reduce behind the last backward (Megatron-LM's
    # own DDP reduced after the whole backward until --overlap-grad-reduce, 2023; DeepSpeed's overlap_comm is
    # off by default below ZeRO-3), and ZeRO-1/2's parameter all-gather behind the next forward
    # (--overlap-param-gather, 2023). FSDP and ZeRO-3 always prefetch and reduce behind compute.
    gradient_overlap: bool = True
    param_gather_overlap: bool = True
    # an interleaved pipeline's sends posted ahead and waited on when the next chunk needs them (Megatron-Core's
    # --overlap-p2p-communication; torch.distributed.pipelining's async sends); Megatron-LM's 2021-22 schedules
    # waited on each send where it was issued
    p2p_overlap: bool = True
    # Memory: gradients accumulated in an fp32 buffer for the whole local model beside model-dtype parameters
    # (Megatron's main_grad, --accumulate-allreduce-grads-in-fp32; DeepSpeed's bf16 optimizer does the same), not
    # DeepSpeed ZeRO's model-dtype gradients
    fp32_main_grads: bool = False
    # pipeline stages of unequal layer counts (Llama 3 took a layer off its first and last; DeepSpeed's pipeline
    # partitions by parameters; this trainer places layers by cost); Megatron-LM cuts layers / (pp x v) evenly
    uneven_stages: bool = True

    @property
    def fused_attention(self) -> bool:
        """No T x T scores kept for the backward."""
        return self.attention_kernel != "unfused"

    @property
    def checkpointing(self) -> tuple[str, ...]:
        return CHECKPOINTING if self.selective_checkpointing else ("none", "full")


# What stacks of 2021 had not: selective recompute, flash attention, sequence parallelism, and data-parallel
# reductions overlapped with compute (Megatron-LM's own DDP, DeepSpeed's overlap_comm below ZeRO-3)
BEFORE_2022 = dict(
    selective_checkpointing=False,
    attention_kernel="unfused",
    sequence_parallel=False,
    gradient_overlap=False,
    param_gather_overlap=False,
    p2p_overlap=False,
)

# What every Megatron-LM stack does: an fp32 gradient buffer for the whole local model, stages cut evenly
MEGATRON = dict(fp32_main_grads=True, uneven_stages=False)

SOFTWARE = {
    profile.name: profile
    for profile in (
        Software(
            "any",
            "every technique the planner models",
            DATA_PARALLEL,
            ("1f1b", "interleaved", "dualpipe"),
            tp_comm_overlap=True,
        ),
        Software(
            "megatron-lm-2021",
            "Megatron-LM as in Narayanan et al. 2021: tp, pp (1F1B, interleaved), plain data parallelism, full recompute",
            ("ddp",),
            ("1f1b", "interleaved"),
            ("tp", "pp"),
            **BEFORE_2022,
            **MEGATRON,
        ),
        Software(
            "megatron-lm-2022",
            "Megatron-LM with sequence parallelism and selective recompute (Korthikanti et al. 2022)",
            ("ddp", "zero1"),
            ("1f1b", "interleaved"),
            ("tp", "pp"),
            **{**BEFORE_2022, "selective_checkpointing": True, "sequence_parallel": True},
            **MEGATRON,
        ),
        Software(
            "deepspeed-2021",
            "DeepSpeed ZeRO as Narayanan et al. 2021 compared it: data parallelism only, full recompute",
            ("ddp", "zero1", "zero2", "zero3"),
            ("1f1b",),
            (),
            **BEFORE_2022,
        ),
        Software(
            "megatron-deepspeed",
            "Megatron-DeepSpeed (BLOOM, MT-NLG): ZeRO-1 beside tp and pp, 1F1B, no sequence parallelism",
            ("ddp", "zero1"),
            ("1f1b",),
            ("tp", "pp"),
            **BEFORE_2022,
            fp32_main_grads=True,
        ),
        Software(
            "megatron-lm-2023",
            "Megatron-LM of mid 2023 (MegaScale's baseline): distributed optimizer, FlashAttention-2, sequence "
            "parallelism; data-parallel and tp collectives not yet overlapped",
            ("ddp", "zero1"),
            ("1f1b", "interleaved"),
            ("tp", "pp"),
            attention_kernel="flash2",
            gradient_overlap=False,
            param_gather_overlap=False,
            p2p_overlap=False,
            **MEGATRON,
        ),
        Software(
            "megatron-core",
            "Megatron-Core / NeMo (2024 on): distributed optimizer, Transformer Engine's cuDNN attention, sequence "
            "parallelism; --tp-comm-overlap left at its default, off",
            ("ddp", "zero1"),
            ("1f1b", "interleaved"),
            **MEGATRON,
        ),
        Software(
            "megatron-core-tp-overlap",
            "Megatron-Core with --tp-comm-overlap (Transformer Engine's userbuffers), as its performance recipes run",
            ("ddp", "zero1"),
            ("1f1b", "interleaved"),
            tp_comm_overlap=True,
            **MEGATRON,
        ),
        Software(
            "llama3",
            "Meta's Llama 3 stack (Dubey et al. 2024, section 3.3): FSDP sharding optimizer state (zero1), tp, cp, "
            "interleaved pp, tp collectives in the critical path; its attention kernel is not named, but its 128K-context "
            "figure (380 TFLOP/s, mostly attention) needs a Hopper-class one",
            ("zero1", "fsdp"),
            ("1f1b", "interleaved"),
            ("tp", "pp", "cp"),
        ),
        Software(
            "deepseek",
            "DeepSeek's HAI-LLM (DeepSeek-V3): ZeRO-1, DualPipe",
            ("zero1",),
            ("1f1b", "interleaved", "dualpipe"),
            ("tp", "pp", "ep"),
            tp_comm_overlap=True,
            fp32_main_grads=True,
        ),
        Software(
            "pytorch-fsdp",
            "PyTorch FSDP without model parallelism (llm-foundry)",
            ("fsdp", "hsdp"),
            ("1f1b",),
            (),
            attention_kernel="flash2",
            sequence_parallel=False,
        ),
        Software(
            "torchtitan",
            "torchtitan (PyTorch-native, 2024 on): FSDP2/HSDP with tp (async TP), cp, pp and ep, SDPA's "
            "FlashAttention-2",
            ("fsdp", "hsdp"),
            ("1f1b", "interleaved"),
            attention_kernel="flash2",
            tp_comm_overlap=True,
        ),
        Software(
            "minicolossus",
            "this project's trainer: ddp, fsdp, hsdp, DeepSpeed ZeRO; tp, cp, ep and pp under fsdp/hsdp",
            ("ddp", "zero1", "zero2", "zero3", "fsdp", "hsdp"),
            ("1f1b", "interleaved", "dualpipe"),
            selective_checkpointing=False,
            attention_kernel="flash2",  # SDPA's flash backend
        ),
    )
}


class UnknownSoftware(UserError, ValueError):
    """A software profile the planner does not know."""


def software(name: str) -> Software:
    if name not in SOFTWARE:
        raise UnknownSoftware(f"software profile {name!r} is not one of {', '.join(SOFTWARE)}")
    return SOFTWARE[name]
