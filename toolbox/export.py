"""Export a run checkpoint to a Hugging Face folder (`scripts/export_hf.py` is its command line).

    python scripts/export_hf.py CHECKPOINT OUT [--tokenizer DIR] [--dtype fp32|bf16] [--max-shard-size 2GB]
                                [--overwrite]

CHECKPOINT is any complete checkpoint folder (`runs/NAME/checkpoints/step_N`): DCP (none/ddp/fsdp/hsdp)
or DeepSpeed ZeRO-1/2/3, written by any number of ranks; it is verified and merged into full weights in
this one process. OUT gets `config.json` (with `auto_map`), `generation_config.json`, `model.safetensors`
(sharded above --max-shard-size), the model's own code (so it loads without this project installed,
with `trust_remote_code=True`), a model card (`README.md`) and the checkpoint's tokenizer (or --tokenizer
DIR). OUT appears atomically. An existing OUT is replaced only with --overwrite and only if it is an
export this command made; anything else there (or a symlink) is refused before any work. A second export
into the same OUT stops in one line naming the first; what a killed export left is removed by the next.
The checkpoint's config.json is checked against its weights, and the tokenizer against the model, before
anything is written; only the tokenizer's regular files are copied.
"""

import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers.utils import logging as transformers_logging
from transformers.utils.hub import convert_file_size_to_int

from groundwork import folders
from groundwork.cli import ArgumentParser, run_main
from groundwork.errors import UserError
from groundwork.untrusted import UntrustedFileError, regular_file
from model import GrokForCausalLM, count_parameters
from train.checkpoint import TOKENIZER_FILES, CheckpointError, read_meta
from train.engine_api import first_line
from train.metrics import MetricsError, read_metrics
from train.weights import load_model_weights, read_model_config, read_tokenizer_file, tokenizer_dir, tokenizer_for

from .remote_code import write_model_code


def last_validation(checkpoint: Path, step: int) -> dict:
    """The run's last validation at or before the checkpoint's step (from the run folder's metrics.jsonl)."""
    run = checkpoint.parent.parent
    try:
        regular_file(run / "metrics.jsonl", "metrics", "")  # a FIFO there would block the export forever
        rows = read_metrics(run)
    except (MetricsError, UntrustedFileError):
        rows = []  # the card says "not recorded" rather than failing the export
    numbers = ("val_loss", "val_bpb", "step")
    rows = [
        r
        for r in rows
        if all(isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) for key in numbers)
        and r["step"] <= step
    ]
    return rows[-1] if rows else {}


def model_card(model: GrokForCausalLM, checkpoint: Path, meta: dict) -> str:
    counts = count_parameters(model)
    val = last_validation(checkpoint, meta["step"])
    c = model.config
    preset = meta.get("preset")
    preset = preset if isinstance(preset, str) and preset.isprintable() and len(preset) < 100 else "unknown"
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
| preset | {preset} |
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


class ExportError(UserError, RuntimeError):
    """An export that could not be written (a full disk, say); one line: OUT, why, and the free space."""


def check_paths(checkpoint: Path, out: Path, tokenizer: Path | None) -> None:
    """OUT is never written inside what it is made from: the checkpoint would then hold files its
    COMPLETE does not list, and no longer verify."""
    for source, what in ((checkpoint, "CHECKPOINT"), (tokenizer, "--tokenizer")):
        if source is not None and out.resolve().is_relative_to(source.resolve()):
            raise folders.FolderError(f"OUT {out}: inside {what} {source}; write the export elsewhere")


def write_export(tmp: Path, model: GrokForCausalLM, max_shard_size: str, card: str, tokenizer: dict) -> None:
    transformers_logging.disable_progress_bar()  # the command prints its result, or one line of error
    model.save_pretrained(tmp, max_shard_size=max_shard_size)
    write_model_code(tmp)
    (tmp / "README.md").write_text(card)
    for name, content in tokenizer.items():
        (tmp / name).write_bytes(content)


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
    check_paths(checkpoint, out, Path(tokenizer) if tokenizer else None)
    with folders.OutputLock(out, "OUT"):  # a second export into OUT stops here, naming this one
        folders.remove_leftovers(out.parent, out.name, "export")  # what a killed export left
        meta = read_meta(checkpoint)
        source, what = (Path(tokenizer), "--tokenizer") if tokenizer else (tokenizer_dir(checkpoint), "CHECKPOINT")
        if source is None or not os.path.lexists(source / "tokenizer.json"):
            raise CheckpointError(
                f"{source or checkpoint}: no tokenizer.json; pass --tokenizer with the prepared data "
                f"folder the run trained on"
            )
        tokenizer_for(source, read_model_config(checkpoint, "CHECKPOINT"), what)  # it fits the model
        # Only regular files are copied: a link to a user's file would ship that file inside the export.
        files = {
            name: read_tokenizer_file(source, name, what) for name in TOKENIZER_FILES if os.path.lexists(source / name)
        }
        config, weights = load_model_weights(checkpoint)
        with torch.device("meta"):
            model = GrokForCausalLM(config)
        model.load_state_dict(weights, strict=True, assign=True)
        if dtype == "bf16":
            model = model.to(torch.bfloat16)
        card = model_card(model, checkpoint, meta)
        with folders.atomic_folder(out, "export", "OUT", overwrite) as tmp:
            try:
                write_export(tmp, model, max_shard_size, card, files)
            except (OSError, SafetensorError) as error:  # measured before the partial export is removed
                free_mib = shutil.disk_usage(tmp).free / 2**20
                raise ExportError(
                    f"OUT {out}: writing the export failed ({first_line(error)}) with {free_mib:.1f} MiB free on "
                    f"its disk; nothing was left there: free space (the export needs about "
                    f"{sum(t.numel() * t.element_size() for t in model.parameters()) >> 20} MiB) or choose "
                    f"another OUT"
                ) from None
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
        shard_bytes = convert_file_size_to_int(args.max_shard_size)
    except ValueError:
        shard_bytes = 0
    if not isinstance(shard_bytes, int) or shard_bytes < 1:
        parser.error(f"--max-shard-size {args.max_shard_size!r}: write a size such as 500MB or 2GB")

    def work():
        out = export(args.checkpoint, args.out, args.tokenizer, args.dtype, args.max_shard_size, args.overwrite)
        print(f"exported {args.checkpoint} -> {out}")

    return run_main(work)


if __name__ == "__main__":
    sys.exit(main())
