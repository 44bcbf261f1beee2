"""python -m model PRESET [--json] [--save DIR]: inspect a preset, or save a randomly initialised one.

Without --save the model is built on the meta device, so even grok-1 (314B) costs no memory.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from . import PRESETS, GrokForCausalLM, count_parameters, flops_per_token, preset_config

# Saving materialises the weights in fp32; refuse before allocating what this machine cannot hold.
MAX_SAVE_PARAMS = 2_000_000_000


def describe(name: str) -> dict:
    config = preset_config(name)
    with torch.device("meta"):
        model = GrokForCausalLM(config)
    counts = count_parameters(model)
    return {
        "preset": name,
        "params_total": counts.total,
        "params_active": counts.active,
        "flops_per_token": flops_per_token(config, counts.active),
        "flops_seq_len": config.max_position_embeddings,
        "config": {
            k: v for k, v in config.to_diff_dict().items() if not k.startswith("_") and k != "transformers_version"
        },
    }


def human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model", description=__doc__)
    parser.add_argument("preset", help=f"one of: {', '.join(PRESETS)}")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--save", metavar="DIR", help="write a randomly initialised HF folder (small presets)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed for --save")
    args = parser.parse_args(argv)

    if args.preset not in PRESETS:
        parser.error(f"unknown preset {args.preset!r}: choose one of {', '.join(PRESETS)}")
    info = describe(args.preset)
    if args.save and info["params_total"] > MAX_SAVE_PARAMS:
        parser.error(
            f"--save: preset {args.preset!r} has {human(info['params_total'])} parameters; saving "
            f"random weights is for presets up to {human(MAX_SAVE_PARAMS)} (e.g. tiny, small)"
        )
    if args.save and Path(args.save).exists() and (not Path(args.save).is_dir() or any(Path(args.save).iterdir())):
        parser.error(f"--save {args.save}: exists and is not empty; choose a new folder (nothing is overwritten)")

    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"preset {args.preset}")
        for key, value in info["config"].items():
            print(f"  {key:26s} {value}")
        print(
            f"parameters   {human(info['params_total'])} total, {human(info['params_active'])} active per token "
            f"(tied embedding counted once)"
        )
        print(f"train FLOPs  {human(info['flops_per_token'])} per token at seq_len {info['flops_seq_len']}")

    if args.save:
        torch.manual_seed(args.seed)
        model = GrokForCausalLM(preset_config(args.preset))
        out = Path(args.save)
        model.save_pretrained(out)
        print(f"saved randomly initialised {args.preset} to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
