#!/usr/bin/env bash
# Wheels for a GPU machine with no package index (the lent H200): the pure-Python packages its
# image lacks (jsonargparse and the two helpers its signatures need) and timm, at the versions
# installed here, so the check runs the code the tests ran. Writes .whl/ (git-ignored), which
# scripts/gpu_check.sh installs into /tmp/pyra-site when it finds it; carry it with the call.
#
#   bash scripts/gpu_wheels.sh            # uses .venv/bin/python's versions
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
pins=$("$PY" -c "from importlib.metadata import version as v; print(' '.join(f'{n}=={v(n)}' for n in ('jsonargparse', 'docstring_parser', 'typeshed_client', 'timm')))")
rm -rf .whl.partial && mkdir .whl.partial
"$PY" -m pip download --quiet --no-deps --only-binary :all: -d .whl.partial $pins
rm -rf .whl && mv .whl.partial .whl  # a download cut short never leaves a half-filled .whl/
echo "gpu_wheels: $(ls .whl | tr '\n' ' ')in .whl/"
