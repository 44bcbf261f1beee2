"""Every entry point speaks in one line: bad configs, flags, manifests, shards, checkpoints, exports and
folders across train, data.prepare, export, evaluate, generate, plan and bench each exit 2 with exactly
one `error: ...` line naming the file or field, and leave every existing file as it was."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import base_args, reseal

from data.prepare import main as prepare_main
from toolbox.bench import main as bench_main
from toolbox.evaluation import main as evaluate_main
from toolbox.export import main as export_main
from toolbox.generation import main as generate_main
from toolbox.plan import main as plan_main
from train.__main__ import main as train_main
from train.checkpoint import file_digest


def edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


def flip(path: Path, at: int = 100) -> None:
    content = bytearray(path.read_bytes())
    content[min(at, len(content) - 1)] ^= 0xFF
    path.write_bytes(bytes(content))


@pytest.fixture(scope="module")
def world(data_dir, reference, tmp_path_factory) -> Path:
    """Good and damaged inputs side by side, built once; the table's rows only read them."""
    root = tmp_path_factory.mktemp("bad-inputs")
    shutil.copytree(data_dir, root / "data")
    checkpoint = root / "good" / "checkpoints" / "step_00000012"
    shutil.copytree(reference[1] / "checkpoints" / "step_00000012", checkpoint)
    assert export_main([str(checkpoint), str(root / "hf")]) == 0

    def data_copy(name, damage):
        shutil.copytree(data_dir, root / name)
        damage(root / name)

    data_copy("manifest-missing-key", lambda d: edit_json(d / "manifest.json", lambda m: m["tokenizer"].pop("sha256")))
    data_copy("manifest-not-json", lambda d: (d / "manifest.json").write_text("{ not json"))
    data_copy(
        "manifest-escaping-shard",
        lambda d: edit_json(
            d / "manifest.json", lambda m: m["splits"]["train"]["shards"][0].update(file="../../etc/passwd")
        ),
    )
    data_copy(
        "manifest-small-vocab", lambda d: edit_json(d / "manifest.json", lambda m: m["tokenizer"].update(vocab_size=50))
    )
    data_copy("manifest-old-version", lambda d: edit_json(d / "manifest.json", lambda m: m.update(format_version=1)))
    data_copy("shard-truncated", lambda d: (d / "train_000.bin").write_bytes((d / "train_000.bin").read_bytes()[:-9]))
    data_copy("shard-flipped", lambda d: flip(d / "train_000.bin"))
    data_copy("tokenizer-garbage", lambda d: (d / "tokenizer.json").write_text("garbage"))

    def checkpoint_copy(name, damage, seal=True):
        copy = root / name / "checkpoints" / "step_00000012"
        shutil.copytree(checkpoint, copy)
        damage(copy)
        if seal:
            reseal(copy)
        return copy

    checkpoint_copy("trainer-missing-key", lambda c: edit_json(c / "trainer.json", lambda m: m.pop("loader")))
    checkpoint_copy("trainer-not-json", lambda c: (c / "trainer.json").write_text("[1, 2"))
    checkpoint_copy("rng-garbage", lambda c: (c / "rng_rank0.safetensors").write_bytes(b"garbage!" * 4))
    checkpoint_copy("config-not-json", lambda c: (c / "config.json").write_text("{"))
    checkpoint_copy("config-other-model", lambda c: edit_json(c / "config.json", lambda m: m.update(model_type="gpt2")))
    checkpoint_copy("complete-old-format", lambda c: (c / "COMPLETE").write_text("12"), seal=False)
    checkpoint_copy("distcp-flipped", lambda c: flip(next(c.glob("*.distcp")), 5000), seal=False)
    checkpoint_copy(
        "loader-wrong-seq-len", lambda c: edit_json(c / "trainer.json", lambda m: m["loader"].update(seq_len=32))
    )

    def export_copy(name, damage):
        shutil.copytree(root / "hf", root / name)
        damage(root / name)

    export_copy("hf-config-garbage", lambda e: (e / "config.json").write_text("nope"))
    export_copy("hf-weights-garbage", lambda e: (e / "model.safetensors").write_bytes(b"\xff" * 64))
    export_copy("hf-tokenizer-garbage", lambda e: (e / "tokenizer.json").write_text("{]"))
    (root / "user").mkdir()
    (root / "user" / "notes.txt").write_text("mine")
    (root / "bad.toml").write_text("[run\nmax_steps = ")
    (root / "corpus.txt").write_text("\n\n".join(f"paragraph {i} " * 30 for i in range(30)))
    (root / "not-text.bin").write_bytes(b"\xff\xfe\x00\x80" * 10)
    return root


