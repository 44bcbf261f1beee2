"""`scripts/bench.py baseline` and `quality`: us against a nanoGPT-style GPT (toolbox/baseline.py).

baseline: throughput at nanoGPT's shakespeare_char shape (4 layers, 4 heads, width 128, context 64, batch
12, fp32), our model dense with the same FLOPs (configs/nanogpt-shape.toml). Model-only steps (forward,
backward, AdamW) of both models interleaved round by round in one process, so that the machine's drift
hits both alike; then the real trainer end to end (`python -m train`, one process, data loader, metrics,
the final evaluation excluded) against nanoGPT's own training loop.

quality: held-out bits per byte at equal wall time on tiny Shakespeare, the first 90% of its characters
trained on and the last 10% scored: nanoGPT's recipe (char-level, 2000 iterations) against our recipe
(configs/shakespeare.toml), each timed from start to its final score.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from groundwork.errors import UserError
from model import GrokForCausalLM
from train.checkpoint import step_dir
from train.config import load_config
from train.metrics import read_metrics
from train.optim import build_optimizer
from train.parallel import apply_block_options
from train.startup import build_model_config

from .baseline import NanoGPT, adamw, train_recipe

REPO = Path(__file__).resolve().parents[1]
SHAPE_CONFIG = "configs/nanogpt-shape.toml"
RECIPE_CONFIG = "configs/shakespeare.toml"
TRAINER_VARIANTS = {  # name -> overrides of the shape config
    "eager (soft-capped)": [],
    "sdpa (no soft-cap)": ["--model.overrides.attn_backend=sdpa", "--model.overrides.attn_logit_softcap=0.0"],
    "eager + compile": ["--parallel.compile=true"],
}


class BaselineError(UserError, RuntimeError):
    """A run that failed: the message names it and its last line."""


def run_python(args: list[str], what: str, one_thread: bool = False) -> str:
    """`python ARGS` in the checkout; its stdout. By default it uses every core (one process); one_thread for
    processes that share the cores (torchrun ranks)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if one_thread:
        env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise BaselineError(f"{what} failed (exit {result.returncode}): {last}")
    return result.stdout


def prepared(text: Path, data_root: Path, tokenizer_args: list[str], name: str) -> Path:
    """tiny Shakespeare prepared once (reused), its last 10% of paragraphs held out."""
    if not text.is_file():
        raise BaselineError(f"--text {text}: no such file; point it at tinyshakespeare.txt")
    out = data_root / name
    run_python(
        [
            "-m",
            "data.prepare",
            "--source",
            str(text),
            "--out",
            str(out),
            "--val-from",
            "end",
            "--val-fraction",
            "0.1",
            *tokenizer_args,
        ],
        f"preparing {out}",
    )
    return out


