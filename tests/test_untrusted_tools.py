"""The tools against hostile inputs: symlinks where they write, checkpoints edited and resealed, configs
that lie about the weights, tokenizers that do not fit, huge flags, FIFOs, a full disk, two writers at once.
Each case ends in one `error:` line, exit 2, naming the file or flag, and leaves every file as it was."""

import contextlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, in_process, paragraphs, reseal
from untrusted import assert_one_line, peak_bounded, run_bounded, snapshot

from data import tokenizer as tok
from groundwork import folders
from toolbox.bench import main as bench_main
from toolbox.evaluation import main as evaluate_main
from toolbox.export import main as export_main
from toolbox.generation import main as generate_main
from toolbox.plan import main as plan_main
from toolbox.plot import main as plot_main

STEP = "checkpoints/step_00000012"
# Importing torch and transformers alone takes ~0.6 GiB here; the tiny model is a few MiB. A config that
# were believed (1,500 layers, a billion tokens) would need far more than this.
PEAK_RSS_MIB = 1500


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.fixture(scope="module")
def world(reference, tmp_path_factory) -> Path:
    """Good inputs, damaged copies of them and a user's own files, built once; the cases only read them."""
    root = tmp_path_factory.mktemp("untrusted-tools")
    good = root / "good" / STEP
    shutil.copytree(reference[1] / STEP, good)
    assert in_process(export_main, good, root / "hf").returncode == 0
    shutil.copytree(reference[1], root / "run", ignore=shutil.ignore_patterns("checkpoints"))
    user = root / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine, not a plot\n")
    (root / "corpus.txt").write_text("\n\n".join(paragraphs(20)))
    os.symlink(user, root / "link-to-user")
    os.symlink(user / "notes.txt", root / "link.png")
    os.mkfifo(root / "fifo")
    big = tok.train_bpe(paragraphs(150), 512)  # a 512-token tokenizer for a 260-token model
    tok.save(big, root / "big-tokenizer")
    linked = root / "linked-tokenizer-folder"  # what --tokenizer names is not covered by any digest
    shutil.copytree(reference[1] / STEP, linked, ignore=lambda _, names: [n for n in names if "token" not in n])
    (linked / "tokenizer_config.json").unlink()
    os.symlink(user / "notes.txt", linked / "tokenizer_config.json")

    def checkpoint(name: str, damage) -> None:
        copy = root / name / STEP
        shutil.copytree(good, copy)
        damage(copy)
        reseal(copy)  # as an attacker would: the digests match, so only the loader's own checks remain

    def symlinked_tokenizer_config(c: Path) -> None:
        (c / "tokenizer_config.json").unlink()
        os.symlink(user / "notes.txt", c / "tokenizer_config.json")

    checkpoint("two-layers", lambda c: edit_json(c / "config.json", num_hidden_layers=2))
    checkpoint("other-width", lambda c: edit_json(c / "config.json", intermediate_size=64))
    checkpoint("nan-eps", lambda c: edit_json(c / "config.json", rms_norm_eps=float("nan")))
    checkpoint("many-layers", lambda c: edit_json(c / "config.json", num_hidden_layers=1500))
    checkpoint("linked-tokenizer", symlinked_tokenizer_config)
    checkpoint("fifo-config", lambda c: ((c / "config.json").unlink(), os.mkfifo(c / "config.json")))

    def export(name: str, damage) -> None:
        shutil.copytree(root / "hf", root / name)
        damage(root / name)

    export("hf-six-layers", lambda e: edit_json(e / "config.json", num_hidden_layers=6))
    export("hf-1500-layers", lambda e: edit_json(e / "config.json", num_hidden_layers=1500))
    export("hf-eos-off-vocab", lambda e: edit_json(e / "config.json", eos_token_id=100_000))
    export("hf-latin1-config", lambda e: (e / "config.json").write_bytes((e / "config.json").read_bytes() + b"\xe9"))
    export("hf-big-tokenizer", lambda e: shutil.copy(root / "big-tokenizer" / "tokenizer.json", e / "tokenizer.json"))

    def linked_weights(e: Path) -> None:
        shutil.move(e / "model.safetensors", root / "user" / "weights.safetensors")
        os.symlink(root / "user" / "weights.safetensors", e / "model.safetensors")

    export("hf-linked-weights", linked_weights)

    def escaping_index(e: Path) -> None:
        (e / "model.safetensors").unlink()
        index = {"metadata": {}, "weight_map": {"model.norm.weight": "../hf/model.safetensors"}}
        (e / "model.safetensors.index.json").write_text(json.dumps(index))

    export("hf-escaping-index", escaping_index)

    def linked_tokenizer(e: Path) -> None:
        (e / "tokenizer.json").unlink()
        os.symlink(root / "big-tokenizer" / "tokenizer.json", e / "tokenizer.json")

    export("hf-linked-tokenizer", linked_tokenizer)

    def run(name: str, damage) -> None:
        shutil.copytree(root / "run", root / name)
        damage(root / name)

    def string_loss(r: Path) -> None:
        lines = (r / "metrics.jsonl").read_text().splitlines()
        lines[2] = json.dumps({**json.loads(lines[2]), "loss": "low"})
        (r / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    run("run-string-loss", string_loss)
    run("run-fifo-metrics", lambda r: ((r / "metrics.jsonl").unlink(), os.mkfifo(r / "metrics.jsonl")))
    run("run-user-png", lambda r: (r / "metrics.png").write_bytes(b"\x89PNG\r\n\x1a\n a user's own image"))
    return root


@contextlib.contextmanager
def another_export_writing(world: Path):
    with folders.OutputLock(world / "busy", "OUT"):  # held by this process, which is alive
        yield


@dataclass
class Case:
    main: object
    args: object  # world -> argument list
    fragment: str  # what the one line must name
    during: object = None  # world -> context manager around the call


def checkpoint_of(world: Path, name: str) -> list:
    return [world / name / STEP]


def generating_from(world: Path, name: str) -> list:
    return [world / name, "--max-new-tokens", "4"]


def evaluating_text_with(world: Path, name: str) -> list:
    return [world / name, "--text", world / "corpus.txt", "--seq-len", "32"]


CASES = {
    "export: OUT a symlink to a user folder": Case(
        export_main, lambda w: [w / "good" / STEP, w / "link-to-user"], "symlink"
    ),
    "export: --overwrite through a symlink": Case(
        export_main, lambda w: [w / "good" / STEP, w / "link-to-user", "--overwrite"], "symlink"
    ),
    "export: OUT inside the checkpoint": Case(
        export_main, lambda w: [w / "good" / STEP, w / "good" / STEP / "hf"], "inside"
    ),
    "export: tokenizer_config.json a symlink to a user file": Case(
        export_main, lambda w: checkpoint_of(w, "linked-tokenizer") + [w / "out"], "tokenizer_config.json"
    ),
    "export: --tokenizer folder with a symlinked file": Case(
        export_main,
        lambda w: [w / "good" / STEP, w / "out", "--tokenizer", w / "linked-tokenizer-folder"],
        "tokenizer_config.json: is a symlink",
    ),
    "export: config says 2 layers, weights hold 4": Case(
        export_main, lambda w: checkpoint_of(w, "two-layers") + [w / "out"], "num_hidden_layers is 2"
    ),
    "export: config says another expert width": Case(
        export_main, lambda w: checkpoint_of(w, "other-width") + [w / "out"], "w_gate of shape [8, 128, 64]"
    ),
    "export: config with a NaN epsilon": Case(
        export_main, lambda w: checkpoint_of(w, "nan-eps") + [w / "out"], "rms_norm_eps"
    ),
    "export: config says 1,500 layers": Case(
        export_main, lambda w: checkpoint_of(w, "many-layers") + [w / "out"], "num_hidden_layers is 1500"
    ),
    "export: config.json a FIFO": Case(
        export_main, lambda w: checkpoint_of(w, "fifo-config") + [w / "out"], "config.json"
    ),
    "export: 512-token tokenizer for a 260-token model": Case(
        export_main, lambda w: [w / "good" / STEP, w / "out", "--tokenizer", w / "big-tokenizer"], "vocab_size 260"
    ),
    "export: a second export into the same OUT": Case(
        export_main, lambda w: [w / "good" / STEP, w / "busy"], "in use by another process", another_export_writing
    ),
    "export: shard size of nothing": Case(
        export_main, lambda w: [w / "good" / STEP, w / "out", "--max-shard-size", "0GB"], "--max-shard-size"
    ),
    "evaluate: export config says 6 layers, weights hold 4": Case(
        evaluate_main, lambda w: evaluating_text_with(w, "hf-six-layers"), "num_hidden_layers is 6"
    ),
    "evaluate: model.safetensors a symlink": Case(
        evaluate_main, lambda w: evaluating_text_with(w, "hf-linked-weights"), "symlink"
    ),
    "evaluate: shard index names a file outside the export": Case(
        evaluate_main, lambda w: evaluating_text_with(w, "hf-escaping-index"), "../hf/model.safetensors"
    ),
    "evaluate: --text a FIFO": Case(evaluate_main, lambda w: [w / "hf", "--text", w / "fifo"], "--text"),
    "evaluate: tokenizer.json a symlink": Case(
        evaluate_main, lambda w: evaluating_text_with(w, "hf-linked-tokenizer"), "tokenizer.json: is a symlink"
    ),
    "evaluate: seq len beyond any context": Case(
        evaluate_main, lambda w: [w / "hf", "--text", w / "corpus.txt", "--seq-len", "10" * 20], "--seq-len"
    ),
    "generate: 512-token tokenizer in a 260-token export": Case(
        generate_main, lambda w: generating_from(w, "hf-big-tokenizer"), "vocab_size 260"
    ),
    "generate: end-of-text id off the vocabulary": Case(
        generate_main, lambda w: generating_from(w, "hf-eos-off-vocab"), "eos_token_id"
    ),
    "generate: config.json not UTF-8": Case(
        generate_main, lambda w: generating_from(w, "hf-latin1-config"), "not UTF-8"
    ),
    "generate: prompt file a FIFO": Case(
        generate_main, lambda w: [w / "hf", "--prompt-file", w / "fifo"], "--prompt-file"
    ),
    "generate: seed beyond 64 bits": Case(generate_main, lambda w: [w / "hf", "--seed", str(2**70)], "--seed"),
    "generate: NaN temperature": Case(generate_main, lambda w: [w / "hf", "--temperature", "nan"], "--temperature"),
    "generate: memory budget of no size": Case(
        generate_main, lambda w: [w / "hf", "--max-memory", "0=lots"], "--max-memory"
    ),
    "generate: offload into a user's folder": Case(
        generate_main,
        lambda w: [w / "hf", "--max-memory", "cpu=1MB", "--offload-folder", w / "user", "--max-new-tokens", "2"],
        "--offload-folder",
    ),
    "generate: a prompt longer than the context": Case(
        generate_main, lambda w: [w / "hf", "--prompt", "x" * 300], "fill the model's context of 256"
    ),
    "plot: --out a user's text file": Case(
        plot_main, lambda w: [w / "run", "--out", w / "user" / "notes.txt"], "did not write it"
    ),
    "plot: --out a symlink": Case(plot_main, lambda w: [w / "run", "--out", w / "link.png"], "symlink"),
    "plot: default PNG is a user's file": Case(plot_main, lambda w: [w / "run-user-png"], "did not write it"),
    "plot: a metrics row with a string loss": Case(plot_main, lambda w: [w / "run-string-loss"], "line 3: loss"),
    "plot: metrics.jsonl a FIFO": Case(plot_main, lambda w: [w / "run-fifo-metrics"], "metrics.jsonl"),
    "plan: zero GPUs in --gpu-counts": Case(
        plan_main, lambda w: ["--scaling", "grok-1", "--gpu-counts", "0,8"], "--gpu-counts"
    ),
    "plan: negative --gpu-counts": Case(
        plan_main, lambda w: ["--scaling", "grok-1", "--gpu-counts", "-8"], "--gpu-counts"
    ),
    "plan: --plot over a user's file": Case(
        plan_main, lambda w: ["--scaling", "tiny", "--gpu-counts", "1", "--plot", w / "user" / "notes.txt"], "--plot"
    ),
    "plan: --plot a symlink": Case(
        plan_main, lambda w: ["--scaling", "tiny", "--gpu-counts", "1", "--plot", w / "link.png"], "symlink"
    ),
    "plan: --plot where no layout fits": Case(
        plan_main,
        lambda w: ["--scaling", "tiny", "--gpu-counts", "1", "--global-batch-tokens", "1", "--plot", w / "out"],
        "nothing to draw",
    ),
    "plan: a 1e300-token batch": Case(
        plan_main,
        lambda w: ["--model", "grok-1", "--gpus", "8", "--global-batch-tokens", "1e300"],
        "--global-batch-tokens",
    ),
    "bench: --profile over a user's file": Case(
        bench_main,
        lambda w: ["model", "--config", "configs/tiny.toml", "--profile", w / "user" / "notes.txt"],
        "--profile",
    ),
}


def test_there_are_enough_cases():
    assert len(CASES) >= 25


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_one_line_and_changes_nothing(name, world, monkeypatch):
    monkeypatch.chdir(REPO)  # bench's configs/ paths
    case = CASES[name]
    args = case.args(world)
    touched = [world / "user", world / "out", *(Path(a) for a in args if isinstance(a, Path))]
    before = snapshot(*touched)
    with case.during(world) if case.during else contextlib.nullcontext(), peak_bounded():
        result = in_process(case.main, *args)
    assert_one_line(result, case.fragment)
    assert snapshot(*touched) == before
    assert not list(world.glob(".out.*")) and not list(world.glob(".*.lock"))  # no temporary folder, no lock left


def test_an_export_cleans_what_a_killed_one_left_and_only_that(world, tmp_path):
    out = tmp_path / "hf"
    killed = folders.begin(out, "export", f".{out.name}.tmp-999999")  # as a killed export leaves it
    (killed / "model.safetensors").write_bytes(b"\0" * 4096)
    users = tmp_path / f".{out.name}.tmp-1"  # the same pattern, unmarked: not ours
    users.mkdir()
    (users / "keep.txt").write_text("mine")
    assert in_process(export_main, world / "good" / STEP, out).returncode == 0
    assert not killed.exists() and (users / "keep.txt").read_text() == "mine"
    assert folders.kind_of(out) == "export" and not list(tmp_path.glob(f".{out.name}.lock"))


def test_plot_and_plan_replace_their_own_png_and_nothing_else(world, tmp_path):
    png = tmp_path / "curves.png"
    for _ in range(2):  # the second run replaces the first one's plot
        assert in_process(plot_main, world / "run", "--out", png).returncode == 0
    scaling = ["--scaling", "tiny", "--gpu-counts", "1", "--plot", png]
    assert in_process(plan_main, *scaling).returncode == 0  # a plot of this project, whichever tool drew it
    png.write_bytes(png.read_bytes().replace(b"minicolossus", b"someone-else"))
    assert_one_line(in_process(plan_main, *scaling), "did not write it")


def test_plot_leaves_out_what_a_log_axis_cannot_show_without_a_warning(tmp_path):
    rows = [{"step": step, "tokens_seen": 100 * step, "loss": -1.0, "lr": 0.1} for step in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with warnings.catch_warnings(record=True) as warned:  # matplotlib warns of a log axis with no positive value
        warnings.simplefilter("always")
        result = in_process(plot_main, tmp_path)
    assert result.returncode == 0 and (tmp_path / "metrics.png").is_file(), result.stderr[-2000:]
    assert not [str(w.message) for w in warned]


def test_generation_past_the_context_only_when_asked(world):
    past = [world / "hf", "--prompt", "x" * 250, "--max-new-tokens", "10", "--greedy", "--no-stream"]
    assert_one_line(in_process(generate_main, *past), "ask for at most 6, or pass --beyond-context")
    result = in_process(generate_main, *past, "--beyond-context")
    assert result.returncode == 0 and len(result.stdout.strip()) > 250, result.stderr[-2000:]


def test_a_huge_batch_size_allocates_only_the_windows_there_are(world):
    args = [world / "hf", "--text", world / "corpus.txt", "--seq-len", "32", "--batch-size", str(10**12)]
    result = in_process(evaluate_main, *args)  # a batch is allocated whole: 10^12 rows would not fit anywhere
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["val_tokens"] > 0


# --- fresh processes: what only a new interpreter shows (memory, stdout at import, a file size limit) --------


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (lambda w: ["scripts/evaluate.py", w / "hf-1500-layers", "--text", w / "corpus.txt"], "num_hidden_layers"),
        (lambda w: ["scripts/generate.py", w / "hf", "--max-new-tokens", "1000000000"], "--max-new-tokens"),
    ],
    ids=["an export config of 1,500 layers", "a billion new tokens for a 256-token model"],
)
@pytest.mark.distributed  # runs a command in a fresh interpreter
def test_lying_sizes_stop_at_once_in_bounded_memory(world, argv, fragment):
    result = run_bounded([str(a) for a in argv(world)], timeout=90)
    assert_one_line(result, fragment)
    assert result.peak_rss_mib < PEAK_RSS_MIB, result.peak_rss_mib


# The first export must print its one line and nothing else: DeepSpeed, imported by Accelerate inside
# save_pretrained, logs to stdout, and only in a process where it was not imported before. Then the file
# size limit makes every write past 1 MiB fail as a full disk does (SIGXFSZ ignored: the write returns EFBIG).
FULL_DISK = """
import resource, signal, sys
from toolbox.export import main
assert main([sys.argv[1], sys.argv[2]]) == 0
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
sys.exit(main([sys.argv[1], sys.argv[3]]))
"""


@pytest.mark.distributed  # runs a command in a fresh interpreter
def test_a_fresh_export_prints_one_line_and_a_full_disk_leaves_nothing(world, tmp_path):
    checkpoint, quiet, full = world / "good" / STEP, tmp_path / "quiet", tmp_path / "full"
    result = run_bounded(["-c", FULL_DISK, str(checkpoint), str(quiet), str(full)], timeout=120)
    assert result.stdout == f"exported {checkpoint} -> {quiet}\n"
    line = assert_one_line(result, f"OUT {full}: writing the export failed")
    assert "MiB free" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quiet"]  # no OUT, no temporary folder, no lock
