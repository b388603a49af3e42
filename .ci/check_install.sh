#!/usr/bin/env bash
# The package after a plain (non-editable) `pip install .` into a fresh virtual environment,
# used from a directory outside the source tree: the commands, the installed config files
# (unclip_jax.presets) and the converters must work without the repository on the path.
# The dependencies are borrowed from the project's .venv (made by launch/setup.sh) through a
# .pth file, so nothing large is installed twice.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
python3 -m venv "$TMP/venv"
PY="$TMP/venv/bin/python"
DEPS=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$TMP/site"
echo "$DEPS" > "$(cat "$TMP/site")/project_dependencies.pth"
"$PY" -m pip install -q --no-deps --no-build-isolation "$ROOT"
mkdir "$TMP/elsewhere" && cd "$TMP/elsewhere"
export UNCLIP_DATA_DIR="$TMP/data" XLA_FLAGS='' TF_CPP_MIN_LOG_LEVEL=3
"$PY" - "$ROOT" <<'PYEOF'
import sys
import unclip_jax, unclip_jax.presets
root = sys.argv[1]
assert not unclip_jax.__file__.startswith(root), unclip_jax.__file__
assert not any(p.rstrip('/') == root for p in sys.path), sys.path
from unclip_jax import config_lib
job = config_lib.preset('unclip', 'tiny')
assert job.clip.stage == 'clip' and job.upsampler.stage == 'upsampler'
from unclip_jax.convert import base_config      # what the converters start from
assert base_config('decoder', 'karlo').model.unet.model_channels == 320
print('installed at', unclip_jax.__file__)
PYEOF
"$TMP/venv/bin/unclip-train" --config=configs/clip.py:tiny --workdir=run_clip \
  --config.num_train_steps=2 --config.batch_size=8 --config.log_every_steps=1 \
  --config.checkpoint.every_steps=0 --config.data.num_train=64 --config.data.num_test=16 \
  --config.eval.num_examples=16 --config.eval.batch_size=16 > train.log 2>&1 \
  || { tail -30 train.log; exit 1; }
test -f run_clip/export/config.json
# absl's --helpfull exits with 1 after printing the flags; what counts is that they print.
{ "$TMP/venv/bin/unclip-sample" --helpfull 2>&1 || true; } | grep -q -- '--prompts_file'
{ "$PY" -m unclip_jax.data.prepare --helpfull 2>&1 || true; } | grep -q -- '--records_per_shard'
"$PY" -m unclip_jax.convert --help > /dev/null
# The installed sweep files, from outside the tree.
"$TMP/venv/bin/unclip-sweep" --config=configs/clip.py:tiny --sweep=configs/sweeps/clip_tiny.py \
  --workdir=sweep --emit=commands | grep -c -- '--point=' | grep -qx 3
echo "non-editable install: OK"
