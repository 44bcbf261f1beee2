"""The GPU tier: what only a GPU runs (bf16 kernels, NCCL, Triton, fused CUDA optimizers), each checked against
the fp32 CPU path with a stated tolerance. Marked `gpu`; skipped without CUDA.

`MINICOLOSSUS_GPU_TIER=cpu` rehearses the tier on a CPU (bf16 autocast, gloo, inductor's C++ instead of
Triton, tiny sizes), so that the scripts around it are tried before a GPU is lent. `scripts/gpu_check.py`
runs the tier and sets `MINICOLOSSUS_GPU_REPORT`: each test appends the figures it measured there (one JSON
object a line), and the check copies them into its report.
"""

import json
import os
from pathlib import Path

import pytest
import ranks
import torch
from conftest import base_args, losses, train

from model import GrokForCausalLM, preset_config
from model.attention import Attention, make_attention_inputs
from model.moe import geglu, grouped_geglu

DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if os.environ.get("MINICOLOSSUS_GPU_TIER") == "cpu" else None)
ON_GPU = DEVICE == "cuda"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE is None, reason="needs CUDA (MINICOLOSSUS_GPU_TIER=cpu rehearses the tier on a CPU)"),
]

# bf16 against fp32 over 12 training steps of the dense tiny model (losses 6 -> 2): bf16 keeps 8 bits of
# mantissa, and the two runs' losses stay within this (0.005 measured on a CPU). The comparisons train the
# dense model: with experts a near-tie in routing flips one way in bf16 and the other in fp32, and at this
# learning rate one flipped step is a spike of its own (0.34 apart at step 6 on a CPU, together again by 20).
BF16_LOSS_TOLERANCE = 0.03
DENSE = ["--model.overrides.num_local_experts=1", "--model.overrides.num_experts_per_tok=1"]
# The same bf16 run with activations recomputed: only the rounding order may differ (0.0 on a CPU).
SAME_RUN_TOLERANCE = 0.01
STEPS = 12


def record(test: str, **figures) -> None:
    """Append this test's measured figures to the check's report (nothing when run by hand)."""
    path = os.environ.get("MINICOLOSSUS_GPU_REPORT")
    if path:
        with open(path, "a") as report:
            report.write(json.dumps({"test": test, "device": DEVICE, **figures}) + "\n")


def gap(rows, reference) -> float:
    return max(abs(a - b) for a, b in zip(losses(rows), losses(reference)))


ON_DEVICE = [f"--run.device={DEVICE}", "--precision.dtype=bf16", *DENSE]
ON_CPU_FP32 = ["--run.device=cpu", "--precision.dtype=fp32", *DENSE]


@pytest.fixture(scope="module")
def cpu_fp32(data_dir, tmp_path_factory):
    """The reference every device run is held to: one CPU process, fp32."""
    return train(data_dir, tmp_path_factory.mktemp("cpu-fp32"), *ON_CPU_FP32, steps=STEPS)


@pytest.fixture(scope="module")
def device_bf16(data_dir, tmp_path_factory):
    """`none` on the device: fp32 weights, bf16 autocast."""
    return train(data_dir, tmp_path_factory.mktemp("device-bf16"), *ON_DEVICE, steps=STEPS)


