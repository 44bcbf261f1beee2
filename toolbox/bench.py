"""Benchmarks that print numbers (never timed tests).

    python scripts/bench.py model [--config FILE] [--preset P] [--batch B] [--seq-len T] [--section.key=value ...]
                                  [--steps 10] [--warmup 3] [--profile FILE] [--json]
    python scripts/bench.py data  [--source stdlib] [--vocab-size 2048] [--batch 32] [--seq-len 128] [--json]
    python scripts/bench.py data --prepare [--source ../shared/data/gutenberg_en.txt.gz] [--no-ray] [--json]
    python scripts/bench.py data --dedup [--books ../shared/data/gutenberg_en.txt.gz] [--copies 10] [--json]
    python scripts/bench.py strategies [--presets tiny small] [--strategies none-1thread ddp fsdp hsdp tp2 ep2 cp2 pp2-1f1b ...]
                                       [--nproc 2] [--steps 24] [--log-every 4] [--json]
    python scripts/bench.py balance [--preset tiny] [--settings aux bias both capacity] [--seeds 0 1]
                                    [--source ../shared/data/gutenberg_en.txt.gz] [--section.key=value ...] [--json]
    python scripts/bench.py checkpoint [--preset small] [--nproc 2] [--steps 25] [--every 4] [--json]
    python scripts/bench.py init [--preset 1b] [--nproc 2] [--section.key=value ...] [--json]
    python scripts/bench.py baseline [--text ../shared/data/tinyshakespeare.txt] [--rounds 10] [--steps 8]
                                     [--trainer-steps 300] [--trainer-rounds 2] [--json]
    python scripts/bench.py quality [--text ../shared/data/tinyshakespeare.txt] [--config configs/shakespeare.toml]
                                    [--section.key=value ...] [--json]

`model`: a trainer config's step (forward, backward, the trainer's AdamW) on one device, as strategy `none`
runs it: the config's model, micro batch, sequence length, precision (bf16 autocast on GPU, fp32 on CPU),
torch.compile and activation checkpointing, each overridable in the trainer's syntax, e.g.
`--config configs/gpu-350m.toml --parallel.compile=false`. Random tokens of the model's vocabulary. Prints
tokens/s, achieved FLOP/s from the model's FLOPs-per-token accounting, MFU where the device's peak is known,
and peak memory; warmup_s includes compilation.

`data`: BPE training time and tokenisation throughput on a corpus, the loader's time per batch, and the
share of a real `tiny` training loop spent waiting for the (prefetching) loader: the target is < 2%.
`data --prepare`: data.prepare's tokens/s per core on each executor against the previous single-process path,
and the whole dedup + filter + tokenise pipeline; `data --dedup`: each dedup's recall and precision on books
with planted exact and edited copies (toolbox/bench_prepare.py).

`strategies`: the real trainer (`python -m train` / torchrun, under the traffic probe) per preset and strategy
(data, tensor, expert, context and pipeline parallel layouts, each schedule): tokens/s, per-rank peak memory,
per-rank parameter + gradient + optimizer-state bytes and the MiB rank 0 sends a step, against a 1-thread
single process; under pipelining also the share of rank 0's step spent waiting on its peers and the bubble's
share the planner predicts.
Targets on 2 CPU ranks: fsdp state <= 0.55x ddp's; ddp tokens/s >= 0.9x twice the 1-thread process.

`balance`: the MoE balancing settings (the auxiliary loss, the loss-free bias, both, capacity 1.25) trained
from the same seed under expert parallelism 2 on the Gutenberg corpus's held-out end: validation bits/byte,
the busiest expert's and the busiest expert-parallel rank's load over an even share, tokens/s
(toolbox/bench_balance.py).

`checkpoint`: the real trainer saving every --every steps, once with synchronous and once with background
(checkpoint.async_save) checkpoints: the median step time and how much longer a step with a save takes.

`init`: each rank's memory growth while the trainer builds and initialises the model (meta device, split,
then only its shards filled) against the whole fp32 model's bytes (toolbox/bench_init.py).

`baseline`: tokens/s at nanoGPT's shakespeare_char shape, a nanoGPT-style GPT against our model with the same
FLOPs (configs/nanogpt-shape.toml): model steps interleaved in one process, then the trainer end to end
against nanoGPT's training loop. `quality`: held-out bits per byte on the last 10% of tiny Shakespeare at
equal wall time, nanoGPT's char-level recipe against configs/shakespeare.toml (toolbox/bench_baseline.py).

Numbers live here and not in tests: timings vary with the machine and its load, so a timed test would either
flake or assert nothing.
"""