def T(world, *rest):  # a training command line on the world's good data, with a fresh run folder
    return base_args(world / "data", world / "runs" / "x") + list(rest)


# (entry point, arguments given the world, a fragment the one line must contain)
CASES = {
    "train: negative seed": (train_main, lambda w: T(w, "--run.seed=-1"), "run.seed"),
    "train: infinite lr": (train_main, lambda w: T(w, "--optim.lr=inf"), "optim.lr"),
    "train: nan lr": (train_main, lambda w: T(w, "--optim.lr=nan"), "optim.lr"),
    "train: boolean step count": (train_main, lambda w: T(w, "--run.max_steps=true"), "run.max_steps"),
    "train: string step count": (train_main, lambda w: T(w, "--run.max_steps=many"), "run.max_steps"),
    "train: zero micro batch": (train_main, lambda w: T(w, "--batch.micro_batch_size=0"), "batch.micro_batch_size"),
    "train: unknown key": (train_main, lambda w: T(w, "--run.bogus=1"), "run.bogus"),
    "train: number as a flag": (train_main, lambda w: T(w, "--parallel.compile=1"), "parallel.compile"),
    "train: async save with deepspeed": (
        train_main,
        lambda w: T(w, "--checkpoint.async_save=true", "--parallel.strategy=deepspeed"),
        "async_save",
    ),
    "train: missing config file": (train_main, lambda w: ["--config", str(w / "nope.toml")], "nope.toml"),
    "train: invalid TOML": (train_main, lambda w: ["--config", str(w / "bad.toml")], "bad.toml"),
    "train: --config without a file": (train_main, lambda w: ["--config"], "--config"),
    "train: a bare word": (train_main, lambda w: T(w, "oops"), "oops"),
    "train: resume from nothing": (train_main, lambda w: T(w, f"--run.resume={w / 'nothing'}"), "nothing"),
    "train: init_from nothing": (train_main, lambda w: T(w, f"--model.init_from={w / 'user'}"), "model.init_from"),
    "train: run folder of the user": (train_main, lambda w: base_args(w / "data", w / "user"), "run.out_dir"),
    "train: manifest missing a key": (
        train_main,
        lambda w: T(w, f"--data.path={w / 'manifest-missing-key'}"),
        "tokenizer.sha256",
    ),
    "train: manifest not JSON": (
        train_main,
        lambda w: T(w, f"--data.path={w / 'manifest-not-json'}"),
        "not valid JSON",
    ),
    "train: shard outside the folder": (
        train_main,
        lambda w: T(w, f"--data.path={w / 'manifest-escaping-shard'}"),
        "points outside",
    ),
    "train: vocabulary below the ids": (
        train_main,
        lambda w: T(w, f"--data.path={w / 'manifest-small-vocab'}"),
        "vocab_size",
    ),
    "train: old data format": (
        train_main,
        lambda w: T(w, f"--data.path={w / 'manifest-old-version'}"),
        "format_version",
    ),
    "train: truncated shard": (train_main, lambda w: T(w, f"--data.path={w / 'shard-truncated'}"), "train_000.bin"),
    "train: flipped shard": (train_main, lambda w: T(w, f"--data.path={w / 'shard-flipped'}"), "train_000.bin"),
    "train: trainer.json missing a key": (
        train_main,
        lambda w: base_args(w / "data", w / "trainer-missing-key"),
        "'loader'",
    ),
    "train: trainer.json not JSON": (
        train_main,
        lambda w: base_args(w / "data", w / "trainer-not-json"),
        "trainer.json",
    ),
    "train: garbage rng state": (train_main, lambda w: base_args(w / "data", w / "rng-garbage"), "rng_rank0"),
    "train: checkpoint without digests": (
        train_main,
        lambda w: base_args(w / "data", w / "complete-old-format"),
        "COMPLETE",
    ),
    "train: flipped checkpoint shard": (train_main, lambda w: base_args(w / "data", w / "distcp-flipped"), ".distcp"),
    "train: loader state of another seq_len": (
        train_main,
        lambda w: base_args(w / "data", w / "loader-wrong-seq-len"),
        "seq_len",
    ),
    "train: resume=never over checkpoints": (
        train_main,
        lambda w: base_args(w / "data", w / "good") + ["--run.resume=never"],
        "run.resume",
    ),
    "prepare: missing source": (
        prepare_main,
        lambda w: ["--source", str(w / "none.txt"), "--out", str(w / "p")],
        "none.txt",
    ),
    "prepare: val fraction above 1": (
        prepare_main,
        lambda w: ["--source", str(w / "corpus.txt"), "--out", str(w / "p"), "--val-fraction", "2"],
        "--val-fraction",
    ),
    "prepare: tiny vocabulary": (
        prepare_main,
        lambda w: ["--source", str(w / "corpus.txt"), "--out", str(w / "p"), "--vocab-size", "10"],
        "--vocab-size",
    ),
    "prepare: unknown flag": (
        prepare_main,
        lambda w: ["--source", "stdlib", "--out", str(w / "p"), "--bogus"],
        "--bogus",
    ),
    "prepare: user folder as out": (
        prepare_main,
        lambda w: ["--source", str(w / "corpus.txt"), "--out", str(w / "user"), "--overwrite"],
        "did not make",
    ),
    "prepare: data folder with other settings": (
        prepare_main,
        lambda w: ["--source", str(w / "corpus.txt"), "--out", str(w / "data")],
        "other settings",
    ),
    "export: not a checkpoint": (export_main, lambda w: [str(w / "user"), str(w / "out")], "COMPLETE"),
    "export: bad shard size": (
        export_main,
        lambda w: [str(w / "good/checkpoints/step_00000012"), str(w / "out"), "--max-shard-size", "lots"],
        "--max-shard-size",
    ),
    "export: unknown dtype": (
        export_main,
        lambda w: [str(w / "good/checkpoints/step_00000012"), str(w / "out"), "--dtype", "fp16"],
        "--dtype",
    ),
    "export: over a user folder": (
        export_main,
        lambda w: [str(w / "good/checkpoints/step_00000012"), str(w / "user")],
        "did not make",
    ),
    "export: over its own export without --overwrite": (
        export_main,
        lambda w: [str(w / "good/checkpoints/step_00000012"), str(w / "hf")],
        "--overwrite",
    ),
    "export: config.json not JSON": (
        export_main,
        lambda w: [str(w / "config-not-json/checkpoints/step_00000012"), str(w / "out")],
        "config.json",
    ),
    "export: config of another model": (
        export_main,
        lambda w: [str(w / "config-other-model/checkpoints/step_00000012"), str(w / "out")],
        "model_type",
    ),
    "export: flipped checkpoint shard": (
        export_main,
        lambda w: [str(w / "distcp-flipped/checkpoints/step_00000012"), str(w / "out")],
        "damaged",
    ),
    "export: tokenizer folder without one": (
        export_main,
        lambda w: [str(w / "good/checkpoints/step_00000012"), str(w / "out"), "--tokenizer", str(w / "user")],
        "tokenizer.json",
    ),
    "evaluate: zero seq len": (
        evaluate_main,
        lambda w: [str(w / "hf"), "--data", str(w / "data"), "--seq-len", "0"],
        "--seq-len",
    ),
    "evaluate: missing text": (evaluate_main, lambda w: [str(w / "hf"), "--text", str(w / "none.txt")], "none.txt"),
    "evaluate: seq len beyond the context": (
        evaluate_main,
        lambda w: [str(w / "hf"), "--data", str(w / "data"), "--seq-len", "100000"],
        "context",
    ),
    "evaluate: export config garbage": (
        evaluate_main,
        lambda w: [str(w / "hf-config-garbage"), "--data", str(w / "data")],
        "config.json",
    ),
    "evaluate: export weights garbage": (
        evaluate_main,
        lambda w: [str(w / "hf-weights-garbage"), "--data", str(w / "data")],
        "cannot be loaded",
    ),
    "evaluate: damaged data": (
        evaluate_main,
        lambda w: [str(w / "hf"), "--data", str(w / "shard-flipped"), "--split", "train"],
        "train_000.bin",
    ),
    "generate: zero temperature": (generate_main, lambda w: [str(w / "hf"), "--temperature", "0"], "--temperature"),
    "generate: bad memory budget": (generate_main, lambda w: [str(w / "hf"), "--max-memory", "lots"], "--max-memory"),
    "generate: missing prompt file": (
        generate_main,
        lambda w: [str(w / "hf"), "--prompt-file", str(w / "none.txt")],
        "none.txt",
    ),
    "generate: binary prompt file": (
        generate_main,
        lambda w: [str(w / "hf"), "--prompt-file", str(w / "not-text.bin")],
        "not-text.bin",
    ),
    "generate: nothing at MODEL": (generate_main, lambda w: [str(w / "user")], "neither a complete checkpoint"),
    "generate: garbage tokenizer": (
        generate_main,
        lambda w: [str(w / "hf-tokenizer-garbage"), "--max-new-tokens", "2"],
        "tokenizer.json",
    ),
    "plan: unknown GPU": (
        plan_main,
        lambda w: ["--model", "grok-1", "--gpus", "8", "--gpu", "tpu", "--strategy", "fsdp"],
        "--gpu",
    ),
    "plan: negative GPU count": (
        plan_main,
        lambda w: ["--model", "grok-1", "--gpus", "-8", "--strategy", "fsdp"],
        "--gpus",
    ),
    "plan: tp as a word": (
        plan_main,
        lambda w: ["--model", "grok-1", "--gpus", "8", "--strategy", "fsdp", "--tp", "eight"],
        "--tp",
    ),
    "bench: bad trainer override": (
        bench_main,
        lambda w: ["model", "--config", "configs/tiny.toml", "--run.max_steps=many"],
        "run.max_steps",
    ),
    "bench: unknown section": (bench_main, lambda w: ["nonsense"], "nonsense"),
}


def digests(root: Path) -> dict:
    return {str(p.relative_to(root)): file_digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world_digests(world):
    return digests(world)


@pytest.mark.compat
def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40


@pytest.mark.compat
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_changes_no_file(case, world, world_digests, capsys, monkeypatch):
    from conftest import REPO

    monkeypatch.chdir(REPO)  # bench's configs/ paths
    main, args, fragment = CASES[case]
    capsys.readouterr()
    try:
        code = main([str(a) for a in args(world)])
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (case, err)
    assert len(err) == 1 and err[0].startswith("error: "), (case, err)
    assert fragment in err[0], (case, err[0])
    after = digests(world)
    assert {name: after.get(name) for name in world_digests} == world_digests, case  # nothing changed or lost
    added = set(after) - set(world_digests)  # at most the marker of a folder the run had claimed
    assert all(Path(name).name == ".minicolossus.json" for name in added), (case, added)
    assert not (world / "out").exists() and not (world / "p").exists()
