#!/usr/bin/env bash
# Creates .venv (if missing) and installs unclip_jax into it.
#   bash launch/setup.sh          the package and its runtime dependencies (JAX for the CPU)
#   bash launch/setup.sh --test   also the test dependencies and the PyTorch references
#   bash launch/setup.sh --tpu    the package with JAX for TPUs (libtpu)
#   bash launch/setup.sh --cuda   the package with JAX for NVIDIA GPUs (CUDA 12 wheels)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
case "${1:-}" in
  --test)
    # The CPU build of torch first, so that the extras' torch requirement is already satisfied.
    .venv/bin/python -m pip install -q 'torch==2.13.0'
    .venv/bin/python -m pip install -q -e '.[test,torch]'
    .venv/bin/python -m pip install -q --no-deps 'open-clip-torch>=2.20' 'torch-fidelity>=0.3'
    ;;
  --tpu) .venv/bin/python -m pip install -q -e . 'jax[tpu]' ;;
  --cuda) .venv/bin/python -m pip install -q -e . 'jax[cuda12]' ;;
  '') .venv/bin/python -m pip install -q -e . ;;
  *) echo "launch/setup.sh: unknown option $1 (--test, --tpu or --cuda)" >&2; exit 2 ;;
esac
