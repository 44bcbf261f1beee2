"""`python -m train` against hostile run folders, checkpoints and flags: symlinks where the run writes,
checkpoints edited and resealed (digests catch damage, not edits), lying state, huge numbers. Each case ends
in one line naming the file or field, exit code 2, before any training step, with no file of anyone's
changed; the links beside a run are never followed, and what is merely unusual (a huge evaluation batch, a
learning rate that skips updates) runs and says so."""

import json
import os
import shutil
from pathlib import Path

import pytest
import ranks
import torch
from conftest import base_args, in_process, reseal
from safetensors.torch import save_file
from untrusted import assert_one_line, peak_bounded, snapshot

from groundwork import folders
from train import batch_memory
from train.__main__ import main as train_main
from train.checkpoint import MARKER, file_digest
from train.metrics import read_metrics

CHECKPOINT = "step_00000006"


def edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


def list_in_complete(checkpoint: Path, name: str, file: Path) -> None:
    """COMPLETE made to list `name` with the true digest of `file`, as an editor could."""
    edit_json(checkpoint / MARKER, lambda marker: marker["files"].update({name: file_digest(file)}))


@pytest.fixture(scope="module")
def world(data_dir, reference, tmp_path_factory) -> Path:
    """The user's files, hostile run folders and edited copies of a good checkpoint, built once."""
    root = tmp_path_factory.mktemp("untrusted-runs")
    user = root / "user"
    user.mkdir()
    (user / "notes.txt").write_text("the user's own file")
    (user / "precious.bin").write_bytes(os.urandom(4096))
    (user / "latin1.toml").write_bytes(b"[run]\n# caf\xe9\nmax_steps = 3\n")
    os.mkfifo(user / "fifo.toml")
    good = reference[1] / "checkpoints" / CHECKPOINT

    def run_folder(name: str, link: str, target: Path) -> None:  # a marked run folder, a link where it writes
        (root / name).mkdir()
        folders.mark(root / name, "run")
        os.symlink(target, root / name / link)

    for link, target in (
        ("config.toml", user / "notes.txt"),
        ("data_manifest.json", user / "notes.txt"),
        ("metrics.jsonl", user / "notes.txt"),
        (folders.LOCK, user / "notes.txt"),
        ("tensorboard", user),
    ):
        run_folder(f"link-{link.strip('.')}", link, target)
    (root / "fifo-metrics").mkdir()
    folders.mark(root / "fifo-metrics", "run")
    os.mkfifo(root / "fifo-metrics" / "metrics.jsonl")
    for name, link, target in (("link-step", "step_00000018", user), ("link-checkpoint", CHECKPOINT, good)):
        (root / name / "checkpoints").mkdir(parents=True)
        folders.mark(root / name / "checkpoints", "checkpoints")
        os.symlink(target, root / name / "checkpoints" / link)
    os.symlink(user, root / "linked-checkpoint-dir")

    def checkpoint_copy(name: str, damage, seal: bool = True) -> None:
        copy = root / name / "checkpoints" / CHECKPOINT
        shutil.copytree(good, copy)
        damage(copy)
        if seal:
            reseal(copy)

    def trainer_json(name: str, change) -> None:
        checkpoint_copy(name, lambda c: edit_json(c / "trainer.json", change))

    # COMPLETE: names outside the folder, links, files it does not list
    escaping, absolute = "../../../user/precious.bin", str(user / "precious.bin")
    checkpoint_copy("escaping-name", lambda c: list_in_complete(c, escaping, user / "precious.bin"), seal=False)
    checkpoint_copy("absolute-name", lambda c: list_in_complete(c, absolute, user / "precious.bin"), seal=False)

    def linked_listed_file(c: Path) -> None:
        (c / "tokenizer_config.json").unlink()
        os.symlink(user / "notes.txt", c / "tokenizer_config.json")

    checkpoint_copy("linked-listed-file", linked_listed_file)

    def linked_folder(c: Path) -> None:
        os.symlink(user, c / "deepspeed")
        list_in_complete(c, "deepspeed/precious.bin", user / "precious.bin")

    checkpoint_copy("linked-nested-folder", linked_folder, seal=False)
    checkpoint_copy("unlisted-file", lambda c: (c / "extra.bin").write_bytes(b"not listed"), seal=False)
    checkpoint_copy("unlisted-link", lambda c: os.symlink(user / "notes.txt", c / "notes.txt"), seal=False)
    checkpoint_copy(
        "trainer-fifo", lambda c: ((c / "trainer.json").unlink(), os.mkfifo(c / "trainer.json")), seal=False
    )
    checkpoint_copy("trainer-huge", lambda c: (c / "trainer.json").write_text("{}" + " " * (17 << 20)))
    checkpoint_copy("untouched", lambda c: None, seal=False)
    # trainer.json: out of range, wrong types, inconsistent with its folder or with the run
    trainer_json("step-negative", lambda m: m.update(step=-3))
    trainer_json("step-float", lambda m: m.update(step=1e30))
    trainer_json("step-bool", lambda m: m.update(step=True))
    trainer_json("step-not-the-folder", lambda m: m.update(step=7))
    trainer_json("samples-negative", lambda m: m["loader"].update(samples_consumed=-8))
    trainer_json("samples-missing", lambda m: m["loader"].pop("samples_consumed"))
    trainer_json("tokens-inconsistent", lambda m: m.update(tokens_seen=10**18))
    trainer_json("skipped-beyond-step", lambda m: m.update(skipped_steps=99))
    trainer_json("loss-mean-nan", lambda m: m.update(loss_mean=float("nan")))
    trainer_json("world-size-zero", lambda m: m.update(world_size=0))
    trainer_json("format-of-other-strategy", lambda m: m.update(format="deepspeed"))
    trainer_json("loader-other-seed", lambda m: m["loader"].update(seed=5))
    trainer_json("epoch-beyond-samples", lambda m: m["loader"].update(epoch=10**6))
    checkpoint_copy("config-other-width", lambda c: edit_json(c / "config.json", lambda m: m.update(hidden_size=64)))
    checkpoint_copy(
        "rng-invalid-state",
        lambda c: save_file({"cpu": torch.zeros(5056, dtype=torch.uint8)}, c / "rng_rank0.safetensors"),
    )
    checkpoint_copy("rng-huge", lambda c: (c / "rng_rank0.safetensors").write_bytes(b"\0" * (2 << 20)))
    return root