def one_process_group(data_dir, out: Path, *overrides, steps: int = STEPS) -> list[dict]:
    """The trainer under torchrun with one rank: NCCL on a GPU (gloo on the CPU rehearsal)."""
    result = ranks.torchrun(
        ["-m", "train", *base_args(data_dir, out, steps), *overrides], nproc=1, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    from train.metrics import read_metrics

    return read_metrics(out)


def test_bf16_autocast_step_follows_fp32_on_the_cpu(cpu_fp32, device_bf16):
    rows = cpu_fp32
    difference = gap(device_bf16, rows)
    record("bf16 autocast (none) vs CPU fp32, 12 steps", max_loss_gap=difference)
    assert difference < BF16_LOSS_TOLERANCE
    assert device_bf16[-1]["loss"] < device_bf16[0]["loss"] - 0.5  # it learns


@pytest.mark.distributed  # (torchrun: an agent and its rank)
def test_fsdp2_with_its_bf16_policy_on_one_rank_follows_fp32(data_dir, cpu_fp32, tmp_path):
    rows = cpu_fp32
    sharded = one_process_group(data_dir, tmp_path, *ON_DEVICE, "--parallel.strategy=fsdp")
    difference = gap(sharded, rows)
    record("FSDP2 bf16 policy (1 rank) vs CPU fp32", max_loss_gap=difference, backend="nccl" if ON_GPU else "gloo")
    assert difference < BF16_LOSS_TOLERANCE


def test_activation_checkpointing_recomputes_the_same_step(data_dir, device_bf16, tmp_path):
    recomputed = train(data_dir, tmp_path, *ON_DEVICE, "--parallel.activation_checkpointing=true", steps=STEPS)
    difference = gap(recomputed, device_bf16)
    record("activation checkpointing vs plain, bf16", max_loss_gap=difference)
    assert difference < SAME_RUN_TOLERANCE


@pytest.mark.parametrize(
    "strategy", ["none", pytest.param("fsdp", marks=pytest.mark.distributed)], ids=["whole-model", "per-block"]
)
def test_compiled_training_follows_the_eager_run(data_dir, device_bf16, tmp_path, strategy):
    """`none` compiles the whole model as one graph, FSDP each block. A compiled model that stops learning
    after its first step (as torch 2.11 did with in-place outputs) fails here."""
    overrides = [*ON_DEVICE, "--parallel.compile=true"]
    if strategy == "none":
        compiled = train(data_dir, tmp_path, *overrides, steps=STEPS)
        eager = device_bf16
    else:
        compiled = one_process_group(data_dir, tmp_path / "compiled", *overrides, "--parallel.strategy=fsdp")
        eager = one_process_group(data_dir, tmp_path / "eager", *ON_DEVICE, "--parallel.strategy=fsdp")
    difference = gap(compiled, eager)
    record(f"torch.compile {strategy} vs eager, bf16", max_loss_gap=difference)
    # fused kernels keep intermediates in fp32 where eager rounds them to bf16: 0.013 apart on a CPU
    assert difference < BF16_LOSS_TOLERANCE and compiled[-1]["loss"] < compiled[0]["loss"] - 0.5


def test_flex_attention_with_the_softcap_compiled_matches_eager():
    """Grok's soft-capped attention as flex compiles it (Triton on a GPU) against the eager reference, forward
    and backward; flex has no backward on a CPU, so the rehearsal checks the forward only."""
    torch.manual_seed(0)
    batch, seq = (4, 256) if ON_GPU else (2, 64)
    positions = torch.arange(seq, device=DEVICE)[None].expand(batch, -1)
    outputs, grads = [], []
    for backend in ("eager", "flex"):
        config = preset_config(
            "tiny", attn_logit_softcap=30.0, num_attention_heads=4, num_key_value_heads=2, attn_backend=backend
        )
        x = torch.randn(batch, seq, config.hidden_size, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
        torch.manual_seed(1)
        attention = Attention(config, 0).to(DEVICE)
        inputs = make_attention_inputs(config, positions, seq, seq, None)
        forward = torch.compile(attention) if backend == "flex" else attention
        if ON_GPU:
            out = forward(x, inputs)
            out.square().sum().backward()
            grads.append(attention.q_proj.weight.grad)
        else:
            with torch.no_grad():
                out = forward(x, inputs)
        outputs.append(out.detach())
    torch._dynamo.reset()
    error = (outputs[0] - outputs[1]).abs().max().item()
    record("flex soft-cap compiled vs eager (fp32)", max_abs_error=error)
    torch.testing.assert_close(outputs[1], outputs[0], atol=2e-3, rtol=2e-3)
    if ON_GPU:
        torch.testing.assert_close(grads[1], grads[0], atol=2e-3, rtol=2e-3)


def test_fused_adamw_on_the_device_matches_the_cpu():
    from train.config import OptimSection
    from train.optim import build_optimizer

    torch.manual_seed(0)
    models = [GrokForCausalLM(preset_config("tiny")) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    models[1].to(DEVICE)
    optimizers = [
        build_optimizer(model, OptimSection(lr=1e-2), torch.device(device))
        for model, device in zip(models, ("cpu", DEVICE))
    ]
    for step in range(3):
        torch.manual_seed(step)
        grads = [torch.randn_like(p) for p in models[0].parameters()]
        for model, optimizer in zip(models, optimizers):
            for param, grad in zip(model.parameters(), grads):
                param.grad = grad.to(param.device)
            optimizer.step()
    assert optimizers[1].defaults["fused"]
    error = max((a - b.cpu()).abs().max().item() for a, b in zip(models[0].parameters(), models[1].parameters()))
    record("fused AdamW on the device vs CPU, 3 steps", max_abs_error=error)
    assert error < 1e-5


def test_grouped_matmul_in_bf16_matches_the_per_expert_loop():
    torch.manual_seed(0)
    experts, hidden, width = 8, 256, 512
    counts = torch.tensor([64, 0, 17, 128, 3, 64, 200, 32])
    x = torch.randn(int(counts.sum()), hidden, device=DEVICE, dtype=torch.bfloat16)
    weights = [
        torch.randn(experts, *shape, device=DEVICE, dtype=torch.bfloat16) / shape[0] ** 0.5
        for shape in ((hidden, width), (hidden, width), (width, hidden))
    ]
    grouped = grouped_geglu(x, counts.to(DEVICE), *weights).float()
    loop = torch.cat([geglu(chunk, *(w[e] for w in weights)) for e, chunk in enumerate(x.split(counts.tolist()))])
    error = (grouped - loop.float()).abs().max().item()
    record("grouped_mm bf16 vs per-expert loop", max_abs_error=error, scale=loop.float().abs().max().item())
    torch.testing.assert_close(grouped, loop.float(), atol=3e-2, rtol=2e-2)


def test_the_1b_moe_trains_a_few_steps():
    """The 1b MoE (flex soft-capped attention, grouped expert matmuls, bf16) at its own width: finite, learning,
    and the memory it took. Eager here, to keep the tier short: the check's benchmark runs it compiled. The
    rehearsal shrinks it and uses eager attention (flex has no CPU backward)."""
    from train.config import OptimSection
    from train.optim import build_optimizer
    from train.parallel import autocast

    overrides = (
        {}
        if ON_GPU
        else dict(
            hidden_size=64,
            num_hidden_layers=2,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            attn_backend="eager",
        )
    )
    config = preset_config("1b", **overrides)
    batch, seq = (4, 1024) if ON_GPU else (2, 32)
    torch.manual_seed(0)
    model = GrokForCausalLM(config).to(DEVICE).train()
    optimizer = build_optimizer(model, OptimSection(lr=1e-3, weight_decay=0.0), torch.device(DEVICE))
    tokens = torch.randint(0, config.vocab_size, (batch, seq + 1), device=DEVICE)
    step_losses = []
    for _ in range(4):  # the same batch: the loss must fall
        with autocast(torch.device(DEVICE), torch.bfloat16):
            loss = model(tokens[:, :-1], targets=tokens[:, 1:]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated() / 2**30 if ON_GPU else None
    record("1b MoE, 4 steps on one batch", losses=step_losses, peak_gib=peak)
    assert all(torch.isfinite(torch.tensor(step_losses)))
    assert abs(step_losses[0] - torch.log(torch.tensor(float(config.vocab_size))).item()) < 1.0
    assert step_losses[-1] < step_losses[0]


@pytest.mark.distributed  # (torchrun: an agent and its rank)
def test_deepspeed_zero2_on_one_rank_follows_fp32(data_dir, cpu_fp32, tmp_path):
    pytest.importorskip("deepspeed", reason="the DeepSpeed wheel did not travel")
    rows = cpu_fp32
    zero2 = one_process_group(
        data_dir, tmp_path, *ON_DEVICE, "--parallel.strategy=deepspeed", "--parallel.zero_stage=2"
    )
    difference = gap(zero2, rows)
    record("DeepSpeed ZeRO-2 bf16 (1 rank) vs CPU fp32", max_loss_gap=difference)
    assert difference < 2 * BF16_LOSS_TOLERANCE  # DeepSpeed holds the weights themselves in bf16


@pytest.mark.distributed  # (torchrun: an agent and its rank)
def test_a_device_checkpoint_resumes_on_the_cpu_and_exports(data_dir, tmp_path):
    from toolbox.export import main as export_main

    device_run = tmp_path / "device"
    first = one_process_group(
        data_dir, device_run, *ON_DEVICE, "--parallel.strategy=fsdp", "--checkpoint.every=6", "--checkpoint.keep=3"
    )
    checkpoint = device_run / "checkpoints" / "step_00000006"
    resumed = train(data_dir, tmp_path / "cpu", *ON_CPU_FP32, f"--run.resume={checkpoint}", steps=STEPS)
    assert [row["step"] for row in resumed] == list(range(7, STEPS + 1))
    difference = max(abs(a - b) for a, b in zip(losses(resumed), losses(first)[6:]))
    record("device checkpoint at step 6 resumed on the CPU in fp32", max_loss_gap=difference)
    assert difference < BF16_LOSS_TOLERANCE
    export = tmp_path / "hf"
    assert export_main([str(device_run / "checkpoints" / f"step_{STEPS:08d}"), str(export)]) == 0
    from transformers import AutoModelForCausalLM

    import model  # noqa: F401  (registers the Auto classes)

    exported = AutoModelForCausalLM.from_pretrained(export)
    generated = exported.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)


def test_first_20_losses_of_tiny_in_bf16_on_the_device_against_fp32_on_the_cpu(data_dir, tmp_path):
    """`tiny` as the main job trains it, experts and all: the curves may part for a step where routing flips
    (see DENSE), and must meet again."""
    runs = [
        train(data_dir, tmp_path / name, *flags, steps=20)
        for name, flags in (
            ("cpu", ["--run.device=cpu", "--precision.dtype=fp32"]),
            ("device", [f"--run.device={DEVICE}", "--precision.dtype=bf16"]),
        )
    ]
    gaps = [abs(a - b) for a, b in zip(losses(runs[0]), losses(runs[1]))]
    record(
        "tiny (MoE), first 20 losses: bf16 on the device vs fp32 on the CPU",
        max_loss_gap=max(gaps),
        last_5_mean_gap=sum(gaps[-5:]) / 5,
        cpu_fp32=losses(runs[0]),
        device_bf16=losses(runs[1]),
    )
    assert sum(gaps[-5:]) / 5 < 0.1 and runs[1][-1]["loss"] < runs[1][0]["loss"] - 2
