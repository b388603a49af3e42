#!/usr/bin/env bash
# Creates .venv (if missing) and installs unclip_jax into it.
#   bash launch/setup.sh          the package and its runtime dependencies
#   bash launch/setup.sh --test   also the test dependencies and the PyTorch references
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
  # The CPU build of torch first, so that the extras' torch requirement is already satisfied.
  .venv/bin/python -m pip install -q 'torch==2.13.0'
  .venv/bin/python -m pip install -q -e '.[test,torch]'
  .venv/bin/python -m pip install -q --no-deps 'open-clip-torch>=2.20' 'torch-fidelity>=0.3'
else
  .venv/bin/python -m pip install -q -e .
fi
