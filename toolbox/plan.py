"""The Colossus planner: what a training job costs on N GPUs, communication included.

    python scripts/plan.py --model MODEL --gpus N [--gpu h100] [--fabric roce400] [--strategy fsdp]
                           [--tp N] [--pp N] [--ep N] [--cp N] [--schedule 1f1b|interleaved|dualpipe]
                           [--virtual-stages V] [--checkpointing none|selective|full] [--micro-batch M] [--seq-len T]
                           [--global-batch-tokens B] [--token-budget TOKENS] [--search [--top K] [--runnable]]
                           [--software any|megatron-lm-2021|megatron-core|deepseek|pytorch-fsdp|minicolossus|...]
                           [--json]
    python scripts/plan.py --published [--json]
    python scripts/plan.py --held-out [--json]
    python scripts/plan.py --scaling grok-1,grok-2 --gpu-counts 1024,8192,100000 [--plot FILE.png] [--json]

MODEL is a preset, a reference spec (llama3-405b, deepseek-v3, megatron-1t) or a Hugging Face config.json (Llama,
Mistral, Qwen, Mixtral, Qwen-MoE, DeepSeek-V2/V3, GPT-OSS, Grok and this project's exports). A layout is --strategy (the
data-parallel kind: ddp, zero1-3, fsdp, hsdp) with --tp/--pp/--ep/--cp; data parallelism is what remains of
--gpus. --search ranks every layout that fits by predicted throughput instead (--runnable: only those the
trainer runs). --published prints the
published runs the planner is checked against. --scaling prints (and with --plot draws) the best layout's
tokens/day of each model at each GPU count, for the same global batch. Each layout comes with the trainer's
flags that run it (python -m train --config CONFIG FLAGS under a launcher of that many ranks), or the reason the
trainer cannot. The model behind the numbers is in toolbox/planner/.
"""

import argparse
import json
from pathlib import Path

from groundwork.cli import ArgumentParser, integer, positive_number, run_main

from .planner.accuracy import prediction, summary
from .planner.hardware import FABRICS, GPUS, Cluster
from .planner.heldout import RUNS as HELD_OUT
from .planner.hf_config import spec_from_hf_config
from .planner.job import CHECKPOINTING, DATA_PARALLEL, InvalidParallelism, Job, Parallelism
from .planner.launch import not_runnable, trainer_flags
from .planner.layout import Estimate, estimate
from .planner.pipeline import SCHEDULES
from .planner.published import RUNS
from .planner.scaling import scaling
from .planner.search import search
from .planner.software import SOFTWARE
from .planner.spec import MODELS, model_spec
from .plot import check_png_out, plot_scaling

LARGEST_BATCH_TOKENS = 2**40  # 1.1T tokens a step, 65,000 times Llama 3's: beyond it the numbers mean nothing


def as_dict(result: Estimate, token_budget: float | None = None) -> dict:
    job, parallelism = result.job, result.parallelism
    row = {
        "model": job.spec.name,
        "gpus": job.gpus,
        "gpu": job.cluster.gpu.name,
        "fabric": job.cluster.fabric.name,
        "software": job.software.name,
        "layout": parallelism.describe(),
        "strategy": parallelism.data_parallel,
        "dp": result.dp,
        "tp": parallelism.tp,
        "pp": parallelism.pp,
        "ep": parallelism.ep,
        "cp": parallelism.cp,
        "schedule": parallelism.schedule,
        "virtual_stages": parallelism.virtual_stages,
        "checkpointing": parallelism.checkpointing,
        "micro_batch": parallelism.micro_batch,
        "micro_batches": result.micro_batches,
        "seq_len": job.seq_len,
        "global_batch_tokens": result.batch_tokens,
        "params_total": job.spec.params_total,
        "params_active": job.spec.params_active,
        "flops_per_token": job.spec.model_flops_per_token(job.seq_len),
        "tflops_per_gpu": result.tflops_per_gpu,
        "mfu": result.mfu,
        "step_s": result.step_s,
        "compute_s": result.compute_s,
        "optimizer_s": result.optimizer_s,
        "bubble_s": result.bubble_s,
        "exposed_comm_s": result.exposed_comm_s,
        "mem_gib": result.mem_gib,
        "memory_gib": result.memory_gib,
        "gpu_memory_gib": job.cluster.gpu.usable_memory_gib,
        "fits": result.fits,
        "tokens_per_day": result.tokens_per_s * 86400,
        "traffic": [vars(t) for t in result.traffic],
        "trainer_flags": trainer_flags(job, parallelism, int(result.batch_tokens)),  # None: not_runnable says why
        "not_runnable": not_runnable(job, parallelism),
    }
    if token_budget:
        row.update(token_budget=token_budget, days=token_budget / row["tokens_per_day"])
    return row


