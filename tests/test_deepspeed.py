"""DeepSpeed ZeRO-1/2/3 as the second engine behind the same loop: 2 CPU processes, gloo, our AdamW."""

import json
import shutil
import subprocess
import sys

import pytest
import ranks
import torch
from conftest import REPO, STEPS, Payload, base_args, losses, reseal, train
from transformers import AutoModelForCausalLM

from train.weights import load_model_weights

try:
    import deepspeed  # noqa: F401
except ImportError:
    pytest.skip("DeepSpeed is not installed: pip install -e '.[deepspeed]'", allow_module_level=True)

ZERO = ["--parallel.strategy=deepspeed"]


@pytest.mark.distributed
@pytest.mark.parametrize(
    "stage, offload",
    [(1, False), pytest.param(2, False, marks=pytest.mark.compat), (3, False), (3, True)],
    ids=["zero1", "zero2", "zero3", "zero3-offload"],
)
def test_zero_on_two_processes_follows_the_single_process_loss_curve(data_dir, reference, tmp_path, stage, offload):
    single, _ = reference
    rows = train(
        data_dir,
        tmp_path,
        *ZERO,
        f"--parallel.zero_stage={stage}",
        f"--parallel.offload_optimizer={str(offload).lower()}",
        nproc=2,
    )
    assert len(rows) == STEPS
    assert max(abs(a - b) for a, b in zip(losses(rows), losses(single))) < 1e-5
    assert max(abs(a["grad_norm"] - b["grad_norm"]) for a, b in zip(rows, single)) < 1e-4
    assert abs(rows[-1]["val_loss"] - single[-1]["val_loss"]) < 1e-5
    # ZeRO-3 partitions the parameters: each of the 2 ranks holds half; ZeRO-1/2 keep full replicas.
    expected = 0.5 if stage == 3 else 1.0
    assert abs(rows[-1]["param_mib"] / single[-1]["param_mib"] - expected) < 0.01


@pytest.fixture(scope="module")
def zero3_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    return train(
        data_dir, out, *ZERO, "--parallel.zero_stage=3", "--checkpoint.every=6", "--checkpoint.keep=2", nproc=2
    ), out


@pytest.mark.distributed
def test_zero3_resume_is_bitwise_exact(data_dir, zero3_run, tmp_path):
    straight, straight_out = zero3_run
    shutil.copytree(straight_out / "checkpoints" / "step_00000006", tmp_path / "checkpoints" / "step_00000006")
    resumed = train(data_dir, tmp_path, *ZERO, "--parallel.zero_stage=3", nproc=2)
    assert [row["step"] for row in resumed] == list(range(7, STEPS + 1))
    assert losses(resumed) == losses(straight)[6:]
    _, a = load_model_weights(straight_out / "checkpoints" / "step_00000012")
    _, b = load_model_weights(tmp_path / "checkpoints" / "step_00000012")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.distributed  # (the ZeRO-3 run)
def test_zero_checkpoint_on_another_world_size_says_how_to_continue(data_dir, reference, zero3_run, tmp_path):
    single, _ = reference
    checkpoint = zero3_run[1] / "checkpoints" / "step_00000012"
    args = [*base_args(data_dir, tmp_path), *ZERO, "--parallel.zero_stage=3", f"--run.resume={checkpoint}"]
    result = ranks.run_main("train.__main__", args, nproc=1)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and "loads only on 2 ranks" in error and "--model.init_from=" in error
    # ... and the way it names works: a new single-process run from those weights starts where they were
    rows = train(data_dir, tmp_path / "warm", f"--model.init_from={checkpoint}", "--run.resume=never", steps=2)
    assert rows[0]["loss"] < losses(single)[-1] + 0.2 < losses(single)[0]


@pytest.fixture(scope="module")
def hostile_zero3(zero3_run, tmp_path_factory):
    """A ZeRO-3 checkpoint whose model-state files hold a pickled payload, its digests recorded anew."""
    checkpoint = tmp_path_factory.mktemp("hostile") / "checkpoints" / "step_00000006"
    shutil.copytree(zero3_run[1] / "checkpoints" / "step_00000006", checkpoint)
    marker = checkpoint.parents[2] / "code-ran"
    for state in (checkpoint / "deepspeed").glob("*model_states.pt"):
        torch.save({"module": Payload(marker)}, state)
    reseal(checkpoint)
    return checkpoint, marker


