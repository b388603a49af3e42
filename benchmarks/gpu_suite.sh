#!/usr/bin/env bash
# Every benchmark side by side with its PyTorch peer, in one command, writing one JSON per case
# into OUT_DIR (and OUT_DIR/summary.json: each case's samples/s or seconds and ratio).
#
#   bash benchmarks/gpu_suite.sh OUT_DIR              # one H100/H200: the published sizes
#   bash benchmarks/gpu_suite.sh OUT_DIR --cpu-smoke  # the same cases, tiny, on a CPU
#
# The published sizes (karlo's): decoder batch 64 (64px), prior batch 256, CLIP ViT-B/16 batch
# 512, super-resolution on 64x64 crops batch 16, sampling at batch 1 and 8 (prior 25 / decoder
# 25 / super-resolution 7 steps). Ours in bfloat16 (float32 parameters), the peers under bf16
# autocast, eager and torch.compile'd; sampling: ours bfloat16 and float32, the peer float16.
# First, cuDNN's masked attention against XLA's at karlo's attention shapes (benchmarks/attention.py).
# Each train-step case also traces 2 steps and reports where their time goes, by kind of op
# (ours.profile). A case that fails or runs past CASE_TIMEOUT seconds (default 120; the sampling case twice that)
# is recorded (its log kept) and the suite goes on; a diffusion stage's case that runs out of
# memory is run again with rematerialisation (`<stage>_remat`). PYTHON picks the interpreter (default
# python3); STEPS the timed steps per case.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_suite.sh OUT_DIR [--cpu-smoke]}
MODE=${2:-gpu}
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
mkdir -p "$OUT"

if [ "$MODE" = "--cpu-smoke" ]; then
  STEPS=${STEPS:-1}
  CLIP=(--config=configs/clip.py:tiny --config.batch_size=8
        --config.model.text.depth=1 --config.model.vision.depth=1)
  SMALL_CLIP="--clip_overrides=model.embed_dim=32,model.text.width=32,model.text.depth=1,model.vision.depth=1,model.text.context_length=16,model.vision.width=32"
  PRIOR=(--config=configs/prior.py:karlo --config.batch_size=4 --config.model.width=64
         --config.model.depth=1 --config.model.num_heads=2 --config.model.scan=False
         --config.data.resolution=32 --config.clip.preset=tiny "$SMALL_CLIP")
  DECODER=(--config=configs/decoder.py:karlo --config.batch_size=2 --config.data.resolution=16
           --config.model.unet.model_channels=16 --config.model.unet.channel_mult='(1,2)'
           --config.model.unet.num_res_blocks=1 --config.model.unet.attention_resolutions='(2,)'
           --config.model.unet.num_head_channels=16 --config.model.unet.norm_groups=8
           --config.model.context_width=32 --config.clip.preset=tiny "$SMALL_CLIP")
  UPSAMPLER=(--config=configs/upsampler.py:karlo_64_256 --config.batch_size=2
             --config.data.resolution=32 --config.upsampler.crop_size=16
             --config.model.unet.model_channels=16 --config.model.unet.channel_mult='(1,2)'
             --config.model.unet.num_res_blocks=1 --config.model.unet.norm_groups=8)
  SAMPLING=(--size=smoke --batch_sizes=1 --dtypes=float32 --repeats=1)
  ATTENTION=(--cpu_smoke --repeats=2)
  COMPILE_PEER=()
  DTYPE=(--config.dtype=float32)
else
  STEPS=${STEPS:-10}
  CLIP=(--config=configs/clip.py:vit_b16 --config.batch_size=512)
  PRIOR=(--config=configs/prior.py:karlo --config.batch_size=256 --config.model.remat=False)
  DECODER=(--config=configs/decoder.py:karlo --config.batch_size=64
           --config.model.unet.remat=False)
  UPSAMPLER=(--config=configs/upsampler.py:karlo_64_256 --config.batch_size=16
             --config.model.unet.remat=False)
  SAMPLING=(--size=karlo '--batch_sizes=1,8' '--dtypes=bfloat16,float32' --repeats=3)
  ATTENTION=(--repeats=10)
  COMPILE_PEER=(--peer_compile)
  DTYPE=(--config.dtype=bfloat16)
fi