import argparse
import json
import os
import stat
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from data.tokenizer import BYTE_VOCAB_SIZE
from groundwork.cli import ArgumentParser, integer, run_main
from groundwork.errors import UserError
from groundwork.folders import check_file_writable, write_file
from model import GrokForCausalLM, count_parameters, flops_per_token, preset_config
from train.config import load_config
from train.metrics import peak_flops, peak_memory_mib, read_metrics  # the trainer's MFU: same peak table
from train.optim import build_optimizer
from train.parallel import apply_block_options, autocast, compute_dtype, uses_cuda
from train.startup import build_model_config

from .bench_balance import PRESET_RUNS as BALANCE_RUNS
from .bench_balance import SETTINGS, bench_balance
from .bench_baseline import RECIPE_CONFIG, SHAPE_CONFIG, bench_baseline, bench_quality, run_python
from .bench_init import bench_init
from .planner.pipeline import bubble

REPO = Path(__file__).resolve().parents[1]  # the checkout: configs/ and the cwd of the trainer runs


class BenchError(UserError, RuntimeError):
    """A benchmark run that failed: the message names the run and the trainer's last line."""


def bench_model(args: argparse.Namespace, overrides: list[str]) -> dict:
    """The config's training step on one device, as `parallel.strategy=none` runs it."""
    shorthands = [f"--model.preset={args.preset}"] if args.preset else []
    shorthands += [f"--batch.micro_batch_size={args.batch}"] if args.batch else []
    shorthands += [f"--data.seq_len={args.seq_len}"] if args.seq_len else []
    config = load_config(args.config, [*shorthands, *overrides])
    use_cuda = uses_cuda(config)
    device = torch.device("cuda" if use_cuda else "cpu")
    dtype = compute_dtype(config, use_cuda)
    model_config = build_model_config(config, vocab_size=None)  # the trainer's checks, the preset's vocabulary
    batch, seq_len = config.batch.micro_batch_size, config.data.seq_len
    torch.manual_seed(config.run.seed)
    model = GrokForCausalLM(model_config).to(device).train()
    apply_block_options(model, config, device, one_graph=True)
    optimizer = build_optimizer(model, config.optim, device)
    tokens = torch.randint(0, model_config.vocab_size, (batch, seq_len + 1), device=device)

    def step():
        with autocast(device, dtype):
            loss = model(tokens[:, :-1], targets=tokens[:, 1:]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(args.warmup):  # includes torch.compile's compilation when it is on
        step()
    if use_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if use_cuda:
        torch.cuda.synchronize()
    seconds_per_step = (time.perf_counter() - start) / args.steps

    if args.profile:
        write_profile(step, device, Path(args.profile))

    tokens_per_step = batch * seq_len
    flops = flops_per_token(model_config, count_parameters(model).active, seq_len) * tokens_per_step
    peak = peak_flops(device)
    return {
        "bench": "model",
        "config": str(args.config or "-"),
        "preset": config.model.preset,
        "params": count_parameters(model).total,
        "device": torch.cuda.get_device_name() if use_cuda else "cpu",
        "threads": torch.get_num_threads(),
        "dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
        "attn_backend": model_config.attn_backend,
        "compile": config.parallel.compile,
        "activation_checkpointing": config.parallel.activation_checkpointing,
        "micro_batch": batch,
        "seq_len": seq_len,
        "warmup_s": round(warmup_s, 1),
        "ms_per_step": round(seconds_per_step * 1e3, 1),
        "tokens_per_s": round(tokens_per_step / seconds_per_step),
        # four significant figures, not decimals: a slow first CPU step of a tiny model is well under 1e-4 TFLOP/s
        "achieved_tflops": float(f"{flops / seconds_per_step / 1e12:.4g}"),
        "mfu": round(flops / seconds_per_step / peak, 4) if peak else None,
        "peak_mem_mib": round(peak_memory_mib(device)),
    }


PROFILE_HEADER = "minicolossus bench profile: "  # the first line of a profile, so a re-run may replace it


def our_profile(path: Path) -> bool:
    """A profile this command wrote (a regular file starting with its header), never a user's file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            return stat.S_ISREG(os.fstat(f.fileno()).st_mode) and f.read(len(PROFILE_HEADER)) == PROFILE_HEADER.encode()
    except OSError:
        return False


def write_profile(step: Callable[[], None], device: torch.device, path: Path, steps: int = 3) -> None:
    """torch.profiler over a few more steps: the kernels (or CPU ops) that took the most time, as a table."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort_by, row_limit=30)
    write_file(path, f"{PROFILE_HEADER}{steps} steps, sorted by {sort_by}\n{table}", "--profile", our_profile)


def bench_data(args: argparse.Namespace) -> dict:
    import datasets

    from data import sources
    from data import tokenizer as tok
    from data.loader import TrainLoader
    from data.prepare import main as prepare_main

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        # the corpus's datasets cache in the temporary folder too: nothing left in ~/.cache afterwards
        corpus = sources.load_corpus(args.source, cache_dir=Path(tmp) / "cache")
        texts = list(sources.texts(corpus.documents))  # the non-empty documents, as prepare reads them
        start = time.perf_counter()
        tokenizer = tok.train_bpe(texts, args.vocab_size)
        bpe_train_s = time.perf_counter() - start
        start = time.perf_counter()
        n_tokens = sum(len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False))
        encode_s = time.perf_counter() - start

        folder = Path(tmp) / "prepared"
        prepare_main(["--source", args.source, "--out", str(folder), "--vocab-size", str(args.vocab_size)])
        unprefetched = TrainLoader(folder, args.seq_len, args.batch, prefetch=0)
        start = time.perf_counter()
        for _ in range(args.steps):
            next(unprefetched)
        loader_ms = (time.perf_counter() - start) / args.steps * 1e3

        # A real tiny training loop fed by the prefetching loader: how long does the step wait for data?
        config = preset_config("tiny", vocab_size=unprefetched.stream.manifest["tokenizer"]["vocab_size"])
        model = GrokForCausalLM(config).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loader = TrainLoader(folder, args.seq_len, args.batch, prefetch=2)
        waited = total = 0.0
        for step in range(args.warmup + args.steps):
            begin = time.perf_counter()
            inputs, targets = next(loader)
            fetched = time.perf_counter()
            model(inputs, targets=targets).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= args.warmup:
                waited += fetched - begin
                total += time.perf_counter() - begin
        loader.close()
    return {
        "bench": "data",
        "source": corpus.description,
        "documents": len(texts),
        "tokens": n_tokens,
        "bpe_vocab": tokenizer.get_vocab_size(),
        "bpe_train_s": round(bpe_train_s, 2),
        "encode_tokens_per_s": round(n_tokens / encode_s),
        "batch": args.batch,
        "seq_len": args.seq_len,
        "loader_ms_per_batch": round(loader_ms, 3),
        "tiny_step_ms": round(total / args.steps * 1e3, 1),
        "loader_wait_share": round(waited / total, 5),
    }


