#!/usr/bin/env bash
# The prepared GPU check (issue 12): one command, about 8 minutes on one GPU, no network needed
# once the package is installed. It writes gpu_check/gpu_check.json and gpu_check/gpu_check.md
# (a Markdown block for BENCHMARKS.md) and prints both paths at the end.
#
#   bash scripts/gpu_check.sh                          # on the GPU machine
#   bash scripts/gpu_check.sh --device cpu --dry_run   # the same parts, tiny and quick, on a CPU
#
# Parts run in order of value, each in its own process with its own time limit; a part that
# fails or runs out of time is recorded with its reason and the next one runs. Arguments go to
# scripts/gpu_check.py (--help lists them).
set -uo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)

PY=${PYTHON:-python3}
# A machine with no package index (a lent GPU box) gets the pure-Python packages it lacks as wheels
# in .whl/ (pip download --no-deps ... -d .whl jsonargparse docstring_parser typeshed_client timm).
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --target /tmp/pyra-site .whl/*.whl \
        && export PYTHONPATH=/tmp/pyra-site${PYTHONPATH:+:$PYTHONPATH} \
        && echo "gpu_check: installed $(ls .whl | tr '\n' ' ')from .whl/"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! "$PY" -c "import torch, timm, lightning, jsonargparse, safetensors" 2>/dev/null; then
    # Reuse the machine's torch (its CUDA build) and install only what is missing.
    echo "gpu_check: installing pyra-lightning[dev] into .venv-gpu (system site packages visible)"
    if [ ! -x .venv-gpu/bin/python ]; then
        "$PY" -m venv --system-site-packages .venv-gpu || exit 1
    fi
    .venv-gpu/bin/python -m pip install --quiet -e ".[dev]" || echo "gpu_check: pip install failed; trying anyway"
    PY=.venv-gpu/bin/python
fi
echo "gpu_check: install/check took $(( $(date +%s) - started )) s, python: $PY"
exec "$PY" scripts/gpu_check.py "$@"