def run_args(world: Path, data: Path, run: str, *rest) -> list:
    """A training command line on the good data, in one of the world's run folders."""
    return base_args(data, world / run) + list(rest)


# name -> (arguments given the world and the data, the fragment the one line must contain)
CASES = {
    "config.toml a link to the user's file": (
        lambda w, d: run_args(w, d, "link-config.toml"),
        "config.toml is a symlink",
    ),
    "data_manifest.json a link": (
        lambda w, d: run_args(w, d, "link-data_manifest.json"),
        "data_manifest.json is a symlink",
    ),
    "metrics.jsonl a link": (lambda w, d: run_args(w, d, "link-metrics.jsonl"), "metrics.jsonl is a symlink"),
    "metrics.jsonl a FIFO": (lambda w, d: run_args(w, d, "fifo-metrics"), "metrics.jsonl is not a regular file"),
    "the lock a link": (lambda w, d: run_args(w, d, "link-lock"), ".lock is a symlink"),
    "tensorboard a link to the user's folder": (
        lambda w, d: run_args(w, d, "link-tensorboard", "--log.tensorboard=false"),
        "tensorboard is a symlink",
    ),
    "a link named like a checkpoint": (lambda w, d: run_args(w, d, "link-step"), "step_00000018 is a symlink"),
    "a link to a checkpoint elsewhere": (lambda w, d: run_args(w, d, "link-checkpoint"), f"{CHECKPOINT} is a symlink"),
    "checkpoint.dir a link": (
        lambda w, d: run_args(w, d, "fresh", f"--checkpoint.dir={w / 'linked-checkpoint-dir'}"),
        "checkpoint.dir",
    ),
    "COMPLETE names a file outside": (
        lambda w, d: run_args(w, d, "escaping-name"),
        "not a file name inside the checkpoint",
    ),
    "COMPLETE names an absolute path": (
        lambda w, d: run_args(w, d, "absolute-name"),
        "not a file name inside the checkpoint",
    ),
    "a listed file is a link": (lambda w, d: run_args(w, d, "linked-listed-file"), "tokenizer_config.json: a symlink"),
    "a listed folder is a link": (lambda w, d: run_args(w, d, "linked-nested-folder"), "deepspeed: a symlink"),
    "a file COMPLETE does not list": (
        lambda w, d: run_args(w, d, "unlisted-file"),
        "extra.bin: not listed in COMPLETE",
    ),
    "a link COMPLETE does not list": (
        lambda w, d: run_args(w, d, "unlisted-link"),
        "notes.txt: not listed in COMPLETE",
    ),
    "trainer.json a FIFO": (lambda w, d: run_args(w, d, "trainer-fifo"), "trainer.json: not a regular file"),
    "trainer.json of 17 MiB": (lambda w, d: run_args(w, d, "trainer-huge"), "trainer.json: larger than"),
    "step -3": (lambda w, d: run_args(w, d, "step-negative"), "trainer.json: step: -3"),
    "step 1e30": (lambda w, d: run_args(w, d, "step-float"), "trainer.json: step: 1e+30"),
    "step true": (lambda w, d: run_args(w, d, "step-bool"), "trainer.json: step: True"),
    "step not its folder's": (lambda w, d: run_args(w, d, "step-not-the-folder"), "not the step of its folder"),
    "negative samples consumed": (lambda w, d: run_args(w, d, "samples-negative"), "loader.samples_consumed: -8"),
    "samples consumed missing": (lambda w, d: run_args(w, d, "samples-missing"), "loader.samples_consumed: None"),
    "tokens seen inconsistent": (lambda w, d: run_args(w, d, "tokens-inconsistent"), "trainer.json: tokens_seen"),
    "more skipped steps than steps": (
        lambda w, d: run_args(w, d, "skipped-beyond-step"),
        "trainer.json: skipped_steps",
    ),
    "loss mean NaN": (lambda w, d: run_args(w, d, "loss-mean-nan"), "trainer.json: loss_mean"),
    "world size 0": (lambda w, d: run_args(w, d, "world-size-zero"), "trainer.json: world_size"),
    "format of the other engine": (lambda w, d: run_args(w, d, "format-of-other-strategy"), "trainer.json: strategy"),
    "loader seed of another run": (lambda w, d: run_args(w, d, "loader-other-seed"), "loader.seed 5 is not this run's"),
    "loader epoch beyond its samples": (
        lambda w, d: run_args(w, d, "epoch-beyond-samples"),
        "trainer.json: loader.epoch",
    ),
    "step beyond run.max_steps": (lambda w, d: run_args(w, d, "untouched", "--run.max_steps=4"), "run.max_steps 4"),
    "config.json of another width": (
        lambda w, d: run_args(w, d, "config-other-width"),
        "config.json: hidden_size is 64",
    ),
    "RNG state invalid": (lambda w, d: run_args(w, d, "rng-invalid-state"), "rng_rank0.safetensors: not an RNG state"),
    "RNG file of 2 MiB": (lambda w, d: run_args(w, d, "rng-huge"), "rng_rank0.safetensors: larger than"),
    "config not UTF-8": (lambda w, d: ["--config", w / "user" / "latin1.toml"], "latin1.toml: not UTF-8"),
    "config a FIFO": (lambda w, d: ["--config", w / "user" / "fifo.toml"], "fifo.toml: not a regular file"),
    "seed beyond 64 bits": (lambda w, d: run_args(w, d, "fresh", f"--run.seed={2**64}"), "run.seed"),
    "max_steps beyond any run": (lambda w, d: run_args(w, d, "fresh", f"--run.max_steps={10**30}"), "run.max_steps"),
    "timeout beyond a week": (lambda w, d: run_args(w, d, "fresh", f"--run.timeout_s={10**17}"), "run.timeout_s"),
    "prefetch beyond reason": (lambda w, d: run_args(w, d, "fresh", f"--data.prefetch={10**12}"), "data.prefetch"),
    "micro batch beyond memory": (
        lambda w, d: run_args(
            w, d, "fresh", "--batch.global_batch_size=100000000", "--batch.micro_batch_size=100000000"
        ),
        "batch.micro_batch_size 100000000",
    ),
    "global batch beyond memory": (
        lambda w, d: run_args(w, d, "fresh", f"--batch.global_batch_size={4 * 10**14}"),
        "batch.global_batch_size",
    ),
}


