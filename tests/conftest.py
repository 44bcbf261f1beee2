import contextlib
import io
import json
import os
import subprocess
from pathlib import Path

import pytest
import ranks
import torch

from data.prepare import main as prepare_main
from model import GrokConfig, GrokForCausalLM
from toolbox.fault_report import ADAMW_RECIPE
from train.metrics import read_metrics


def small_config(**overrides) -> GrokConfig:
    """A model small enough that every test runs in well under a second on one core."""
    fields = dict(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    return GrokConfig(**{**fields, **overrides})


def small_model(seed: int = 0, **overrides) -> GrokForCausalLM:
    torch.manual_seed(seed)
    return GrokForCausalLM(small_config(**overrides)).eval()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before the test's fixtures (a module's fixture may start the ranks): tests/ranks.py refuses to start
    ranks for a test not marked `distributed`."""
    ranks.unmarked_test = None if item.get_closest_marker("distributed") else item.nodeid


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _environment():
    """Commands run in-process (their error paths) may set the launcher variables a process group needs
    (MASTER_PORT, RANK, ...): later subprocesses must not inherit them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def in_process(main, *args) -> subprocess.CompletedProcess:
    """A command's main() run in this process, reported as a subprocess would report it (exit code, stdout,
    stderr). A fresh interpreter spends ~5 s importing torch and transformers; tests of a tool's own
    behaviour run here, and a few tests run each script as a real command."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main([str(arg) for arg in args])
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code
    return subprocess.CompletedProcess(list(args), code, stdout.getvalue(), stderr.getvalue())


# --- real training runs (torchrun + gloo), shared by the trainer, DeepSpeed and launcher tests -----------

REPO = Path(__file__).resolve().parents[1]
STEPS = 12


def paragraphs(n: int) -> list[str]:
    from test_data import paragraphs as make  # the data tests' synthetic corpus

    return make(n)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("train-data")
    (folder / "corpus.txt").write_text("\n\n".join(paragraphs(150)))
    assert (
        prepare_main(
            [
                "--source",
                str(folder / "corpus.txt"),
                "--out",
                str(folder / "p"),
                "--tokenizer",
                "byte",
                "--val-fraction",
                "0.05",
            ]
        )
        == 0
    )
    return folder / "p"


def base_args(data_dir: Path, out: Path, steps: int = STEPS) -> list[str]:
    # grad_clip 0.5 is below the norms of these steps, so every step clips: a wrong (per-shard) norm
    # would change the updates and the losses would diverge from the single process.
    return [
        "--config",
        str(REPO / "configs" / "tiny.toml"),
        f"--data.path={data_dir}",
        "--data.seq_len=64",
        "--batch.global_batch_size=8",
        "--batch.micro_batch_size=4",
        *ADAMW_RECIPE,  # the tests' own recipe, whatever the main job's
        "--optim.warmup_steps=2",
        "--optim.grad_clip=0.5",
        f"--run.max_steps={steps}",
        "--log.every=1",
        "--log.progress=false",
        "--eval.every=0",
        "--eval.max_sequences=16",
        "--checkpoint.every=0",
        f"--run.out_dir={out}",
    ]


def train(data_dir, out, *overrides, nproc: int = 1, steps: int = STEPS) -> list[dict]:
    """The trainer's metrics rows: one process runs in this one, more as torchrun's workers (tests/ranks.py)."""
    strategy = (
        []
        if any(o.startswith("--parallel.strategy") for o in overrides)
        else ["--parallel.strategy=none" if nproc == 1 else "--parallel.strategy=fsdp"]
    )
    args = base_args(data_dir, out, steps) + strategy + list(overrides)
    if nproc == 1:  # no process group: the trainer runs here, without ~5 s of imports in a fresh interpreter
        from train.__main__ import main as train_main

        result = in_process(train_main, *args)
    else:
        result = ranks.run_main("train.__main__", args, nproc=nproc, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return read_metrics(Path(out))


@pytest.fixture(scope="session")
def reference(data_dir, tmp_path_factory) -> tuple[list[dict], Path]:
    """One process, no parallelism, checkpoints at steps 6 and 12."""
    return checkpointed_run(data_dir, tmp_path_factory, "reference")


def checkpointed_run(data_dir, tmp_path_factory, name, *flags, nproc=1) -> tuple[list[dict], Path]:
    """A 12-step run with checkpoints at steps 6 and 12: (metrics rows, run folder)."""
    out = tmp_path_factory.mktemp(name)
    return train(data_dir, out, *flags, "--checkpoint.every=6", "--checkpoint.keep=3", nproc=nproc), out


def assert_same_run(rows, single):
    """A parallel run follows the single-process one: every step's loss within 1e-5 and gradient norm within
    1e-4, with clipping active on every step."""
    assert len(rows) == len(single) and all(row["grad_norm"] > 0.5 for row in single)  # clipping every step
    assert max(abs(a - b) for a, b in zip(losses(rows), losses(single))) < 1e-5
    assert max(abs(a["grad_norm"] - b["grad_norm"]) for a, b in zip(rows, single)) < 1e-4
    # the validation forward sums other reductions in another order: a near-tied top-k pick may flip
    assert abs(rows[-1]["val_loss"] - single[-1]["val_loss"]) < 1e-4


def assert_exports_the_same_weights(run: Path, single: Path, out: Path, step: str = "step_00000006") -> None:
    """A parallel run's checkpoint exports the weights the single-process run's exports: names, shapes, values
    within 2e-4 (the runs sum reductions in other orders)."""
    from safetensors.torch import load_file

    from toolbox.export import main as export_main

    for name, folder in (("parallel", run), ("single", single)):
        assert export_main([str(folder / "checkpoints" / step), str(out / name)]) == 0
    parallel, reference = (load_file(out / name / "model.safetensors") for name in ("parallel", "single"))
    assert parallel.keys() == reference.keys()
    for key in parallel:
        assert parallel[key].shape == reference[key].shape
        torch.testing.assert_close(parallel[key], reference[key], rtol=0, atol=2e-4)


def losses(rows):
    return [row["loss"] for row in rows]


def reseal(checkpoint: Path) -> None:
    """Record the current digests of a checkpoint's files in its COMPLETE marker, as an attacker (or a careless
    edit tool) could: what is then tested is the loader itself, not the digest check in front of it."""
    from train.checkpoint import HASH, MARKER, file_digest

    files = {
        str(p.relative_to(checkpoint)): file_digest(p)
        for p in sorted(checkpoint.rglob("*"))
        if p.is_file() and p.name != MARKER
    }
    (checkpoint / MARKER).write_text(json.dumps({"step": 0, "hash": HASH, "files": files}))


class Payload:
    """What a hostile file could hold: unpickling it would create `marker` (it must never run)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))
