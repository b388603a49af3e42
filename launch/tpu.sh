#!/bin/bash
# Train on a Cloud TPU VM or pod slice: create it (or reuse it), put this checkout on every worker,
# install, and run one command on all workers at once with --distributed.
#
#   bash launch/tpu.sh --name=unclip-v5p --zone=us-east5-a --accelerator=v5p-64 --spot -- \
#       python -m unclip_jax.main --config=configs/decoder.py:karlo --workdir=gs://BUCKET/decoder
#   bash launch/tpu.sh --name=unclip-v5p --zone=us-east5-a --resume   # the same command again
#   bash launch/tpu.sh ... --dry_run     # print every command, run nothing
#
# Flags:
#   --name=NAME --zone=ZONE    the TPU VM (required)
#   --accelerator=TYPE         e.g. v4-32, v5p-64, v5litepod-16, v6e-8 (required to create one)
#   --project=PROJECT          default: gcloud's configured project
#   --version=RUNTIME          TPU software version (default: the one for the accelerator)
#   --spot                     a spot VM (preemptible; cheaper)
#   --queued                   request it as a queued resource and wait until it is granted
#   --repo=URL [--ref=REF]     clone this repository on the workers instead of copying the
#                              checkout (tracked and untracked, not ignored, files)
#   --resume                   run the command this launcher last ran on NAME (saved locally);
#                              the run resumes from its workdir's checkpoints
#   --max_restarts=N           when the VM is preempted during the run, delete and recreate it,
#                              reinstall and rerun, up to N times (default 0)
#   --dry_run                  print the commands instead of running them
#
# The workdir and data should be on GCS (gs://...): a preempted or recreated VM keeps nothing.
# On preemption the training command checkpoints at SIGTERM and exits; the same command resumes.
# Each worker logs to ~/unclip_jax/logs/<its hostname>.log (and this terminal shows them all):
#   gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=3 --command='tail -f unclip_jax/logs/*'
set -euo pipefail

NAME='' ZONE='' ACCELERATOR='' PROJECT='' VERSION='' SPOT=0 QUEUED=0 REPO='' REF=''
RESUME=0 MAX_RESTARTS=0 DRY_RUN=0
usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
}
die() {
  echo "launch/tpu.sh: $*" >&2
  exit 2
}
while [ $# -gt 0 ]; do
  case "$1" in
    --name=*) NAME=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --accelerator=*) ACCELERATOR=${1#*=} ;;
    --project=*) PROJECT=${1#*=} ;;
    --version=*) VERSION=${1#*=} ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    --repo=*) REPO=${1#*=} ;;
    --ref=*) REF=${1#*=} ;;
    --resume) RESUME=1 ;;
    --max_restarts=*) MAX_RESTARTS=${1#*=} ;;
    --dry_run) DRY_RUN=1 ;;
    -h|--help) usage ;;
    --) shift; break ;;
    *) die "unknown flag $1 (the training command goes after --; --help lists the flags)" ;;
  esac
  shift
done
[ -n "$NAME" ] || die "--name is required"
[ -n "$ZONE" ] || die "--zone is required"
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "--max_restarts must be a number, got $MAX_RESTARTS"