@pytest.fixture(scope="module")
def before(world, data_dir) -> dict:
    return snapshot(world, data_dir)


def test_there_are_many_cases():
    assert len(CASES) >= 20


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_is_one_line_before_any_step_and_changes_nothing(case, world, data_dir, before):
    args, fragment = CASES[case]
    with peak_bounded():
        result = in_process(train_main, *args(world, data_dir))
    assert_one_line(result, fragment)
    assert "minicolossus:" not in result.stdout  # the run never started: no step, nothing announced
    after = snapshot(world, data_dir)
    assert {path: after.get(path) for path in before} == before, case
    added = {Path(path).name for path in set(after) - set(before)}  # markers of folders a run claimed
    assert added <= {folders.MARKER, "checkpoints", "fresh"}, (case, added)


def test_links_beside_checkpoints_survive_pruning_and_a_huge_eval_batch_is_clamped(data_dir, reference, tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("the user's own file")
    run = tmp_path / "run"
    shutil.copytree(reference[1] / "checkpoints" / CHECKPOINT, run / "checkpoints" / CHECKPOINT)
    folders.mark(run, "run")
    folders.mark(run / "checkpoints", "checkpoints")  # only inside marked folders are the links allowed
    links = {
        run / "checkpoints" / "latest": user,
        run / "checkpoints" / "notes": user / "notes.txt",
        run / "mine": user,
    }
    for link, target in links.items():
        os.symlink(target, link)
    before = snapshot(user)
    # pruning runs after every save (keep 1); the evaluation batch asks for far more than memory holds
    args = base_args(data_dir, run) + ["--checkpoint.every=2", "--checkpoint.keep=1", "--eval.batch_size=100000000"]
    result = in_process(train_main, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert snapshot(user) == before
    assert all(link.is_symlink() and Path(os.readlink(link)) == target for link, target in links.items())
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000012"]
    # clamped to the validation windows there are (16, in one batch): the reference run's evaluation, in
    # batches of 4, up to the order of the sums
    assert abs(read_metrics(run)[-1]["val_loss"] - reference[0][-1]["val_loss"]) < 1e-5


def test_a_skipped_update_is_said_on_the_console(data_dir, tmp_path):
    result = in_process(train_main, *base_args(data_dir, tmp_path / "run", steps=4), "--optim.lr=1e30")
    assert result.returncode == 0, result.stderr[-3000:]
    notes = [line for line in result.stdout.splitlines() if "update skipped" in line]
    skipped = read_metrics(tmp_path / "run")[-1]["skipped_steps"]
    assert skipped >= 1 and len(notes) == skipped, result.stdout
    assert all(line.startswith("warning: step ") and "non-finite" in line for line in notes), notes


def test_an_evaluation_batch_beyond_memory_is_refused_before_the_run(data_dir, tmp_path, monkeypatch):
    # 1 MB free: the training micro-batch fits (~0.8 MB), 16 evaluation windows at once (~1.6 MB) do not
    monkeypatch.setattr(batch_memory, "free_bytes", lambda use_cuda: (1_000_000, "this test's memory"))
    result = in_process(train_main, *base_args(data_dir, tmp_path / "run"), "--eval.batch_size=16")
    assert_one_line(result, "eval.batch_size 16: one evaluation batch needs at least")
    assert not (tmp_path / "run").exists()


@pytest.mark.distributed
def test_a_damaged_rng_file_stops_every_rank_in_the_same_line(world, data_dir, tmp_path):
    shutil.copytree(world / "rng-invalid-state", tmp_path / "run")
    program = [*base_args(data_dir, tmp_path / "run"), "--parallel.strategy=fsdp"]
    result = ranks.run_main("train.__main__", program, nproc=2, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    # rank 0's file is damaged, rank 1 has none (saved on one rank): rank 1 must stop with rank 0's line
    assert len(lines) == 2 and lines[0] == lines[1] and "rng_rank0.safetensors: not an RNG state" in lines[0], lines
    assert "train/checkpoint" not in result.stderr and result.returncode == 2, result.stderr[-3000:]
