"""Export a training checkpoint to a Hugging Face folder.

    python scripts/export_hf.py CHECKPOINT OUT [--tokenizer DIR] [--dtype fp32|bf16] [--max-shard-size 2GB]

CHECKPOINT is any complete checkpoint folder (`runs/NAME/checkpoints/step_N`): DCP (none/ddp/fsdp/hsdp)
or DeepSpeed ZeRO-1/2/3, written by any number of ranks; it is merged into full weights in this one
process. OUT gets `config.json`, `generation_config.json`, `model.safetensors` (sharded above
--max-shard-size), a model card (`README.md`: preset, size, tokens seen, last validation) and the
tokenizer of the data the run trained on (or --tokenizer DIR), so that

    import model; AutoModelForCausalLM.from_pretrained(OUT); AutoTokenizer.from_pretrained(OUT)

load it. OUT is written to a temporary folder and renamed when complete.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import GrokForCausalLM, count_parameters  # noqa: E402
from train.checkpoint import CheckpointError, load_model_weights  # noqa: E402
from train.checkpoint import tokenizer_dir as checkpoint_tokenizer_dir  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def last_validation(checkpoint: Path, step: int) -> dict:
    """The run's last validation at or before the checkpoint's step (from the run folder's metrics.jsonl)."""
    metrics = checkpoint.parent.parent / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    rows = [r for r in rows if "val_loss" in r and r["step"] <= step]
    return rows[-1] if rows else {}


def model_card(model: GrokForCausalLM, checkpoint: Path) -> str:
    meta = json.loads((checkpoint / "trainer.json").read_text())
    counts = count_parameters(model)
    val = last_validation(checkpoint, meta["step"])
    c = model.config
    score = (f"{val['val_loss']:.4f} nats/token, {val['val_bpb']:.4f} bits/byte (step {val['step']})"
             if val else "not recorded")
    return f"""---
library_name: transformers
tags: [minicolossus, grok, mixture-of-experts]
---
# {checkpoint.parent.parent.name}

A Grok-1-architecture decoder trained with minicolossus: {c.num_hidden_layers} layers,
d {c.hidden_size}, {c.num_attention_heads}/{c.num_key_value_heads} query/KV heads,
{c.num_local_experts} experts top-{c.num_experts_per_tok}, vocabulary {c.vocab_size}, context {c.max_position_embeddings}.

| | |
| --- | --- |
| preset | {meta.get("preset", "unknown")} |
| parameters | {counts.total:,} total, {counts.active:,} active per token |
| trained | {meta["step"]:,} steps, {meta["tokens_seen"]:,} tokens, {meta["strategy"]} on {meta["world_size"]} rank(s) |
| validation | {score} |

```python
import model  # minicolossus: registers the architecture with transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
lm = AutoModelForCausalLM.from_pretrained("PATH")
tokenizer = AutoTokenizer.from_pretrained("PATH")
```
"""


def export(checkpoint: Path, out: Path, tokenizer: str | None = None, dtype: str = "fp32",
           max_shard_size: str = "2GB") -> Path:
    config, weights = load_model_weights(checkpoint)
    tokenizer_dir = Path(tokenizer) if tokenizer else checkpoint_tokenizer_dir(checkpoint)
    if tokenizer_dir is not None and not (tokenizer_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{tokenizer_dir}: no tokenizer.json; pass --tokenizer with the prepared data folder")
    with torch.device("meta"):
        model = GrokForCausalLM(config)
    model.load_state_dict(weights, strict=True, assign=True)
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=max_shard_size)
    (tmp / "README.md").write_text(model_card(model, checkpoint))
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy(tokenizer_dir / name, tmp / name)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/export_hf.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a complete checkpoint folder (runs/NAME/checkpoints/step_N)")
    parser.add_argument("out", type=Path, help="the Hugging Face folder to write")
    parser.add_argument("--tokenizer", help="folder with tokenizer.json (default: the run's prepared data)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="dtype of the saved weights")
    parser.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (default 2GB)")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.tokenizer, args.dtype, args.max_shard_size)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