def human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def report(row: dict) -> str:
    lines = [
        f"{row['model']}: {human(row['params_total'])} params ({human(row['params_active'])} active) "
        f"on {row['gpus']:,} x {row['gpu']}, {row['fabric']}",
        f"  layout {row['layout']}: dp {row['dp']:,} x tp {row['tp']} x pp {row['pp']} x cp {row['cp']}"
        + (f" (ep {row['ep']} over dp x cp x tp)" if row["ep"] > 1 else "")
        + f", {row['micro_batches']} micro-batch(es) of {row['micro_batch']} x {row['seq_len']} per rank "
        f"= {human(row['global_batch_tokens'])} tokens a step",
        "  per GPU: "
        + " + ".join(f"{name} {gib:.1f}" for name, gib in row["memory_gib"].items())
        + f" = {row['mem_gib']:.1f} GiB: "
        + ("fits" if row["fits"] else "DOES NOT FIT")
        + f" in {row['gpu_memory_gib']:.0f} GiB usable",
        f"  step {row['step_s']:.2f} s = compute {row['compute_s']:.2f} + optimizer {row['optimizer_s']:.2f} + "
        f"pipeline bubble {row['bubble_s']:.2f} + exposed communication {row['exposed_comm_s']:.2f}",
        f"  {row['tflops_per_gpu']:.0f} TFLOP/s per GPU ({row['mfu']:.0%} MFU), "
        f"{human(row['tokens_per_day'])} tokens/day"
        + (f", {row['days']:.1f} days for {human(row['token_budget'])} tokens" if "days" in row else ""),
    ]
    lines.append(f"  {launch_line(row)}")
    for t in row["traffic"]:
        lines.append(
            f"    {t['name']:<40} {t['link']:<6} {t['bytes_per_step'] / 2**30:9.2f} GiB sent/step "
            f"{t['seconds']:8.3f} s, exposed {t['exposed_s']:.3f} s"
        )
    return "\n".join(lines)


def ranking(rows: list[dict]) -> str:
    header = (
        f"{'#':>3}  {'layout':<44} {'mem GiB':>8} {'step s':>8} {'exposed s':>9} {'TFLOP/s':>8} {'MFU':>5} "
        f"{'tokens/day':>11}" + (f" {'days':>7}" if rows and "days" in rows[0] else "")
    )
    lines = [header]
    for rank, row in enumerate(rows, 1):
        lines.append(
            f"{rank:>3}  {row['layout']:<44} {row['mem_gib']:>8.1f} {row['step_s']:>8.2f} "
            f"{row['exposed_comm_s']:>9.2f} {row['tflops_per_gpu']:>8.0f} {row['mfu']:>5.0%} {human(row['tokens_per_day']):>11}"
            + (f" {row['days']:>7.1f}" if "days" in row else "")
        )
        lines.append(f"{'':5}{launch_line(row)}")
    return "\n".join(lines)


def launch_line(row: dict) -> str:
    """The trainer's flags for a row's layout, or why the trainer cannot run it."""
    if row["trainer_flags"] is None:
        return f"(not runnable by the trainer: {row['not_runnable']})"
    return f"python -m train --config CONFIG {' '.join(row['trainer_flags'])}  (on {row['gpus']:,} ranks)"


def published_rows() -> list[dict]:
    rows = []
    for run in RUNS:
        result = run.estimate()
        best = search(run.job(), top=1)
        rows.append(
            {
                "run": run.name,
                "layout": result.parallelism.describe(),
                "unit": run.unit,
                "published": run.figure,
                "predicted": run.predicted(result),
                "fits": result.fits,
                "source": run.source,
                "vs_best": result.tokens_per_s / best[0].tokens_per_s if best else None,
                "best_layout": best[0].parallelism.describe() if best else None,
            }
        )
    return rows