STRATEGY_RUNS = {  # name -> (processes, overrides)
    "none-1thread": (1, ["--parallel.strategy=none"]),
    "ddp": (None, ["--parallel.strategy=ddp"]),
    "fsdp": (None, ["--parallel.strategy=fsdp"]),
    "hsdp": (None, ["--parallel.strategy=hsdp"]),  # shard group = LOCAL_WORLD_SIZE: all ranks of this machine
    # tiny has one KV head; tp 2 needs two (small already has them)
    "tp2": (None, ["--parallel.strategy=fsdp", "--parallel.tp_size=2", "--model.overrides.num_key_value_heads=2"]),
    "ep2": (None, ["--parallel.strategy=fsdp", "--parallel.ep_size=2"]),
    "zero1": (None, ["--parallel.strategy=deepspeed", "--parallel.zero_stage=1"]),
    "zero2": (None, ["--parallel.strategy=deepspeed", "--parallel.zero_stage=2"]),
    "zero3": (None, ["--parallel.strategy=deepspeed", "--parallel.zero_stage=3"]),
    "cp2": (2, ["--parallel.strategy=fsdp", "--parallel.cp_size=2"]),
    "pp2-1f1b": (2, ["--parallel.strategy=fsdp", "--parallel.pp_size=2"]),
    "pp2-1f1b-8-micro-batches": (2, ["--parallel.strategy=fsdp", "--parallel.pp_size=2", "--batch.micro_batch_size=4"]),
    "pp2-interleaved": (2, ["--parallel.strategy=fsdp", "--parallel.pp_size=2", "--parallel.pp_schedule=interleaved"]),
    # a V needs 2 x pp micro-batches a step: tiny's 32 sequences in micro-batches of 8
    "pp2-zero-bubble": (
        2,
        [
            "--parallel.strategy=fsdp",
            "--parallel.pp_size=2",
            "--parallel.pp_schedule=zero-bubble",
            "--batch.micro_batch_size=8",
        ],
    ),
    "pp2-dualpipev": (
        2,
        [
            "--parallel.strategy=fsdp",
            "--parallel.pp_size=2",
            "--parallel.pp_schedule=dualpipev",
            "--batch.micro_batch_size=8",
        ],
    ),
    "pp2-x-tp2": (
        4,
        [
            "--parallel.strategy=fsdp",
            "--parallel.pp_size=2",
            "--parallel.tp_size=2",
            "--model.overrides.num_key_value_heads=2",
            "--batch.micro_batch_size=8",
        ],
    ),
    "pp2-x-ep2": (
        4,
        ["--parallel.strategy=fsdp", "--parallel.pp_size=2", "--parallel.ep_size=2", "--batch.micro_batch_size=8"],
    ),
    # FSDP inside each stage of a V: 2 data-parallel ranks, 4 micro-batches of 4 each a step
    "fsdp2-x-pp2-dualpipev": (
        4,
        [
            "--parallel.strategy=fsdp",
            "--parallel.pp_size=2",
            "--parallel.pp_schedule=dualpipev",
            "--batch.micro_batch_size=4",
        ],
    ),
}
PRESET_RUNS = {  # preset -> (config file, prepare arguments for its vocabulary)
    "tiny": ("configs/tiny.toml", ["--vocab-size", "2048"]),
    "small": ("configs/small.toml", ["--vocab-size", "8192"]),
}