CASE_TIMEOUT=${CASE_TIMEOUT:-120}
failed=()
run_case() {   # name, seconds allowed, then the command's arguments
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  if timeout "$limit" "$PY" "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"; then
    echo "$name: done in $((SECONDS - start)) s"
  else
    echo "$name: FAILED after $((SECONDS - start)) s (see $OUT/$name.log)"
    failed+=("$name")
    return 1
  fi
}

COMMON=(--steps="$STEPS" --warmup=2 --profile_steps=2 "${COMPILE_PEER[@]}")
run_case attention "$CASE_TIMEOUT" benchmarks/attention.py "${ATTENTION[@]}"
run_case clip "$CASE_TIMEOUT" benchmarks/train_step.py "${CLIP[@]}" "${DTYPE[@]}" \
  "${COMMON[@]}" --peer=transformers
for stage in prior decoder upsampler; do
  case $stage in
    prior) ARGS=("${PRIOR[@]}"); REMAT=(--config.model.remat=True) ;;
    decoder) ARGS=("${DECODER[@]}"); REMAT=(--config.model.unet.remat=True) ;;
    upsampler) ARGS=("${UPSAMPLER[@]}"); REMAT=(--config.model.unet.remat=True) ;;
  esac
  if ! run_case "$stage" "$CASE_TIMEOUT" benchmarks/train_step.py "${ARGS[@]}" "${DTYPE[@]}" \
      "${COMMON[@]}" --peer=diffusers --align_to_peer &&
      grep -qiE 'RESOURCE_EXHAUSTED|out of memory' "$OUT/$stage.log"; then
    # Out of memory without rematerialisation: measure with it (keeping each block's convolution
    # and dense outputs, recomputing the rest) rather than not at all.
    run_case "${stage}_remat" "$CASE_TIMEOUT" benchmarks/train_step.py "${ARGS[@]}" \
      "${REMAT[@]}" "${REMAT[0]%.remat=True}.remat_policy=save_projections" "${DTYPE[@]}" \
      "${COMMON[@]}" --peer=diffusers --align_to_peer
  fi
done
run_case sampling "$((2 * CASE_TIMEOUT))" benchmarks/sampling.py "${SAMPLING[@]}"

"$PY" - "$OUT" <<'PYEOF'
import glob, json, os, sys
out = sys.argv[1]
summary = {}
for path in sorted(glob.glob(os.path.join(out, '*.json'))):
  name = os.path.basename(path)[:-5]
  if name == 'summary':
    continue
  try:
    with open(path) as f:
      r = json.load(f)
  except ValueError:
    summary[name] = 'no JSON (see the log)'
    continue
  if 'ours' in r and 'samples_per_s' in r['ours']:
    summary[name] = {'ours_samples_per_s': r['ours']['samples_per_s'],
                     'peer_samples_per_s': r.get('peer', {}).get('samples_per_s'),
                     'peer_compiled_samples_per_s': r.get('peer_compiled', {}).get(
                         'samples_per_s'),
                     'speedup_vs_peer': r.get('speedup_vs_peer'),
                     'speedup_vs_peer_compiled': r.get('speedup_vs_peer_compiled'),
                     'mfu': r['ours'].get('mfu'),
                     'ours_peak_memory_gb': r['ours'].get('peak_memory_gb'),
                     'peer_peak_memory_gb': r.get('peer', {}).get('peak_memory_gb'),
                     'attention': r['ours'].get('attention'),
                     'time_share_by_kind': {k: v['share'] for k, v in
                                            r['ours'].get('profile', {}).get('by_kind', {}).items()}}
  elif 'cases' in r:   # attention: cuDNN against XLA per shape
    summary[name] = {c: {k: v.get(k) for k in ('xla_ms', 'cudnn_ms', 'speedup_cudnn_vs_xla',
                                               'cudnn_refused', 'cudnn_lengths_ms',
                                               'speedup_cudnn_lengths_vs_xla',
                                               'cudnn_lengths_refused') if k in v}
                     | {'max_rel_diff': max((v.get('max_rel_diff') or {0: None}).values())}
                     for c, v in r['cases'].items()}
  else:
    summary[name] = {'speedup_vs_peer': r.get('speedup_vs_peer')}
with open(os.path.join(out, 'summary.json'), 'w') as f:
  json.dump(summary, f, indent=2)
print(json.dumps(summary, indent=2))
PYEOF
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}"
  exit 1
fi