@pytest.mark.distributed  # (the ZeRO-3 run, and resume's 2 ranks)
@pytest.mark.parametrize("path", ["resume", "export", "init_from"])
def test_deepspeed_state_is_read_without_running_pickled_code(data_dir, hostile_zero3, tmp_path, path):
    checkpoint, marker = hostile_zero3
    if path == "resume":
        shutil.copytree(checkpoint.parent, tmp_path / "checkpoints")
        program = [*base_args(data_dir, tmp_path), *ZERO, "--parallel.zero_stage=3"]
        result = ranks.run_main("train.__main__", program, nproc=2)
    else:
        if path == "export":
            command = ["scripts/export_hf.py", str(checkpoint), str(tmp_path / "hf")]
        else:
            command = ["-m", "train", *base_args(data_dir, tmp_path / "run"), f"--model.init_from={checkpoint}"]
        result = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert not marker.exists()
    assert result.returncode != 0
    assert "which the weights-only loader refuses" in result.stderr
    assert result.returncode == 2 and len(set(result.stderr.strip().splitlines())) == 1, result.stderr


@pytest.mark.distributed  # runs the command in a process of its own
def test_a_dcp_checkpoint_cannot_be_resumed_by_deepspeed_and_says_so(data_dir, reference, tmp_path):
    checkpoint = reference[1] / "checkpoints" / "step_00000006"
    result = ranks.run_main(
        "train.__main__", [*base_args(data_dir, tmp_path), *ZERO, f"--run.resume={checkpoint}"], nproc=1
    )
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error == (
        f"error: {checkpoint}: saved by parallel.strategy 'none' (dcp format), which this run's strategy "
        f"cannot read; resume with a strategy of the same engine (none, ddp, fsdp or hsdp), or start from "
        f"its weights: --model.init_from={checkpoint} --run.resume=never"
    )


@pytest.mark.distributed  # (the ZeRO-3 run)
def test_zero3_checkpoint_exports_to_hugging_face(reference, zero3_run, tmp_path):
    _, single_out = reference
    export = subprocess.run(
        [
            sys.executable,
            "scripts/export_hf.py",
            str(zero3_run[1] / "checkpoints" / "step_00000012"),
            str(tmp_path / "hf"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert export.returncode == 0, export.stderr[-3000:]
    import model  # noqa: F401  (registers the Auto classes)

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    _, single_weights = load_model_weights(single_out / "checkpoints" / "step_00000012")
    for name, tensor in exported.state_dict().items():  # ZeRO-3 on 2 ranks trained the same weights
        torch.testing.assert_close(tensor, single_weights[name], rtol=0, atol=1e-4)
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    ids = torch.randint(0, 260, (1, 16))
    with torch.no_grad():
        assert torch.isfinite(exported(ids).logits).all()


@pytest.mark.distributed  # runs a command in a fresh interpreter
def test_without_deepspeed_installed_the_error_names_the_install_command(data_dir, tmp_path):
    hide = "import sys; sys.modules['deepspeed'] = None; from train.__main__ import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run(
        [sys.executable, "-c", hide, *base_args(data_dir, tmp_path), *ZERO],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: parallel.strategy 'deepspeed' needs DeepSpeed: pip install -e "
        "'.[deepspeed]' (or choose none, ddp, fsdp or hsdp)"
    )
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.compat
def test_generated_deepspeed_config_is_consistent_with_ours():
    from train.config import load_config
    from train.deepspeed_engine import deepspeed_config
    from train.parallel import Env, Layout

    config = load_config(
        REPO / "configs" / "tiny.toml",
        ["--parallel.strategy=deepspeed", "--parallel.zero_stage=3", "--parallel.offload_optimizer=true"]
        + ["--optim.name=adamw"],
    )
    env = Env(
        rank=0,
        world_size=2,
        local_rank=0,
        local_world_size=2,
        device=torch.device("cpu"),
        dtype=torch.float32,
        layout=Layout(dp_shard=2),
    )
    generated = deepspeed_config(config, env, config.grad_accumulation(2))
    assert (
        generated["train_batch_size"]
        == 32
        == (generated["train_micro_batch_size_per_gpu"] * generated["gradient_accumulation_steps"] * 2)
    )
    assert generated["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    assert generated["gradient_clipping"] == 1.0 and generated["bf16"] == {"enabled": False}
    json.dumps(generated)  # DeepSpeed takes it as JSON