def held_out_rows() -> list[dict]:
    """Each held-out published run, predicted; then one summary row per split (calibration, held out)."""
    rows = []
    for run in HELD_OUT:
        result = prediction(run)
        rows.append(
            {
                "run": run.key,
                "model": run.spec.name,
                "gpus": f"{run.gpus:,} x {run.gpu}",
                "layout": result.parallelism.describe(),
                "software": run.software,
                "stated": run.stated,
                "published_tokens_per_gpu_s": run.tokens_per_gpu_s,
                "predicted_tokens_per_gpu_s": result.tokens_per_s / run.gpus,
                "error": result.tokens_per_s / run.gpus / run.tokens_per_gpu_s - 1,
                "split": "calibration" if run.calibration else "held out",
                "source": run.source,
            }
        )
    for split in ("calibration", "held out"):
        stats = summary(tuple(run for run in HELD_OUT if run.calibration == (split == "calibration")))
        rows.append({"summary": split, **{key: value for key, value in stats.items() if key != "errors"}})
    return rows


def print_held_out(as_json: bool) -> None:
    for row in held_out_rows():
        if as_json:
            print(json.dumps(row))
        elif "summary" in row:
            print(
                f"{row['summary']}: {row['runs']} runs, median |error| {row['median_abs_error']:.0%} (median "
                f"{row['median_error']:+.0%}), {row['within_20_percent']:.0%} within 20%, faster of "
                f"{row['pairs']} measured pairs ranked first: {row['pairs_ordered']}"
            )
        else:
            print(
                f"{row['run']:<4} {row['model']:<16} {row['gpus']:<14} {row['layout']:<44} published "
                f"{row['published_tokens_per_gpu_s']:>8,.1f} predicted {row['predicted_tokens_per_gpu_s']:>8,.1f} "
                f"tokens/s/GPU ({row['error']:+.0%}) [{row['split']}]"
            )


