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
# in .whl/, made here by scripts/gpu_wheels.sh and carried with the call.
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target /tmp/pyra-site .whl/*.whl \
        && export PYTHONPATH=/tmp/pyra-site${PYTHONPATH:+:$PYTHONPATH} \
        && echo "gpu_check: installed $(ls .whl | tr '\n' ' ')from .whl/"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# What every part imports, and what only the CLI parts (fit_bf16, fit_16) need. Nothing is
# installed here: the machine's own torch is the one with its CUDA, and a venv made from an
# interpreter that is itself a venv would not see that torch.
missing=$("$PY" -c "
import importlib
missing = []
for name in ('torch', 'timm', 'lightning', 'safetensors'):
    try:
        importlib.import_module(name)  # imported, not only found: a carried timm needs torchvision
    except Exception as error:
        missing.append(f'{name} ({type(error).__name__}: {error})')
print('; '.join(missing))" 2>&1) \
    || { echo "gpu_check: $PY does not run: $missing"; exit 2; }
if [ -n "$missing" ]; then
    echo "gpu_check: $PY has no $missing; install pyra-lightning into it (pip install -e '.[dev]'), or with no package index carry wheels in .whl/ (bash scripts/gpu_wheels.sh)"
    exit 2
fi
if ! "$PY" -c "import jsonargparse" 2>/dev/null; then
    echo "gpu_check: note: no jsonargparse, so fit_bf16 and fit_16 (the CLI) will fail; bash scripts/gpu_wheels.sh makes .whl/"
fi
echo "gpu_check: ready in $(( $(date +%s) - started )) s; $("$PY" -c "import sys, torch, triton; print(f'python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__}, triton {triton.__version__}')" 2>&1 | tail -1)"
exec "$PY" scripts/gpu_check.py "$@"
