#!/usr/bin/env bash
# The oldest supported versions, which are the lent GPU machine's (torch 2.11 + transformers 5.17), tested on this
# CPU, then the GPU check rehearsed end to end on the same software. `.ci/run` runs this after the suite.
#
#   bash scripts/test_oldest.sh        (Python 3.11; pip needs the package index; ~4.6 GB of venv while it runs)
#
# 1. A fresh venv with pyproject.toml's lower bounds: torch's default index build (it runs on a CPU),
#    transformers, accelerate, tokenizers, safetensors and huggingface-hub as the GPU machine has them, and
#    datasets, pydantic and DeepSpeed at the versions scripts/gpu_wheels.sh carries there.
# 2. The `compat` tests: at least one test of every test module, and every test that failed on these versions
#    before (compiled training, tensor parallelism, the benchmark's FLOP/s, hostile checkpoint metadata).
# 3. scripts/gpu_wheels.sh for this Python, then scripts/gpu_check.py --cpu: wheels installed into a private
#    folder, environment, the gpu tier on the CPU, every benchmark at a tiny size.
set -euo pipefail
cd "$(dirname "$0")/.."

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
venv="$work/venv"

python3.11 -m venv "$venv"
"$venv/bin/pip" install --quiet torch==2.11.0 transformers==5.17.0 accelerate==1.15.0 tokenizers==0.23.2 \
    safetensors==0.8.0 huggingface-hub==1.33.0 datasets==5.2.0 pydantic==2.14.4 deepspeed==0.19.8
"$venv/bin/pip" install --quiet -e ".[dev,deepspeed]"
"$venv/bin/python" -c "import torch, transformers; print('oldest supported: torch', torch.__version__,
      '+ transformers', transformers.__version__)"

"$venv/bin/python" -m pytest -q -m compat

PYTHON="$venv/bin/python" bash scripts/gpu_wheels.sh "$work/wheels" 3.11 >/dev/null
"$venv/bin/python" scripts/gpu_check.py --cpu --wheels "$work/wheels" --site "$work/site" --out "$work/gpu-check" \
    --deadline-s 1500 || { cat "$work/gpu-check/gpu_check.json"; tail -50 "$work/gpu-check/tests.log"; exit 1; }
