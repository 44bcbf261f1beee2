"""Files are sacred: nothing the project did not make is deleted or overwritten, no file runs code, and
damaged or mismatched files stop with one line. Real runs (one process, or torchrun + gloo) and the real
command lines; hostile files are built here and must never execute."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, STEPS, Payload, base_args, losses, reseal, train

from data.prepare import main as prepare_main
from groundwork import folders
from toolbox.evaluation import main as evaluate_main
from toolbox.export import main as export_main
from toolbox.generation import main as generate_main
from train.__main__ import main as train_main
from train.weights import load_model_weights


def exit_code(main, *args) -> int:
    try:
        return main([str(a) for a in args])
    except SystemExit as stop:  # argparse's exit
        return stop.code


def one_line(capsys, main, *args) -> str:
    """Runs a command line that must refuse: exit 2 and exactly one line on stderr, returned."""
    capsys.readouterr()  # what earlier commands printed
    assert exit_code(main, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def snapshot(root: Path) -> dict:
    """Every file under root with its bytes: what must not change."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def user_folder(path: Path) -> Path:
    """A folder of the user's, with things in it named like ours."""
    (path / "notes.txt").parent.mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    (path / "step_00000001").mkdir()
    (path / "step_00000001" / "data.bin").write_bytes(b"\0" * 10)
    (path / "draft.tmp").mkdir()
    (path / "draft.tmp" / "x").write_text("mine too")
    return path


# --- never delete what the project did not make -------------------------------------------------------


def test_export_refuses_folders_it_did_not_make_and_replaces_its_own_only_when_asked(reference, tmp_path, capsys):
    _, out = reference
    checkpoint = out / "checkpoints" / "step_00000012"
    mine = user_folder(tmp_path / "mine")
    before, run_before = snapshot(mine), snapshot(out)
    assert "did not make" in one_line(capsys, export_main, checkpoint, mine)
    assert "minicolossus run folder" in one_line(capsys, export_main, checkpoint, out)  # not the whole run
    assert snapshot(mine) == before and snapshot(out) == run_before
    hf = tmp_path / "hf"
    assert exit_code(export_main, checkpoint, hf) == 0
    assert "--overwrite" in one_line(capsys, export_main, checkpoint, hf)
    (hf / "model.safetensors").write_bytes(b"stale")
    assert exit_code(export_main, out / "checkpoints" / "step_00000006", hf, "--overwrite") == 0
    assert folders.kind_of(hf) == "export" and (hf / "model.safetensors").stat().st_size > 100
    assert not list(tmp_path.glob(".hf.*"))  # the old export, moved aside, is gone


def test_prepare_refuses_a_non_empty_folder_it_did_not_make(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"paragraph {i} " * 20 for i in range(40)))
    args = ["--source", corpus, "--tokenizer", "byte", "--val-fraction", "0.1"]
    mine = user_folder(tmp_path / "mine")
    before = snapshot(mine)
    assert "did not make" in one_line(capsys, prepare_main, *args, "--out", mine)
    assert "did not make" in one_line(capsys, prepare_main, *args, "--out", mine, "--overwrite")
    assert snapshot(mine) == before
    out = tmp_path / "prepared"
    assert exit_code(prepare_main, *args, "--out", out) == 0 and folders.kind_of(out) == "data"
    assert exit_code(prepare_main, *args, "--out", out, "--seed", "1", "--overwrite") == 0
    assert json.loads((out / "manifest.json").read_text())["settings"]["seed"] == 1


def test_checkpoint_dir_on_a_user_folder_is_refused_and_left_alone(data_dir, tmp_path, capsys):
    mine = user_folder(tmp_path / "mine")
    before = snapshot(mine)
    error = one_line(capsys, train_main, *base_args(data_dir, tmp_path / "run"), f"--checkpoint.dir={mine}")
    assert "checkpoint.dir" in error and str(mine) in error and "did not make" in error
    error = one_line(capsys, train_main, *base_args(data_dir, mine))
    assert "run.out_dir" in error and "did not make" in error
    assert snapshot(mine) == before


def test_resume_never_in_a_folder_with_checkpoints_refuses(data_dir, reference, capsys):
    _, out = reference
    before = snapshot(out)
    error = one_line(capsys, train_main, *base_args(data_dir, out), "--run.resume=never")
    assert "step_00000012" in error and "another run.out_dir" in error and "run.resume=auto" in error
    assert snapshot(out) == before


# --- one run per folder -------------------------------------------------------------------------------