def trainer_run(command: list[str], what: str) -> None:
    """`command` (sys.executable first) with one thread per process: several share the cores."""
    run_python(command[1:], what, one_thread=True)


def preset_data(preset: str, data_root: str) -> tuple[str, Path]:
    """A preset's config file and its stdlib corpus, prepared once under data_root and reused."""
    config, prepare_args = PRESET_RUNS[preset]
    data = Path(data_root) / f"stdlib-{prepare_args[-1]}"
    trainer_run(
        [sys.executable, "-m", "data.prepare", "--source", "stdlib", "--out", str(data), *prepare_args],
        f"preparing {data} for {preset}",
    )
    return config, data


def pipeline_idle(probe: dict) -> dict:
    """Under pipeline parallelism: the share of rank 0's step spent waiting on its peers (the bubble, plus the
    transfers), and the bubble's share the planner predicts for that schedule and number of micro-batches
    (1F1B and interleaved; the planner has no formula for the trainer's V schedules)."""
    if "pipeline_wait_s" not in probe:
        return {}
    planner_schedule = {"1f1b": "1f1b", "interleaved": "interleaved"}.get(probe["schedule"])
    planned = None
    if planner_schedule:
        idle = bubble(probe["pp"], planner_schedule, probe["virtual_stages"], forward=1 / 3, weights=1 / 3)
        planned = round(idle / (probe["micro_batches"] + idle), 3)
    return {
        "pipeline_wait_share_rank0": round(probe["pipeline_wait_s"] / probe["step_s"], 3),
        "planned_bubble_share": planned,
    }