STATE_DIR=${UNCLIP_LAUNCH_STATE:-${XDG_STATE_HOME:-$HOME/.local/state}/unclip_jax/tpu}
SAVED="$STATE_DIR/$NAME.command"
if [ "$RESUME" = 1 ] && [ $# -eq 0 ]; then
  [ -f "$SAVED" ] || die "--resume: no command saved for $NAME in $SAVED"
  mapfile -t saved < "$SAVED"
  set -- "${saved[@]}"
fi
[ $# -gt 0 ] || die "no training command (give it after --, or --resume)"
# `python` in the command is the interpreter that launch/setup.sh made on the workers.
if [ "$1" = "python" ] || [ "$1" = "python3" ]; then
  set -- .venv/bin/python "${@:2}"
fi
COMMAND=("$@")

if [ -z "$VERSION" ]; then
  case "$ACCELERATOR" in
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    *) VERSION=tpu-ubuntu2204-base ;;
  esac
fi
GCLOUD_WHERE=(--zone="$ZONE")
[ -z "$PROJECT" ] || GCLOUD_WHERE+=(--project="$PROJECT")
TPU=(gcloud compute tpus tpu-vm)

quote() {   # one word as a shell reads it back: bare if safe, else in single quotes
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

show() {   # prints a command, '+ ' and its words quoted
  printf '+'
  for word in "$@"; do printf ' %s' "$(quote "$word")"; done
  printf '\n'
}

run() {   # prints the command; runs it unless --dry_run
  show "$@"
  [ "$DRY_RUN" = 1 ] || "$@"
}

vm_state() {   # READY, PREEMPTED, ... or NONE
  "${TPU[@]}" describe "$NAME" "${GCLOUD_WHERE[@]}" --format='value(state)' 2>/dev/null \
    || echo NONE
}

create_vm() {
  [ -n "$ACCELERATOR" ] || die "$NAME does not exist: --accelerator is needed to create it"
  local spot=()
  [ "$SPOT" = 0 ] || spot=(--spot)
  if [ "$QUEUED" = 1 ]; then
    run gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" \
      "${GCLOUD_WHERE[@]}" --accelerator-type="$ACCELERATOR" --runtime-version="$VERSION" \
      "${spot[@]}"
    echo "# waiting until the queued resource $NAME is ACTIVE"
    if [ "$DRY_RUN" = 0 ]; then
      until [ "$(gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_WHERE[@]}" \
                 --format='value(state.state)')" = ACTIVE ]; do
        sleep 30
      done
    fi
  else
    run "${TPU[@]}" create "$NAME" "${GCLOUD_WHERE[@]}" --accelerator-type="$ACCELERATOR" \
      --version="$VERSION" "${spot[@]}"
  fi
}

delete_vm() {
  if [ "$QUEUED" = 1 ]; then
    run gcloud compute tpus queued-resources delete "$NAME" "${GCLOUD_WHERE[@]}" --force --quiet
  else
    run "${TPU[@]}" delete "$NAME" "${GCLOUD_WHERE[@]}" --quiet
  fi
}

on_all() {   # runs a shell command on every worker at once
  run "${TPU[@]}" ssh "$NAME" "${GCLOUD_WHERE[@]}" --worker=all --command="$1"
}

put_code() {
  if [ -n "$REPO" ]; then
    local checkout="git -C unclip_jax pull --quiet --ff-only" clone
    clone="[ -d unclip_jax/.git ] || git clone --quiet $(quote "$REPO") unclip_jax"
    # A branch, tag or commit: whatever it names on the remote now.
    if [ -n "$REF" ]; then
      checkout="git -C unclip_jax fetch --quiet origin $(quote "$REF")"
      checkout+=" && git -C unclip_jax checkout --quiet --detach FETCH_HEAD"
    fi
    on_all "set -e; $clone; $checkout"
    return
  fi
  local root tarball
  root=$(cd "$(dirname "$0")/.." && pwd)
  tarball=$(mktemp --suffix=.tar.gz)
  # The checkout as it is (committed or not), without what git ignores (.venv, runs, ...).
  if [ "$DRY_RUN" = 1 ]; then
    echo "+ (cd $(quote "$root") && git ls-files -z --cached --others --exclude-standard |" \
         "tar --null -T - -czf $(quote "$tarball"))"
  else
    (cd "$root" && git ls-files -z --cached --others --exclude-standard \
      | tar --null -T - -czf "$tarball")
  fi
  run "${TPU[@]}" scp "$tarball" "$NAME:unclip_jax.tar.gz" "${GCLOUD_WHERE[@]}" --worker=all
  on_all 'set -e; mkdir -p unclip_jax && tar -xzf unclip_jax.tar.gz -C unclip_jax'
  rm -f "$tarball"
}

prepare_vm() {   # a VM that runs the command: created if needed, with the code, installed
  local state=NONE
  if [ "$DRY_RUN" = 1 ]; then
    show "${TPU[@]}" describe "$NAME" "${GCLOUD_WHERE[@]}" '--format=value(state)'
    echo "# (dry run: $NAME taken to be absent)"
  else
    state=$(vm_state)
  fi
  case "$state" in
    READY) echo "# $NAME exists (READY): reusing it" ;;
    NONE) create_vm ;;
    PREEMPTED|TERMINATED|STOPPED|SUSPENDED)
      echo "# $NAME is $state: deleting and creating it again"
      delete_vm
      create_vm ;;
    *) die "$NAME is in state $state; wait until it is READY (or delete it)" ;;
  esac
  put_code
  on_all 'set -e; cd unclip_jax && bash launch/setup.sh --tpu'
}

mkdir -p "$STATE_DIR"
if [ "$DRY_RUN" = 0 ]; then
  printf '%s\n' "${COMMAND[@]}" > "$SAVED"
fi
WORDS=$(for w in "${COMMAND[@]}"; do printf '%s ' "$(quote "$w")"; done)
REMOTE="cd unclip_jax && mkdir -p logs && ${WORDS}--distributed 2>&1"
REMOTE+=" | tee -a \"logs/\$(hostname).log\"; exit \${PIPESTATUS[0]}"
restarts=0
while true; do
  prepare_vm
  status=0
  on_all "$REMOTE" || status=$?
  [ "$DRY_RUN" = 0 ] || exit 0
  state=$(vm_state)
  if [ "$state" = READY ]; then
    if [ "$status" = 0 ]; then
      echo "# the command finished on every worker of $NAME"
    else
      echo "# the command failed (exit status $status); see the workers' logs" >&2
    fi
    exit "$status"
  fi
  if [ "$restarts" -ge "$MAX_RESTARTS" ]; then
    echo "# $NAME is $state (preempted?); 'bash launch/tpu.sh --name=$NAME --zone=$ZONE" \
         "--resume' reruns the command, which resumes from its checkpoints" >&2
    exit 1
  fi
  restarts=$((restarts + 1))
  echo "# $NAME is $state: restart $restarts of $MAX_RESTARTS"
done