def test_a_second_run_in_a_folder_stops_and_a_dead_runs_lock_is_taken_over(data_dir, tmp_path, capsys):
    out = folders.claim(tmp_path / "run", "run", "run.out_dir")
    lock = folders.RunLock(out, "run.out_dir")
    lock.acquire()  # this test process is "the other run"
    try:
        error = one_line(capsys, train_main, *base_args(data_dir, out, steps=1))
        assert f"in use by another run (pid {os.getpid()}" in error and "choose another run.out_dir" in error
    finally:
        lock.release()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / folders.LOCK).write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "started": "then"}))
    assert len(train(data_dir, out, steps=1)) == 1
    assert not (out / folders.LOCK).exists()  # released at the end


# --- integrity ----------------------------------------------------------------------------------------


def copied_checkpoint(reference, tmp_path, step=6) -> Path:
    checkpoint = tmp_path / "run" / "checkpoints" / f"step_{step:08d}"
    shutil.copytree(reference[1] / "checkpoints" / checkpoint.name, checkpoint)
    return checkpoint


def test_a_flipped_byte_in_a_checkpoint_is_named_on_resume_and_export(data_dir, reference, tmp_path, capsys):
    checkpoint = copied_checkpoint(reference, tmp_path)
    shard = next(checkpoint.glob("*.distcp"))
    content = bytearray(shard.read_bytes())
    content[len(content) // 2] ^= 0x01
    content[len(content) // 2 + 7] ^= 0x10
    shard.write_bytes(bytes(content))
    for error in (
        one_line(capsys, train_main, *base_args(data_dir, tmp_path / "run")),
        one_line(capsys, export_main, checkpoint, tmp_path / "hf"),
    ):
        assert str(shard) in error and "damaged or edited" in error
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "hf").exists()


def hostile_metadata(checkpoint: Path, marker: Path) -> None:
    """DCP's .metadata is a pickle: replace it with one that would run code, digests recorded anew."""
    import pickle

    (checkpoint / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    reseal(checkpoint)


@pytest.mark.compat
def test_hostile_dcp_metadata_never_runs_on_any_path(data_dir, reference, tmp_path, capsys):
    checkpoint = copied_checkpoint(reference, tmp_path)
    marker = tmp_path / "code-ran"
    hostile_metadata(checkpoint, marker)
    errors = [
        one_line(capsys, train_main, *base_args(data_dir, tmp_path / "run")),  # resume
        one_line(capsys, train_main, *base_args(data_dir, tmp_path / "new"), f"--model.init_from={checkpoint}"),
        one_line(capsys, export_main, checkpoint, tmp_path / "hf"),
        one_line(capsys, evaluate_main, checkpoint, "--data", data_dir, "--seq-len", 64),
        one_line(capsys, generate_main, checkpoint, "--max-new-tokens", 4),
    ]
    assert not marker.exists()
    assert all("weights-only" in e and ".metadata" in e for e in errors), errors


def test_hostile_export_config_and_pickled_weights_never_run(reference, tmp_path, capsys):
    hf = tmp_path / "hf"
    assert exit_code(export_main, reference[1] / "checkpoints" / "step_00000012", hf) == 0
    marker = tmp_path / "code-ran"
    torch.save({"weights": Payload(marker)}, hf / "pytorch_model.bin")  # from_pretrained reads safetensors only
    (hf / "model.safetensors").unlink()
    (hf / "model-extra.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")  # keeps it "an export"
    error = one_line(capsys, generate_main, hf, "--max-new-tokens", 4)
    assert "cannot be loaded" in error and not marker.exists()


def edited_tokenizer_data(data_dir: Path, tmp_path: Path) -> Path:
    """The same corpus and vocabulary size, another tokenizer (two ids swapped), manifest made consistent."""
    data = tmp_path / "other-tokenizer"
    shutil.copytree(data_dir, data)
    spec = json.loads((data / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (data / "tokenizer.json").write_text(json.dumps(spec))
    from data.tokenizer import tokenizer_sha256

    manifest = json.loads((data / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = tokenizer_sha256(data)
    (data / "manifest.json").write_text(json.dumps(manifest))
    return data


def test_another_tokenizer_of_the_same_size_is_refused_on_resume_init_from_and_evaluate(
    data_dir, reference, tmp_path, capsys
):
    other = edited_tokenizer_data(data_dir, tmp_path)
    checkpoint = copied_checkpoint(reference, tmp_path)
    assert "tokenizer" in one_line(capsys, train_main, *base_args(other, tmp_path / "run"))
    assert "another tokenizer" in one_line(
        capsys, train_main, *base_args(other, tmp_path / "new"), f"--model.init_from={checkpoint}"
    )
    assert "another tokenizer" in one_line(capsys, evaluate_main, checkpoint, "--data", other, "--seq-len", 64)


def test_a_damaged_val_shard_stops_before_step_one(data_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    shard = data / "val_000.bin"
    content = bytearray(shard.read_bytes())
    content[10] ^= 0xFF
    shard.write_bytes(bytes(content))
    error = one_line(capsys, train_main, *base_args(data, tmp_path / "run"))
    assert str(shard) in error and "checksum" in error
    assert not (tmp_path / "run").exists()


def test_a_manifest_whose_vocabulary_is_below_its_token_ids_is_refused(data_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["tokenizer"]["vocab_size"] = 100
    (data / "manifest.json").write_text(json.dumps(manifest))
    error = one_line(capsys, train_main, *base_args(data, tmp_path / "run"))
    assert "vocab_size is 100" in error and "up to id" in error


# --- async checkpoints --------------------------------------------------------------------------------


@pytest.mark.compat
def test_async_save_trains_the_same_run_and_completes_every_checkpoint(data_dir, reference, tmp_path):
    single, single_out = reference
    rows = train(
        data_dir, tmp_path / "async", "--checkpoint.async_save=true", "--checkpoint.every=3", "--checkpoint.keep=5"
    )
    assert losses(rows) == losses(single)  # bitwise: the background writes change nothing
    names = sorted(p.name for p in (tmp_path / "async" / "checkpoints").iterdir() if not p.name.startswith("."))
    assert names == ["step_00000003", "step_00000006", "step_00000009", "step_00000012"]
    _, a = load_model_weights(tmp_path / "async" / "checkpoints" / "step_00000012")
    _, b = load_model_weights(single_out / "checkpoints" / "step_00000012")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.distributed
def test_async_save_on_two_processes_matches_one(data_dir, reference, tmp_path):
    single, _ = reference
    rows = train(data_dir, tmp_path / "fsdp", "--checkpoint.async_save=true", "--checkpoint.every=4", nproc=2)
    assert max(abs(a - b) for a, b in zip(losses(rows), losses(single))) < 1e-5
    resumed = train(
        data_dir,
        tmp_path / "resumed",
        "--checkpoint.async_save=true",
        f"--run.resume={tmp_path / 'fsdp' / 'checkpoints' / 'step_00000008'}",
    )
    assert [r["step"] for r in resumed] == list(range(9, STEPS + 1))
    assert max(abs(a - b) for a, b in zip(losses(resumed), losses(single)[8:])) < 1e-5


@pytest.mark.distributed  # runs a command in a fresh interpreter
def test_a_kill_during_an_async_save_keeps_the_previous_checkpoint_and_resumes_exactly(data_dir, reference, tmp_path):
    single, _ = reference
    out = tmp_path / "run"
    argv = [
        sys.executable,
        "-m",
        "train",
        *base_args(data_dir, out),
        "--parallel.strategy=none",
        "--checkpoint.async_save=true",
        "--checkpoint.every=3",
    ]
    killed = subprocess.run(
        argv,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MINICOLOSSUS_FAULT": "killsave:rank=0:step=6"},
    )
    assert killed.returncode == -9
    checkpoints = out / "checkpoints"
    assert (checkpoints / "step_00000003" / "COMPLETE").is_file() and not (checkpoints / "step_00000006").exists()
    time.sleep(0.1)
    resumed = train(data_dir, out, "--checkpoint.async_save=true", "--checkpoint.every=3")
    stepped = {r["step"]: r["loss"] for r in resumed}  # the rows after the resume, which started at step 4
    assert [stepped[s] for s in range(4, STEPS + 1)] == losses(single)[3:]
    assert not (checkpoints / "step_00000006.tmp").exists()  # the partial save was cleaned up


def test_a_file_at_the_temporary_name_of_a_durable_write_is_refused_and_left_alone(tmp_path):
    target, planted = tmp_path / "config.toml", tmp_path / "elsewhere.txt"
    planted.write_text("not ours")
    temporary = tmp_path / f".config.toml.tmp-{os.getpid()}"
    temporary.symlink_to(planted)
    with pytest.raises(folders.FolderError, match="already exists"):
        folders.write_durably(target, "x = 1\n")
    assert temporary.is_symlink() and planted.read_text() == "not ours" and not target.exists()
    temporary.unlink()
    folders.write_durably(target, "x = 1\n")
    assert target.read_text() == "x = 1\n" and not temporary.exists()