def bench_strategies(args: argparse.Namespace) -> list[dict]:
    results = []
    for preset in args.presets:
        config, data = preset_data(preset, args.data_root)
        for name in args.strategies:
            nproc, overrides = STRATEGY_RUNS[name]
            nproc = nproc or args.nproc
            with tempfile.TemporaryDirectory() as out:
                # the trainer under the traffic probe, which counts what rank 0 sends in the second step
                probe = ["-m", "toolbox.planner.traffic_probe", str(Path(out) / "traffic.json")]
                launcher = (
                    [sys.executable, *probe]
                    if nproc == 1
                    else [
                        sys.executable,
                        "-m",
                        "torch.distributed.run",
                        "--standalone",
                        f"--nproc_per_node={nproc}",
                        *probe,
                    ]
                )
                command = launcher + [
                    "--config",
                    config,
                    f"--data.path={data}",
                    f"--run.out_dir={out}",
                    f"--run.max_steps={args.steps}",
                    f"--log.every={args.log_every}",
                    "--log.progress=false",
                    "--eval.every=0",
                    "--eval.max_sequences=1",
                    "--checkpoint.every=0",
                    "--run.resume=never",
                    *overrides,
                ]
                trainer_run(command, f"{preset} with {name} ({nproc} process(es))")
                rows = read_metrics(Path(out))
                probe = json.loads((Path(out) / "traffic.json.rank0").read_text())
            timed = rows[1:-1]  # skip the warm-up interval and the last one (it includes the final evaluation)
            results.append(
                {
                    "bench": "strategies",
                    "preset": preset,
                    "strategy": name,
                    "processes": nproc,
                    "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in timed)),
                    "peak_mem_mib_per_rank": round(rows[-1]["peak_mem_mib"], 1),
                    "param_mib_per_rank": round(rows[-1]["param_mib"], 2),
                    "state_mib_per_rank": round(rows[-1]["state_mib"], 2),
                    "mib_sent_per_step_rank0": round(probe["bytes"] / 2**20, 2),
                    **pipeline_idle(probe),
                }
            )
            print(json.dumps(results[-1]) if args.json else results[-1], flush=True)
        by_name = {r["strategy"]: r for r in results if r["preset"] == preset}
        if {"none-1thread", "ddp", "fsdp"} <= by_name.keys():
            summary = {
                "bench": "strategies-summary",
                "preset": preset,
                "fsdp_state_vs_ddp": round(
                    by_name["fsdp"]["state_mib_per_rank"] / by_name["ddp"]["state_mib_per_rank"], 3
                ),
                "ddp_vs_2x_single_thread": round(
                    by_name["ddp"]["tokens_per_s"] / (args.nproc * by_name["none-1thread"]["tokens_per_s"]), 3
                ),
            }
            results.append(summary)
            print(json.dumps(summary) if args.json else summary, flush=True)
    return results