def print_scaling(models: list[str], gpu_counts: list[int], args: argparse.Namespace) -> int:
    curves = {}
    for name in models:
        points = []
        for gpus, best in scaling(
            name, gpu_counts, args.gpu, args.fabric, args.seq_len or 8192, int(args.global_batch_tokens)
        ):
            row = as_dict(best) if best else {"model": name, "gpus": gpus, "fits": False}
            print(
                json.dumps(row)
                if args.json
                else f"{name:<12} {gpus:>8,} GPUs  "
                + (
                    f"{row['layout']:<44} {row['mfu']:>4.0%} MFU {human(row['tokens_per_day']):>8} tokens/day"
                    if best
                    else "no layout fits"
                )
            )
            if best:
                points.append((gpus, row["tokens_per_day"]))
        curves[name] = points
    if args.plot and not any(curves.values()):
        raise InvalidParallelism(
            f"--plot {args.plot}: no layout fits at any of --gpu-counts, so there is nothing to draw; add GPUs "
            f"or raise --global-batch-tokens"
        )
    if args.plot:
        plot_scaling(
            curves,
            f"best layout per GPU count, {human(int(args.global_batch_tokens))}-token batches, {args.gpu}",
            Path(args.plot),
            "--plot",
        )
        print(f"plot: {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="scripts/plan.py", description=__doc__)
    parser.add_argument("--model", help=f"{', '.join(MODELS)}, or a model's config.json (or its folder)")
    parser.add_argument("--gpus", type=integer(1))
    parser.add_argument("--gpu", default="h100", choices=list(GPUS))
    parser.add_argument("--fabric", default="roce400", choices=list(FABRICS), help="scale-out network per GPU")
    parser.add_argument("--strategy", default="fsdp", choices=DATA_PARALLEL, help="the data-parallel kind")
    for name, what in (("tp", "tensor"), ("pp", "pipeline"), ("ep", "expert"), ("cp", "context")):
        parser.add_argument(f"--{name}", type=integer(1), default=1, help=f"{what}-parallel GPUs")
    parser.add_argument("--schedule", default="1f1b", choices=SCHEDULES)
    parser.add_argument("--virtual-stages", type=integer(1), default=None, help="interleaved: chunks per rank (2)")
    parser.add_argument("--checkpointing", default="none", choices=CHECKPOINTING, help="activation checkpointing")
    parser.add_argument("--micro-batch", type=integer(1), default=1, help="sequences per GPU per forward")
    parser.add_argument("--shard-size", type=integer(1), default=8, help="hsdp: GPUs per shard group (a node)")
    parser.add_argument("--seq-len", type=integer(1), help="default: 8192, or the preset's context if shorter")
    parser.add_argument("--global-batch-tokens", type=positive_number, default=16 * 2**20, help="16M: Llama 3's")
    parser.add_argument("--token-budget", type=positive_number)
    parser.add_argument("--search", action="store_true", help="rank every layout that fits")
    parser.add_argument("--top", type=integer(1), default=10, help="--search: how many to print")
    parser.add_argument("--runnable", action="store_true", help="--search: only the layouts the trainer runs")
    parser.add_argument(
        "--software", default="any", choices=list(SOFTWARE), help="the training stack: what it offers, its kernels"
    )
    parser.add_argument("--published", action="store_true", help="the published runs, predicted vs published")
    parser.add_argument("--held-out", action="store_true", help="the held-out published runs and their error")
    parser.add_argument("--scaling", help="comma-separated models: best layout at each of --gpu-counts")
    parser.add_argument("--gpu-counts", default="1024,2048,4096,8192,16384,32768,65536,100000,200000")
    parser.add_argument(
        "--plot", type=Path, help="--scaling: write the curves to this PNG (new, or a plot of this project)"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line, one per layout")
    args = parser.parse_args(argv)
    if not (args.published or args.held_out or args.scaling) and (args.model is None or args.gpus is None):
        parser.error("--model and --gpus are required (or --published, or --scaling)")
    if args.model is not None and args.model not in MODELS and not Path(args.model).exists():
        parser.error(f"argument --model: {args.model!r} is neither a model ({', '.join(MODELS)}) nor a config.json")
    scaling_models = args.scaling.split(",") if args.scaling else []
    for name in scaling_models:
        if name not in MODELS:
            parser.error(f"argument --scaling: unknown model {name!r}: choose from {', '.join(MODELS)}")
    try:
        gpu_counts = [int(n) for n in args.gpu_counts.split(",")]
    except ValueError:
        gpu_counts = [0]
    if min(gpu_counts) < 1:
        parser.error(f"argument --gpu-counts: {args.gpu_counts!r} is not a comma-separated list of integers >= 1")
    if args.global_batch_tokens > LARGEST_BATCH_TOKENS:
        parser.error(f"argument --global-batch-tokens: {args.global_batch_tokens:g} is above {LARGEST_BATCH_TOKENS:,}")
    if args.plot and not scaling_models:
        parser.error("argument --plot: draws the --scaling curves; pass --scaling too")

    def work() -> int:
        if args.plot:
            check_png_out(args.plot, "--plot")  # before the search: a refused file costs nothing
        if args.held_out:
            print_held_out(args.json)
            return 0
        if args.published:
            rows = published_rows()
            for row in rows:
                print(
                    json.dumps(row)
                    if args.json
                    else f"{row['run']:<40} {row['layout']:<36} published {row['published']:>9,.0f} predicted "
                    f"{row['predicted']:>9,.0f} {row['unit']} ({row['predicted'] / row['published'] - 1:+.0%}); "
                    f"{row['vs_best']:.0%} of the search's best ({row['best_layout']})"
                )
            return 0
        if scaling_models:
            return print_scaling(scaling_models, gpu_counts, args)
        spec = model_spec(args.model) if args.model in MODELS else spec_from_hf_config(Path(args.model))
        seq_len = args.seq_len or min(8192, spec.context)
        cluster = Cluster(GPUS[args.gpu], FABRICS[args.fabric])
        job = Job(spec, cluster, args.gpus, seq_len, int(args.global_batch_tokens), software=SOFTWARE[args.software])
        if args.search:
            found = search(job, top=args.top, runnable_only=args.runnable)
            rows = [as_dict(result, args.token_budget) for result in found]
            if not rows:
                raise InvalidParallelism(
                    f"no layout of {args.model}{' that the trainer runs' * args.runnable} fits on {args.gpus:,} x "
                    f"{args.gpu} with a {human(job.global_batch_tokens)}-token batch: add GPUs or raise "
                    f"--global-batch-tokens"
                )
            print("\n".join(json.dumps(row) for row in rows) if args.json else ranking(rows))
            return 0
        virtual = args.virtual_stages or (2 if args.schedule == "interleaved" else 1)
        parallelism = Parallelism(
            args.strategy,
            tp=args.tp,
            pp=args.pp,
            ep=args.ep,
            cp=args.cp,
            micro_batch=args.micro_batch,
            schedule=args.schedule,
            virtual_stages=virtual,
            checkpointing=args.checkpointing,
            shard_size=args.shard_size,
        )
        row = as_dict(estimate(job, parallelism), args.token_budget)
        print(json.dumps(row) if args.json else report(row))
        return 0 if row["fits"] else 1

    return run_main(work)