def our_step(overrides: list[str], vocab_size: int):
    config = load_config(REPO / SHAPE_CONFIG, overrides)
    model = GrokForCausalLM(build_model_config(config, vocab_size)).train()
    apply_block_options(model, config, torch.device("cpu"), one_graph=True)  # as the trainer compiles
    optimizer = build_optimizer(model, config.optim, torch.device("cpu"))
    tokens = torch.randint(0, vocab_size, (config.batch.micro_batch_size, config.data.seq_len + 1))

    def step():
        model(tokens[:, :-1], targets=tokens[:, 1:]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, config.batch.micro_batch_size * config.data.seq_len


def nanogpt_step(vocab_size: int = 65, batch: int = 12, context: int = 64):
    model = NanoGPT(vocab_size, context, layers=4, heads=4, width=128)
    optimizer = adamw(model, 1e-3)
    tokens = torch.randint(0, vocab_size, (batch, context + 1))

    def step():
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, batch * context


def bench_baseline(
    text: Path, data_root: Path, rounds: int, steps: int, trainer_steps: int, trainer_rounds: int
) -> list[dict]:
    from data.tokenizer import BYTE_VOCAB_SIZE

    runs = {
        "nanoGPT-style": nanogpt_step(),
        "ours eager (soft-capped)": our_step([], BYTE_VOCAB_SIZE),
        "ours sdpa (no soft-cap)": our_step(TRAINER_VARIANTS["sdpa (no soft-cap)"], BYTE_VOCAB_SIZE),
        "ours eager + compile": our_step(TRAINER_VARIANTS["eager + compile"], BYTE_VOCAB_SIZE),
    }
    seconds = {name: [] for name in runs}
    for step, _ in runs.values():  # warm-up; includes compilation
        for _ in range(3):
            step()
    for _ in range(rounds):
        for name, (step, _) in runs.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            seconds[name].append((time.perf_counter() - start) / steps)
    rows = []
    reference = statistics.median(seconds["nanoGPT-style"])
    for name, (_, tokens) in runs.items():
        median = statistics.median(seconds[name])
        rows.append(
            {
                "bench": "baseline",
                "what": f"model step: {name}",
                "ms_per_step": round(median * 1e3, 1),
                "tokens_per_s": round(tokens / median),
                "vs_nanogpt": round(reference / median, 3),
            }
        )

    # End to end: the trainer (loader, metrics, logging) against nanoGPT's loop (get_batch, lr schedule), each a
    # fresh process, alternated over `trainer_rounds` rounds.
    data = prepared(text, data_root, ["--tokenizer", "byte"], "shakespeare-byte")
    end_to_end = {"nanoGPT-style": [], **{name: [] for name in TRAINER_VARIANTS}}
    for _ in range(trainer_rounds):
        nano = run_python(["-m", "toolbox.baseline", str(text), str(trainer_steps)], "the nanoGPT-style loop")
        end_to_end["nanoGPT-style"].append(json.loads(nano.strip().splitlines()[-1])["train_tokens_per_s"])
        for name, overrides in TRAINER_VARIANTS.items():
            with tempfile.TemporaryDirectory() as out:
                run_python(
                    [
                        "-m",
                        "train",
                        "--config",
                        SHAPE_CONFIG,
                        f"--data.path={data}",
                        f"--run.out_dir={out}",
                        f"--run.max_steps={trainer_steps}",
                        "--log.every=20",
                        "--log.progress=false",
                        "--eval.every=0",
                        "--eval.max_sequences=1",
                        "--checkpoint.every=0",
                        "--run.resume=never",
                        *overrides,
                    ],
                    f"the trainer with {name}",
                )
                timed = read_metrics(Path(out))[1:-1]  # not the warm-up interval, not the one with the final eval
            end_to_end[name].append(statistics.median(r["tokens_per_s"] for r in timed))
    reference = statistics.median(end_to_end["nanoGPT-style"])
    for name, values in end_to_end.items():
        what = "training loop: nanoGPT-style" if name == "nanoGPT-style" else f"trainer: {name}"
        rows.append(
            {
                "bench": "baseline",
                "what": what,
                "ms_per_step": None,
                "tokens_per_s": round(statistics.median(values)),
                "vs_nanogpt": round(statistics.median(values) / reference, 3),
            }
        )
    return rows


def bench_quality(
    text: Path, config: str, overrides: list[str], with_baseline: bool = True, context: int = 64
) -> list[dict]:
    """Both recipes on the same split of the same file, scored on the same held-out bytes with the same
    context: nanoGPT's loop, then ours as a user runs it (prepare, train, evaluate), each timed whole."""
    if not text.is_file():
        raise BaselineError(f"--text {text}: no such file; point it at tinyshakespeare.txt")
    rows = []
    if with_baseline:
        rows.append(
            {
                "bench": "quality",
                "recipe": "nanoGPT-style (char-level, 2000 iterations)",
                **train_recipe(text.read_text()),
            }
        )
    recipe = load_config(REPO / config, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        body = text.read_text()
        cut = int(len(body) * 0.9)  # nanoGPT's split, by characters
        Path(tmp, "train.txt").write_text(body[:cut])
        Path(tmp, "heldout.txt").write_text(body[cut:])
        data, out = Path(tmp, "data"), Path(tmp, "run")
        vocab = recipe.model.overrides.get("vocab_size", 2048)
        run_python(
            [
                "-m",
                "data.prepare",
                "--source",
                str(Path(tmp, "train.txt")),
                "--out",
                str(data),
                "--vocab-size",
                str(vocab),
                "--val-fraction",
                "0.01",
            ],
            f"preparing {data}",
        )
        run_python(
            [
                "-m",
                "train",
                "--config",
                config,
                f"--data.path={data}",
                f"--run.out_dir={out}",
                "--run.resume=never",
                "--log.progress=false",
                *overrides,
            ],
            f"the trainer with {config}",
        )
        final = read_metrics(out)[-1]
        scored = run_python(
            [
                "scripts/evaluate.py",
                str(step_dir(out / "checkpoints", final["step"])),
                "--text",
                str(Path(tmp, "heldout.txt")),
                "--seq-len",
                str(context),
            ],
            "evaluating the held-out text",
        )
        seconds = time.perf_counter() - start
    score = json.loads(scored.strip().splitlines()[-1])
    rows.append(
        {
            "bench": "quality",
            "recipe": config,
            "val_bpb": round(score["val_bpb"], 3),
            "seconds": round(seconds, 1),
            "train_tokens_per_s": round(final["tokens_per_s"]),
        }
    )
    if with_baseline:
        rows.append(
            {
                "bench": "quality-summary",
                "bpb_vs_nanogpt": round(rows[1]["val_bpb"] / rows[0]["val_bpb"], 3),
                "seconds_vs_nanogpt": round(rows[1]["seconds"] / rows[0]["seconds"], 3),
            }
        )
    return rows