def bench_checkpoint(args: argparse.Namespace) -> list[dict]:
    """The step-loop stall of a checkpoint, sync vs async: the real trainer saves every --every steps; a step's
    interval that includes a save, minus the median interval of the steps that do not, is that save's stall."""
    config, data = preset_data(args.preset, args.data_root)
    results = []
    for mode in ("sync", "async"):
        with tempfile.TemporaryDirectory() as out:
            launcher = (
                [sys.executable, "-m", "train"]
                if args.nproc == 1
                else [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    f"--nproc_per_node={args.nproc}",
                    "-m",
                    "train",
                ]
            )
            trainer_run(
                launcher
                + [
                    "--config",
                    config,
                    f"--data.path={data}",
                    f"--run.out_dir={out}",
                    f"--run.max_steps={args.steps}",
                    "--log.every=1",
                    "--log.progress=false",
                    "--eval.every=0",
                    "--eval.max_sequences=1",
                    f"--checkpoint.every={args.every}",
                    f"--checkpoint.async_save={'true' if mode == 'async' else 'false'}",
                    "--checkpoint.keep=1",
                    f"--parallel.strategy={'none' if args.nproc == 1 else 'fsdp'}",
                ],
                f"{args.preset} with {mode} checkpoints",
            )
            rows = read_metrics(Path(out))
            saved = list(Path(out, "checkpoints").glob("step_*"))
            mib = sum(f.stat().st_size for d in saved for f in d.rglob("*") if f.is_file()) / 2**20
        seconds = {
            r["step"]: (r["tokens_seen"] - prev["tokens_seen"]) / r["tokens_per_s"]
            for prev, r in zip(rows, rows[1:])
            if r.get("tokens_per_s")
        }
        # the save at step s (after its row) falls in the interval logged at s + 1
        after_save = [t for step, t in seconds.items() if (step - 1) % args.every == 0 and step > 2]
        plain = [t for step, t in seconds.items() if (step - 1) % args.every and step > 2]
        results.append(
            {
                "bench": "checkpoint",
                "preset": args.preset,
                "mode": mode,
                "processes": args.nproc,
                "checkpoint_mib": round(mib, 1),
                "step_s": round(statistics.median(plain), 4),
                "stall_per_save_s": round(statistics.median(after_save) - statistics.median(plain), 4),
            }
        )
        print(json.dumps(results[-1]) if args.json else results[-1], flush=True)
    return results


