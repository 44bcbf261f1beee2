#!/usr/bin/env bash
# The Python packages a lent GPU machine lacks, as wheels, into a folder that travels with the device call and
# that scripts/gpu_check.py installs there (it has torch 2.11, transformers 5.17, accelerate, tokenizers,
# numpy, pyarrow, pandas, pytest, ... but no datasets, datatrove, pydantic or DeepSpeed, and no network).
#
#   bash scripts/gpu_wheels.sh [DEST] [PYTHON_VERSION]      default: .gpu-wheels (git-ignored) and 3.12
#
# Versions are the ones CI tests on torch 2.11 + transformers 5.17. DeepSpeed is published as a source
# distribution only: its wheel is built here in pip's isolated build environment, with every op off
# (DS_BUILD_OPS=0; ops JIT-compile on first use, as they do everywhere in this project), as `pip install
# deepspeed` builds it. PYTHON (default .venv/bin/python, else python3) is the Python whose pip runs.
set -euo pipefail
cd "$(dirname "$0")/.."

dest="${1:-.gpu-wheels}"
python_version="${2:-3.12}"
python="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"

# Binary wheels for the target interpreter (the lent machine: CPython 3.12, manylinux x86_64). pip matches a
# manylinux tag exactly, so every tag the wheels below use is named.
binary=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 datatrove==0.10.1 loguru==0.7.3 humanize==4.17.0
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        typing-extensions==4.16.0 hjson==3.1.0)
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done

mkdir -p "$dest"
"$python" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
    --python-version "$python_version" "${platforms[@]}" -d "$dest" "${binary[@]}"
DS_BUILD_OPS=0 "$python" -m pip wheel --quiet --no-deps -w "$dest" deepspeed==0.19.8

ls -1 "$dest"
du -sh "$dest"
