#!/usr/bin/env bash
# The main job on the embedded default corpus, offline: prepare the Python standard library, then
# train the tiny Grok with FSDP on 2 CPU processes. Re-running reuses the prepared data and resumes
# from the latest checkpoint (a finished run reports its final metrics again and exits).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
nproc="${NPROC:-2}"

"$python" -m data.prepare --source stdlib --out runs/data/stdlib
"$python" -m torch.distributed.run --standalone --nproc_per_node="$nproc" \
    -m train --config configs/tiny.toml "$@"

echo
echo "run folder: runs/tiny  (config.toml, metrics.jsonl, checkpoints/)"
tail -n 1 runs/tiny/metrics.jsonl | "$python" -c "
import json, sys
row = json.loads(sys.stdin.read())
print(f\"step {row['step']}: train loss {row['loss']:.3f}, val loss {row.get('val_loss', float('nan')):.3f}, \"
      f\"val bits/byte {row.get('val_bpb', float('nan')):.3f}\")"