def markdown_table(rows: list[dict]) -> str:
    """The runs as one table, the form the README's Performance section uses."""
    keys = list(dict.fromkeys(key for row in rows for key in row))
    cell = lambda value: f"{value:,}" if isinstance(value, int) else str(value)
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(cell(r[k]) if k in r else "" for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="scripts/bench.py", description=__doc__)
    sub = parser.add_subparsers(dest="section", required=True)
    m = sub.add_parser("model", help="a config's train step on one device (strategy none)")
    m.add_argument("--config", help="a trainer config (TOML); default: the trainer's defaults")
    m.add_argument("--preset", help="shorthand for --model.preset")
    m.add_argument("--batch", type=integer(1), help="shorthand for --batch.micro_batch_size")
    m.add_argument("--seq-len", type=integer(1), help="shorthand for --data.seq_len")
    m.add_argument("--steps", type=integer(1), default=10)
    m.add_argument("--warmup", type=integer(0), default=3)
    m.add_argument("--json", action="store_true")
    m.add_argument("--profile", metavar="FILE", help="also write torch.profiler's top kernels of 3 more steps here")
    d = sub.add_parser("data", help="tokeniser throughput and loader cost against a tiny training step")
    d.add_argument("--source", default="stdlib")
    d.add_argument(
        "--vocab-size",
        type=integer(BYTE_VOCAB_SIZE),
        default=2048,
        help=f"BPE vocabulary (at least the {BYTE_VOCAB_SIZE} byte-level base tokens)",
    )
    d.add_argument("--batch", type=integer(1), default=32)
    d.add_argument("--seq-len", type=integer(1), default=128)
    d.add_argument("--steps", type=integer(1), default=20)
    d.add_argument("--warmup", type=integer(0), default=3)
    d.add_argument("--prepare", action="store_true", help="data.prepare per executor (default --source: Gutenberg)")
    d.add_argument("--no-ray", action="store_true", help="--prepare without the Ray run")
    d.add_argument("--dedup", action="store_true", help="dedup recall and precision on planted copies of books")
    d.add_argument("--books", default="../shared/data/gutenberg_en.txt.gz", help="--dedup: the books' corpus")
    d.add_argument("--copies", type=integer(1), default=10, help="--dedup: copies planted per kind of edit")
    d.add_argument("--json", action="store_true")
    st = sub.add_parser("strategies", help="the trainer under none/ddp/fsdp/hsdp: throughput and memory per rank")
    st.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=sorted(PRESET_RUNS))
    st.add_argument(
        "--strategies",
        nargs="+",
        default=["none-1thread", "ddp", "fsdp", "hsdp"],
        choices=list(STRATEGY_RUNS),
        help="zero1/zero2/zero3 need DeepSpeed",
    )
    st.add_argument("--nproc", type=integer(1), default=2)
    st.add_argument("--steps", type=integer(1), default=24)
    st.add_argument("--log-every", type=integer(1), default=4, help="steps per metrics row (tokens/s is per interval)")
    st.add_argument("--data-root", default="runs/data", help="where the stdlib corpora are prepared (reused)")
    st.add_argument("--json", action="store_true")
    ba = sub.add_parser("balance", help="MoE balancing settings against each other, under expert parallelism 2")
    ba.add_argument("--preset", default="tiny", choices=sorted(BALANCE_RUNS))
    ba.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ba.add_argument("--seeds", nargs="+", type=integer(0), default=[0, 1])
    ba.add_argument("--source", default="../shared/data/gutenberg_en.txt.gz", help="its end is held out")
    ba.add_argument("--nproc", type=integer(2), default=2, help="processes (expert parallelism 2 within them)")
    ba.add_argument("--data-root", default="runs/data", help="where the corpus is prepared (reused)")
    ba.add_argument("--json", action="store_true")
    c = sub.add_parser("checkpoint", help="the step-loop stall of a checkpoint save: sync vs async")
    c.add_argument("--preset", default="small", choices=sorted(PRESET_RUNS))
    c.add_argument("--nproc", type=integer(1), default=2)
    c.add_argument("--steps", type=integer(8), default=25)
    c.add_argument("--every", type=integer(2), default=4, help="steps between checkpoints")
    c.add_argument("--data-root", default="runs/data", help="where the stdlib corpora are prepared (reused)")
    c.add_argument("--json", action="store_true")
    i = sub.add_parser("init", help="per-rank memory while the trainer builds and initialises the model")
    i.add_argument("--preset", default="1b")
    i.add_argument("--nproc", type=integer(1), default=2)
    i.add_argument("--data-root", default="runs/data", help="where the stdlib corpora are prepared (reused)")
    i.add_argument("--json", action="store_true")
    shakespeare = "../shared/data/tinyshakespeare.txt"  # the corpora beside the checkout
    b = sub.add_parser("baseline", help=f"tokens/s against a nanoGPT-style GPT at its shape ({SHAPE_CONFIG})")
    b.add_argument("--text", default=shakespeare, help="tinyshakespeare.txt")
    b.add_argument("--rounds", type=integer(1), default=10, help="interleaved rounds of model steps")
    b.add_argument("--steps", type=integer(1), default=8, help="model steps per round")
    b.add_argument("--trainer-steps", type=integer(60), default=300, help="steps of each end-to-end run")
    b.add_argument("--trainer-rounds", type=integer(1), default=2, help="alternated end-to-end runs of each")
    b.add_argument("--data-root", default="runs/data", help="where tiny Shakespeare is prepared (reused)")
    b.add_argument("--json", action="store_true")
    q = sub.add_parser("quality", help="held-out bits/byte at equal wall time against nanoGPT's recipe")
    q.add_argument("--text", default=shakespeare, help="tinyshakespeare.txt")
    q.add_argument("--config", default=RECIPE_CONFIG, help="our recipe; --section.key=value overrides it")
    q.add_argument("--no-baseline", action="store_true", help="only our recipe (when tuning it)")
    q.add_argument("--json", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    if overrides and args.section not in ("model", "init", "quality", "balance"):
        sub.choices[args.section].error(f"unrecognized arguments: {' '.join(overrides)}")
    if args.section == "strategies" and -(-args.steps // args.log_every) < 3:  # rows: every log step + the last
        st.error(
            f"argument --steps: {args.steps} steps log fewer than 3 rows at --log-every {args.log_every} "
            f"(the first and the last are not timed); raise --steps or lower --log-every"
        )
    return run_main(lambda: run(args, overrides))


def run(args: argparse.Namespace, overrides: list[str]) -> None:
    if getattr(args, "profile", None):  # before the benchmark: a refused file costs nothing
        check_file_writable(Path(args.profile), "--profile", our_profile)
        if not Path(args.profile).parent.is_dir():
            raise BenchError(f"--profile {args.profile}: {Path(args.profile).parent} is not a folder; create it")
    if args.section in ("baseline", "quality"):
        if args.section == "baseline":
            rows = bench_baseline(
                Path(args.text), Path(args.data_root), args.rounds, args.steps, args.trainer_steps, args.trainer_rounds
            )
        else:
            rows = bench_quality(Path(args.text), args.config, overrides, with_baseline=not args.no_baseline)
        for row in rows:
            print(json.dumps(row) if args.json else row, flush=True)
        return
    if args.section == "init":
        config, data = preset_data("tiny", args.data_root)  # its config and data; the preset is --preset's
        flags = [f"--model.preset={args.preset}", "--parallel.strategy=fsdp", "--model.overrides.attn_backend=eager"]
        try:
            rows = bench_init(config, data, args.nproc, flags + overrides)
        except RuntimeError as error:
            raise BenchError(str(error)) from None
        for row in rows:
            print(json.dumps(row) if args.json else row)
        return
    if args.section == "data" and (args.prepare or args.dedup):
        from .bench_prepare import bench_dedup, bench_prepare

        rows = []
        if args.prepare:
            source = args.source if args.source != "stdlib" else "../shared/data/gutenberg_en.txt.gz"
            rows += bench_prepare(source, args.vocab_size, with_ray=not args.no_ray)
        if args.dedup:
            rows += bench_dedup(Path(args.books), args.copies, [0.001, 0.01, 0.03, 0.1])
        print("\n".join(map(json.dumps, rows)) if args.json else markdown_table(rows))
        return
    if args.section == "balance":
        if not Path(args.source).is_file():
            raise BenchError(f"--source {args.source}: no such file; point it at a corpus (gutenberg_en.txt.gz)")
        report = (lambda row: print(json.dumps(row))) if args.json else print
        rows = bench_balance(
            args.preset,
            args.settings,
            args.seeds,
            Path(args.source),
            Path(args.data_root),
            args.nproc,
            overrides,
            report,
        )
        if not args.json:
            print(markdown_table(rows))
        return
    if args.section == "checkpoint":
        results = bench_checkpoint(args)
        if not args.json:
            print(markdown_table(results))
        return
    if args.section == "strategies":
        results = bench_strategies(args)  # prints one line per run as it goes
        if not args.json:
            print(markdown_table([r for r in results if r["bench"] == "strategies"]))
        return
    result = bench_model(args, overrides) if args.section == "model" else bench_data(args)
    if args.json:
        print(json.dumps(result))
    else:
        width = max(map(len, result))
        for key, value in result.items():
            print(f"{key:{width}s}  {value}")
