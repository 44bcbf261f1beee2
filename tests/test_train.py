"""The trainer with real processes (torchrun + gloo): the same math at every scale, exact resume."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import REPO, STEPS, base_args, losses, train

from model import GrokForCausalLM, preset_config
from train.__main__ import main as train_main
from train.config import load_config
from train.optim import Muon, orthogonalize


@pytest.mark.distributed
@pytest.mark.parametrize(
    "strategy",
    [
        ["--parallel.strategy=ddp"],
        ["--parallel.strategy=fsdp"],
        ["--parallel.strategy=fsdp", "--parallel.reshard_after_forward=false"],
        ["--parallel.strategy=hsdp", "--parallel.replicate_size=1", "--parallel.shard_size=2"],
        ["--parallel.strategy=hsdp", "--parallel.replicate_size=2", "--parallel.shard_size=1"],
    ],
    ids=["ddp", "fsdp", "fsdp-no-reshard", "hsdp-1x2", "hsdp-2x1"],
)
def test_two_processes_follow_the_single_process_loss_curve(data_dir, reference, tmp_path, strategy):
    single, _ = reference
    rows = train(data_dir, tmp_path, *strategy, nproc=2)
    assert len(rows) == len(single) == STEPS
    assert max(abs(a - b) for a, b in zip(losses(rows), losses(single))) < 1e-5
    assert max(abs(a["grad_norm"] - b["grad_norm"]) for a, b in zip(rows, single)) < 1e-4
    assert all(row["grad_norm"] > 0.5 for row in single)  # clipping was active on every step
    assert abs(rows[-1]["val_loss"] - single[-1]["val_loss"]) < 1e-5


@pytest.fixture(scope="module")
def muon_single(data_dir, tmp_path_factory):
    return train(data_dir, tmp_path_factory.mktemp("muon-single"), "--optim.name=muon")


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [[], ["--parallel.ep_size=2"]], ids=["fsdp", "fsdp-ep2"])
def test_muon_on_two_processes_follows_the_single_process_run(data_dir, muon_single, tmp_path, layout):
    """Sharded matrices are orthogonalised whole (in fp32): the same updates as one process."""
    rows = train(data_dir, tmp_path, "--optim.name=muon", *layout, nproc=2)
    assert len(rows) == len(muon_single) == STEPS and all(row["grad_norm"] > 0.5 for row in muon_single)
    assert max(abs(a - b) for a, b in zip(losses(rows), losses(muon_single))) < 1e-5
    assert max(abs(a["grad_norm"] - b["grad_norm"]) for a, b in zip(rows, muon_single)) < 1e-4


def test_muon_orthogonalises_each_matrix_and_its_adamw_is_torchs():
    torch.manual_seed(0)
    stacked = torch.randn(3, 40, 24)
    together = orthogonalize(stacked)
    torch.testing.assert_close(together, torch.stack([orthogonalize(m) for m in stacked]))
    singular = torch.linalg.svdvals(together)
    assert singular.min() > 0.5 and singular.max() < 1.5  # the quintic's band around 1, not U V^T exactly
    ours, theirs = (torch.nn.Linear(6, 5) for _ in range(2))
    theirs.load_state_dict(ours.state_dict())
    muon = Muon([{"params": list(ours.parameters()), "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95))
    adamw = torch.optim.AdamW(theirs.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(5):
        x = torch.randn(4, 6)
        for model, optimizer in ((ours, muon), (theirs, adamw)):
            model(x).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.compat
def test_gradient_accumulation_is_the_same_step(data_dir, tmp_path):
    # The router aux losses depend on which tokens share a micro-batch; without them, accumulation is exact.
    no_aux = ["--model.overrides.router_aux_loss_coef=0", "--model.overrides.router_z_loss_coef=0"]
    whole = train(data_dir, tmp_path / "a", *no_aux, "--batch.micro_batch_size=8", steps=6)
    accumulated = train(data_dir, tmp_path / "b", *no_aux, "--batch.micro_batch_size=2", steps=6)
    # Not 1e-6: other micro-batch shapes round the router logits differently, and a near-tied top-k pick may
    # flip (~1e-5 on the loss); an accumulation bug (a missing or double division) moves it by > 1e-2.
    assert max(abs(a - b) for a, b in zip(losses(whole), losses(accumulated))) < 5e-5


def test_activation_checkpointing_recomputes_the_same_step(data_dir, reference, tmp_path):
    single, _ = reference
    rows = train(data_dir, tmp_path, "--parallel.activation_checkpointing=true")
    assert max(abs(a - b) for a, b in zip(losses(rows), losses(single))) < 1e-6


@pytest.mark.compat
def test_compiled_training_follows_the_eager_run(data_dir, tmp_path, monkeypatch):
    # One process compiles the whole model as one graph (dense here: the MoE's routing is data-dependent).
    # Inductor reorders fp32 sums, so not bitwise; a wrong graph (a missed soft-cap, a stale rotary table)
    # moves the loss by > 1e-2. The checkpoint keeps the plain model's names, so resume and export work.
    from torch._dynamo.utils import counters
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    # as after `import torch`'s flex attention: inductor's /tmp default already written into the environment
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    # Two blocks, not tiny's four: the graph still spans blocks that share the rotary tables and the residual
    # stream, and a cold compile takes half the time (the slowest single-process test otherwise).
    dense = [
        "--model.overrides.num_local_experts=1",
        "--model.overrides.num_experts_per_tok=1",
        "--model.overrides.num_hidden_layers=2",
        "--data.seq_len=32",
    ]
    # as in a new process: a model compiled earlier in this one at other shapes would make dynamo compile
    # this run's graph with dynamic shapes, and the re-run below (after a reset) a static one
    torch._dynamo.reset()
    eager = train(data_dir, tmp_path / "eager", *dense, steps=4)
    compiled = train(data_dir, tmp_path / "compiled", *dense, "--parallel.compile=true", steps=4)
    assert max(abs(a - b) for a, b in zip(losses(eager), losses(compiled))) < 1e-4
    assert abs(eager[-1]["val_loss"] - compiled[-1]["val_loss"]) < 1e-4
    names = dcp.FileSystemReader(str(tmp_path / "compiled" / "checkpoints" / "step_00000004")).read_metadata()
    assert not [key for key in names.state_dict_metadata if "_orig_mod" in key]
    # the kernels went to the per-user cache, and a re-run loads its graphs from there instead of compiling
    cache = tmp_path / "home" / ".cache" / "minicolossus" / "inductor"
    assert (cache / "fxgraph").is_dir() and any(cache.rglob("*.so"))
    torch._dynamo.reset()  # forget the graphs in memory, as a new process would
    counters.clear()
    again = train(data_dir, tmp_path / "again", *dense, "--parallel.compile=true", steps=4)
    assert counters["inductor"]["fxgraph_cache_hit"] > 0 and not counters["inductor"]["fxgraph_cache_miss"]
    # the same kernels, but not always bitwise: inductor's reductions may split differently between runs
    assert max(abs(a - b) for a, b in zip(losses(again), losses(compiled))) < 1e-5


def test_clipping_scales_gradients_to_the_limit():
    from conftest import small_model

    from train.parallel import clip_grad_norm

    model = small_model().train()
    ids = torch.randint(0, 97, (2, 16))
    model(ids, labels=ids).loss.backward()
    before = [p.grad.clone() for p in model.parameters()]
    norm = clip_grad_norm(model.parameters(), 0.0)  # measures only
    assert norm > 0.1 and all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before))
    assert torch.equal(clip_grad_norm(model.parameters(), 0.1), norm)  # returns the norm before clipping
    after = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert abs(after.item() - 0.1) < 1e-6
    torch.testing.assert_close([p.grad for p in model.parameters()], [g * (0.1 / norm) for g in before])


def model_weights(checkpoint: Path, vocab_size: int) -> dict:
    state = GrokForCausalLM(preset_config("tiny", vocab_size=vocab_size)).state_dict()
    dcp.load({"model": state}, checkpoint_id=checkpoint)
    return state


@pytest.mark.distributed
def test_resume_is_bitwise_exact_on_two_processes(data_dir, tmp_path):
    straight = train(data_dir, tmp_path / "straight", "--checkpoint.every=6", "--checkpoint.keep=2", nproc=2)
    # a second run starts from the straight run's step-6 checkpoint, as after a crash at step 6
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(
        tmp_path / "straight" / "checkpoints" / "step_00000006", resumed_dir / "checkpoints" / "step_00000006"
    )
    resumed = train(data_dir, resumed_dir, nproc=2)
    assert [row["step"] for row in resumed] == list(range(7, STEPS + 1))
    assert losses(resumed) == losses(straight)[6:]  # bitwise: floats from JSON compare exactly
    a = model_weights(tmp_path / "straight" / "checkpoints" / "step_00000012", 260)
    b = model_weights(resumed_dir / "checkpoints" / "step_00000012", 260)
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((resumed_dir / "checkpoints" / "step_00000012" / "trainer.json").read_text())
    assert state["loader"]["samples_consumed"] == STEPS * 8 and state["world_size"] == 2


@pytest.mark.distributed
@pytest.mark.parametrize("direction", ["2->1", "1->2"])
def test_resume_on_another_world_size(data_dir, reference, tmp_path, direction):
    single, single_out = reference
    if direction == "2->1":
        source = tmp_path / "two"
        train(data_dir, source, "--checkpoint.every=6", nproc=2)
        resumed = train(data_dir, tmp_path / "resumed", f"--run.resume={source / 'checkpoints' / 'step_00000006'}")
    else:
        resumed = train(
            data_dir, tmp_path / "resumed", f"--run.resume={single_out / 'checkpoints' / 'step_00000006'}", nproc=2
        )
    assert [row["step"] for row in resumed] == list(range(7, STEPS + 1))
    assert max(abs(a - b) for a, b in zip(losses(resumed), losses(single)[6:])) < 1e-5


def test_metrics_config_and_checkpoints_of_a_run(reference):
    rows, out = reference
    for row in rows:
        for key in (
            "step",
            "loss",
            "lm_loss",
            "aux_loss",
            "z_loss",
            "lr",
            "grad_norm",
            "tokens_seen",
            "peak_mem_mib",
            "expert_load_max",
        ):
            assert key in row, key
    assert all("tokens_per_s" in row and "mfu" in row and "flops_per_s" in row for row in rows[1:])
    assert rows[-1]["val_loss"] > 0 and 0 < rows[-1]["val_bpb"] < 10
    assert rows[-1]["tokens_seen"] == STEPS * 8 * 64
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert len(rows[0]["expert_load_max"]) == 4  # one entry per layer
    saved = load_config(out / "config.toml")
    assert saved.run.max_steps == STEPS and saved.data.seq_len == 64 and saved.optim.grad_clip == 0.5
    names = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert names == ["step_00000006", "step_00000012"]
    assert all((out / "checkpoints" / n / "COMPLETE").is_file() for n in names)


def test_partial_checkpoint_is_ignored_and_removed(data_dir, reference, tmp_path):
    _, single_out = reference
    out = tmp_path / "run"
    shutil.copytree(single_out / "checkpoints" / "step_00000006", out / "checkpoints" / "step_00000006")
    # a crash during the step-9 save left a temp folder, and a folder without its completion marker
    shutil.copytree(out / "checkpoints" / "step_00000006", out / "checkpoints" / "step_00000009.tmp")
    shutil.copytree(out / "checkpoints" / "step_00000006", out / "checkpoints" / "step_00000010")
    (out / "checkpoints" / "step_00000010" / "COMPLETE").unlink()
    rows = train(data_dir, out)
    assert rows[0]["step"] == 7  # resumed from the complete step-6 checkpoint
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_")) == [
        "step_00000006",
        "step_00000012",
    ]


@pytest.mark.distributed  # runs a command in a fresh interpreter
def test_init_from_a_checkpoint_or_its_export_starts_from_its_weights(data_dir, reference, tmp_path):
    single, single_out = reference
    checkpoint = single_out / "checkpoints" / "step_00000012"
    subprocess.run(
        [sys.executable, "scripts/export_hf.py", str(checkpoint), str(tmp_path / "hf")],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    from_checkpoint = train(data_dir, tmp_path / "a", f"--model.init_from={checkpoint}", steps=1)
    from_export = train(data_dir, tmp_path / "b", f"--model.init_from={tmp_path / 'hf'}", steps=1)
    assert from_checkpoint[0]["loss"] == from_export[0]["loss"] < losses(single)[0] - 1


def error_of(capsys, *args) -> str:
    assert train_main(list(args)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.compat
def test_config_errors_are_one_line_and_name_the_key(data_dir, tmp_path, capsys):
    args = base_args(data_dir, tmp_path / "out")
    assert "run.bogus" in error_of(capsys, *args, "--run.bogus=1")
    assert "run.max_steps" in error_of(capsys, *args, "--run.max_steps=many")
    assert "unknown" in error_of(capsys, *args, "--model.preset=huge")
    message = error_of(capsys, *args, "--batch.global_batch_size=10")
    assert "batch.global_batch_size 10" in message and "use 8 or 12" in message
    from train.config import ConfigError  # fewer sequences than ranks x micro-batch: two sizes, both valid

    config = load_config(None, [*args[2:], "--batch.global_batch_size=32", "--batch.micro_batch_size=8"])
    with pytest.raises(ConfigError, match=r"use 128 or 256 or batch.micro_batch_size 2$"):
        config.grad_accumulation(16)
    assert "data.seq_len 1024 exceeds the model's context 256" in error_of(capsys, *args, "--data.seq_len=1024")
    assert "no manifest.json" in error_of(capsys, *args, f"--data.path={tmp_path / 'missing'}")
    message = error_of(capsys, *args, "--model.overrides.vocab_size=999")
    assert "260-token vocabulary" in message and "vocab_size" in message
    assert "model.overrides" in error_of(capsys, *args, "--model.overrides.num_key_value_heads=3")
    message = error_of(capsys, *args, "--run.device=cpu", "--model.overrides.attn_backend=flex")
    assert "cannot train on CPU" in message and 'attn_backend = "eager"' in message
    (tmp_path / "file").write_text("")
    assert "cannot create folder" in error_of(capsys, *args, f"--run.out_dir={tmp_path / 'file' / 'x'}")
    assert "no such file" in error_of(capsys, "--config", str(tmp_path / "nope.toml"))
    assert "model.init_from" in error_of(capsys, *args, f"--model.init_from={tmp_path}")
    assert "optim.name" in error_of(capsys, *args, "--optim.name=muon", "--parallel.strategy=deepspeed")
    assert not (tmp_path / "out").exists()
