"""Export a run checkpoint to a Hugging Face folder (`scripts/export_hf.py` is its command line).

    python scripts/export_hf.py CHECKPOINT OUT [--tokenizer DIR] [--dtype fp32|bf16] [--max-shard-size 2GB]
                                [--overwrite]

CHECKPOINT is any complete checkpoint folder (`runs/NAME/checkpoints/step_N`): DCP (none/ddp/fsdp/hsdp)
or DeepSpeed ZeRO-1/2/3, written by any number of ranks; it is verified and merged into full weights in
this one process. OUT gets `config.json` (with `auto_map`), `generation_config.json`, `model.safetensors`
(sharded above --max-shard-size), the model's own code (so it loads without this project installed,
with `trust_remote_code=True`), a model card (`README.md`) and the checkpoint's tokenizer (or --tokenizer
DIR). OUT appears atomically. An existing OUT is replaced only with --overwrite and only if it is an
export this command made; anything else there is refused.
"""

import shutil
import sys
from pathlib import Path

import torch
from transformers.utils.hub import convert_file_size_to_int

from groundwork import folders
from groundwork.cli import ArgumentParser, run_main
from model import GrokForCausalLM, count_parameters
from train.checkpoint import TOKENIZER_FILES, CheckpointError, read_meta
from train.metrics import MetricsError, read_metrics
from train.weights import load_model_weights, tokenizer_dir

from .remote_code import write_model_code


def last_validation(checkpoint: Path, step: int) -> dict:
    """The run's last validation at or before the checkpoint's step (from the run folder's metrics.jsonl)."""
    run = checkpoint.parent.parent
    try:
        rows = read_metrics(run) if (run / "metrics.jsonl").is_file() else []
    except MetricsError:
        rows = []  # the card says "not recorded" rather than failing the export
    rows = [r for r in rows if "val_loss" in r and r.get("step", step + 1) <= step]
    return rows[-1] if rows else {}


def model_card(model: GrokForCausalLM, checkpoint: Path, meta: dict) -> str:
    counts = count_parameters(model)
    val = last_validation(checkpoint, meta["step"])
    c = model.config
    score = (
        f"{val['val_loss']:.4f} nats/token, {val['val_bpb']:.4f} bits/byte (step {val['step']})"
        if val
        else "not recorded"
    )
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
from transformers import AutoModelForCausalLM, AutoTokenizer
# The model's code ships in this folder: trust_remote_code=True runs those .py files, so only pass it for
# folders you exported yourself or have read. With minicolossus installed, `import model` first and
# leave trust_remote_code out.
lm = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("PATH")
```
"""


def export(
    checkpoint: Path,
    out: Path,
    tokenizer: str | None = None,
    dtype: str = "fp32",
    max_shard_size: str = "2GB",
    overwrite: bool = False,
) -> Path:
    checkpoint, out = Path(checkpoint), Path(out)
    folders.check_replaceable(out, "export", "OUT", overwrite)  # before any heavy work
    meta = read_meta(checkpoint)
    source = Path(tokenizer) if tokenizer else tokenizer_dir(checkpoint)
    if source is None or not (source / "tokenizer.json").is_file():
        raise CheckpointError(
            f"{source or checkpoint}: no tokenizer.json; pass --tokenizer with the prepared data "
            f"folder the run trained on"
        )
    config, weights = load_model_weights(checkpoint)
    with torch.device("meta"):
        model = GrokForCausalLM(config)
    model.load_state_dict(weights, strict=True, assign=True)
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    with folders.atomic_folder(out, "export", "OUT", overwrite) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        write_model_code(tmp)
        (tmp / "README.md").write_text(model_card(model, checkpoint, meta))
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy(source / name, tmp / name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="scripts/export_hf.py", description=__doc__)
    parser.add_argument("checkpoint", type=Path, help="a complete checkpoint folder (runs/NAME/checkpoints/step_N)")
    parser.add_argument("out", type=Path, help="the Hugging Face folder to write")
    parser.add_argument("--tokenizer", help="folder with tokenizer.json (default: the checkpoint's own copy)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="dtype of the saved weights")
    parser.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (default 2GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it is an export made by this command")
    args = parser.parse_args(argv)
    try:
        convert_file_size_to_int(args.max_shard_size)
    except ValueError:
        parser.error(f"--max-shard-size {args.max_shard_size!r}: write a size such as 500MB or 2GB")

    def work():
        out = export(args.checkpoint, args.out, args.tokenizer, args.dtype, args.max_shard_size, args.overwrite)
        print(f"exported {args.checkpoint} -> {out}")

    return run_main(work)


if __name__ == "__main__":
    sys.exit(main())
