"""Benchmarks that print numbers (never timed tests).

    python scripts/bench.py model [--preset tiny] [--batch 32] [--seq-len 128] [--steps 10] [--json]

`model`: one training step (forward, backward, AdamW) of a preset in this process, in fp32 on CPU or bf16
autocast on GPU: tokens/s, achieved FLOP/s from the model's FLOPs-per-token accounting, and MFU where the
device's peak is known.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import GrokForCausalLM, count_parameters, flops_per_token, preset_config  # noqa: E402

# Dense bf16 peak FLOP/s (no sparsity) by device name fragment.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def bench_model(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    overrides = {"attn_backend": args.attn_backend} if args.attn_backend else {}
    config = preset_config(args.preset, **overrides)
    torch.manual_seed(0)
    model = GrokForCausalLM(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1), device=device)
    use_bf16 = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(tokens[:, :-1], targets=tokens[:, 1:]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds_per_step = (time.perf_counter() - start) / args.steps

    tokens_per_step = args.batch * args.seq_len
    flops = flops_per_token(config, count_parameters(model).active, args.seq_len) * tokens_per_step
    peak = peak_flops(device)
    return {
        "bench": "model", "preset": args.preset, "device": str(device), "threads": torch.get_num_threads(),
        "dtype": "bf16" if use_bf16 else "fp32", "attn_backend": config.attn_backend,
        "batch": args.batch, "seq_len": args.seq_len, "ms_per_step": round(seconds_per_step * 1e3, 1),
        "tokens_per_s": round(tokens_per_step / seconds_per_step),
        "achieved_tflops": round(flops / seconds_per_step / 1e12, 4),
        "mfu": round(flops / seconds_per_step / peak, 4) if peak else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="section", required=True)
    m = sub.add_parser("model", help="train-step throughput of one preset in one process")
    m.add_argument("--preset", default="tiny")
    m.add_argument("--batch", type=int, default=32)
    m.add_argument("--seq-len", type=int, default=128)
    m.add_argument("--steps", type=int, default=10)
    m.add_argument("--warmup", type=int, default=3)
    m.add_argument("--attn-backend", choices=["eager", "sdpa", "flex"])
    m.add_argument("--json", action="store_true")
    args = parser.parse_args()

    result = bench_model(args)
    if args.json:
        print(json.dumps(result))
    else:
        width = max(map(len, result))
        for key, value in result.items():
            print(f"{key:{width}s}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
