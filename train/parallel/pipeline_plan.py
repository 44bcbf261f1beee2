"""The pipeline's rules, before any process group: which stages a rank holds under each schedule, how whole
blocks are placed so that the busiest stage is as light as it can be, and what a configured pipeline needs of
the model, the batch, torch and the backend (one line otherwise). train/parallel/pipeline.py builds and runs
the stages these rules describe."""

import math

import torch

from model import GrokConfig, flops_per_token

from ..config import ConfigError, TrainConfig
from .mesh import Layout

V_SHAPED = ("zero-bubble", "dualpipev")
# Measured: with gloo, torch 2.11's V-shaped schedules fail ("Pair is not connected"); 2.13's give one process's
# gradients. (NCCL is not restricted here.)
V_SHAPED_ON_GLOO_SINCE = (2, 13)


def v_shaped_runs_on_gloo() -> bool:
    """Whether the installed torch runs the V-shaped schedules over gloo."""
    return tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) >= V_SHAPED_ON_GLOO_SINCE


def stages_per_rank(schedule: str, virtual_stages: int | None) -> int:
    if schedule in V_SHAPED:
        return 2
    return (virtual_stages or 2) if schedule == "interleaved" else 1


def rank_stages(pp_rank: int, pp: int, schedule: str, virtual_stages: int | None) -> list[int]:
    """The stages pipeline rank `pp_rank` holds, in the order the schedule lists them."""
    if schedule in V_SHAPED:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + pp * chunk for chunk in range(stages_per_rank(schedule, virtual_stages))]


def pass_micro_batches(configured: int | None, micro_batches: int) -> int:
    """The micro-batches of one pipeline pass: parallel.pp_microbatches, or all of the step's."""
    return configured or micro_batches


def check_pipeline(
    config: TrainConfig, model_config: GrokConfig, layout: Layout, micro_batches: int, uses_cuda: bool
) -> None:
    """What the configured pipeline needs of the model, the batch (`micro_batches` a step on each rank), torch
    and the backend; one line otherwise."""
    par = config.parallel
    if par.pp_virtual_stages is not None and par.pp_schedule != "interleaved":
        raise ConfigError(
            f"parallel.pp_virtual_stages is for the interleaved schedule (pp_schedule is {par.pp_schedule!r}, "
            f"which holds {stages_per_rank(par.pp_schedule, None)} stage(s) a rank); remove it or use interleaved"
        )
    if layout.pp == 1:
        return
    per_rank = stages_per_rank(par.pp_schedule, par.pp_virtual_stages)
    stages = layout.pp * per_rank
    if model_config.num_hidden_layers < stages:
        raise ConfigError(
            f"parallel.pp_size {layout.pp} x {per_rank} stage(s) a rank = {stages} stages of at least one layer each, "
            f"but the model has {model_config.num_hidden_layers} layers; lower parallel.pp_size (or "
            f"pp_virtual_stages) or raise model.overrides.num_hidden_layers"
        )
    if par.pp_microbatches is not None and micro_batches % par.pp_microbatches:
        raise ConfigError(
            f"parallel.pp_microbatches {par.pp_microbatches} does not divide this run's {micro_batches} micro-batches "
            f"a step (the global batch / batch.micro_batch_size x data-parallel ranks); use a divisor of "
            f"{micro_batches}, or remove it to schedule them all in one pass"
        )
    per_pass = pass_micro_batches(par.pp_microbatches, micro_batches)
    shortfall = micro_batch_shortfall(par.pp_schedule, layout.pp, per_pass)
    if shortfall:
        where = (
            "parallel.pp_microbatches"
            if par.pp_microbatches
            else "the global batch / batch.micro_batch_size x data-parallel ranks"
        )
        raise ConfigError(
            f"parallel.pp_schedule {par.pp_schedule!r} on {layout.pp} pipeline ranks {shortfall}, and this run has "
            f"{per_pass} ({where}); "
            + (
                "raise parallel.pp_microbatches"
                if par.pp_microbatches
                else "lower batch.micro_batch_size or raise the global batch"
            )
        )
    if par.pp_schedule in V_SHAPED and stage_uses_fsdp(layout) and par.reshard_after_forward:
        raise ConfigError(
            f"parallel.pp_schedule {par.pp_schedule!r} with parallel.reshard_after_forward = true: its split "
            f"backward computes the weight gradients against the parameters FSDP holds then, so they must stay "
            f"gathered after the forward (measured: resharded, the gradients are not one process's); remove "
            f"parallel.reshard_after_forward (under pp it defaults to false) or use 1f1b or interleaved"
        )
    if par.pp_schedule in V_SHAPED and not uses_cuda and not v_shaped_runs_on_gloo():
        raise ConfigError(
            f"parallel.pp_schedule {par.pp_schedule!r} does not run on gloo with torch {torch.__version__} (it "
            f"needs {'.'.join(map(str, V_SHAPED_ON_GLOO_SINCE))} on CPU); use 1f1b or interleaved, or a GPU"
        )


def micro_batch_shortfall(schedule: str, pp: int, micro_batches: int) -> str | None:
    """What the schedule needs of a step's micro-batches that `micro_batches` lacks (torch's own rules), or None."""
    needed = 2 * pp if schedule in V_SHAPED else pp
    if micro_batches < needed:
        return f"needs at least {needed} micro-batches a step"
    rounds = max(1, micro_batches // pp)
    if schedule == "interleaved" and micro_batches % rounds:
        return f"needs a multiple of {rounds} micro-batches a step"
    return None


def stage_uses_fsdp(layout: Layout) -> bool:
    """Whether a stage's modules are wrapped by FSDP: when other ranks share the stage's weights (data and context
    parallelism), or its tensor-parallel DTensors need FSDP's to sit beside in one optimizer. Alone, a stage has
    nothing to shard."""
    return layout.dp_size * layout.cp * layout.tp > 1


def output_cost(config: GrokConfig, params_active: int, seq_len: int) -> float:
    """The output projection's training FLOPs in blocks' worth (the loss and norm are negligible)."""
    output = 6 * config.vocab_size * config.hidden_size
    block = (flops_per_token(config, params_active, seq_len) - output) / config.num_hidden_layers
    return output / block


def stage_layer_counts(layers: int, stages: int, last_extra: float) -> list[int]:
    """Blocks per stage, at least one each, such that the busiest stage (its blocks, plus `last_extra` blocks'
    worth on the last) is as light as whole blocks allow; the blocks the last stage leaves are spread evenly
    over the others, the spare ones from the second stage on (the first also embeds, and holds the most
    micro-batches in flight)."""
    if layers < stages:
        raise ValueError(f"{layers} layers cannot fill {stages} pipeline stages of at least one layer each")

    def fits(load: float) -> bool:  # every stage at most `load`, each with at least one block
        last = math.floor(load - last_extra + 1e-9)
        return last >= 1 and math.floor(load + 1e-9) >= 1 and (stages - 1) * math.floor(load + 1e-9) + last >= layers

    loads = sorted({float(n) for n in range(1, layers + 1)} | {n + last_extra for n in range(1, layers + 1)})
    busiest = next(load for load in loads if fits(load))
    last = min(math.floor(busiest - last_extra + 1e-9), layers - (stages - 1))
    base, spare = divmod(layers - last, stages - 1) if stages > 1 else (0, 0)
    counts = [base] * (stages - 1)
    for index in range(spare):
        counts[(index + 1) % (stages - 1)] += 1
    return counts + [last] if stages > 1 else [layers]
