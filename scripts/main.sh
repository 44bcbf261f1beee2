#!/usr/bin/env bash
# The main job on the embedded default corpus, offline: prepare the Python standard library, train the
# tiny Grok with FSDP on 2 CPU processes, export it to a Hugging Face folder, print a generated sample
# and plot the run. Re-running reuses the prepared data and resumes from the latest checkpoint (a
# finished run reports its final metrics again, then exports, samples and plots again).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
nproc="${NPROC:-2}"
run=runs/tiny

"$python" -m data.prepare --source stdlib --out runs/data/stdlib
"$python" -m torch.distributed.run --standalone --nproc_per_node="$nproc" \
    -m train --config configs/tiny.toml "$@"

checkpoint=$(ls -d "$run"/checkpoints/step_*[0-9] | tail -n 1)  # complete ones only
"$python" scripts/export_hf.py "$checkpoint" "$run/hf" --overwrite  # re-runs replace their own export
"$python" scripts/plot.py "$run" >/dev/null
echo
echo "--- a sample from the exported model (scripts/generate.py $run/hf --prompt 'def ') ---"
"$python" scripts/generate.py "$run/hf" --prompt "def " --max-new-tokens 120 --seed 0
echo "---"
echo "run folder: $run  (config.toml, metrics.jsonl, metrics.png, checkpoints/, hf/)"
tail -n 1 "$run/metrics.jsonl" | "$python" -c "
import json, sys
row = json.loads(sys.stdin.read())
print(f\"step {row['step']}: train loss {row['loss']:.3f}, val loss {row.get('val_loss', float('nan')):.3f}, \"
      f\"val bits/byte {row.get('val_bpb', float('nan')):.3f}\")"
