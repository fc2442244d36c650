#!/usr/bin/env bash
# Run one tpp_jax command on every host of a Cloud TPU VM pod slice (v4-16, v5litepod-32, ...).
#
# Usage (from your workstation / Cloud Shell, with gcloud logged in and the TPU created):
#   TPU_NAME=my-pod ZONE=us-central2-b REPO_URL=https://github.com/YOU/tpp_jax.git \
#   WORKDIR=/mnt/shared/runs/demo bash launch/tpu_pod.sh [setup|run|all]    (default: all)
#
# Required env:
#   TPU_NAME    name of the TPU VM pod slice
#   ZONE        its zone
#   REPO_URL    git URL of tpp_jax (cloned on every host, or pulled when already there)
#   WORKDIR     run folder, the SAME path on every host and shared by all of them (NFS / Filestore, or a
#               gs:// bucket mounted with gcsfuse on every host, e.g. /mnt/my-bucket/runs/demo); tpp_jax
#               writes with local-file APIs, so a bare gs:// URL is not accepted
# Optional env:
#   PROJECT     gcloud project (default: gcloud's current one)
#   CONFIG      config spec (default: configs/default.py); e.g. configs/experiment.py:demo,house,stage=tpp
#   BATCH_SIZE  global batch size for batch_size, eval_batch_size and pipeline.tpp_batch_size (default: the
#               config's); must be a multiple of the global TPU device count (all hosts together)
#   DTYPE       model.dtype (default: bfloat16)
#   EXTRA       more flags, e.g. "--config.fsdp=True --config.seeds=3"
#   REF         git branch / tag / commit to check out (default: the clone's default branch)
#   REPO_DIR    checkout folder on each host (default: ~/tpp_jax)
#   GCS_BUCKET  when set, `setup` mounts gs://$GCS_BUCKET at /mnt/$GCS_BUCKET on every host (needs gcsfuse)
#
# Every host runs the same command: main calls jax.distributed.initialize() (--config.distributed=True),
# which finds the other hosts from the TPU metadata; host 0 writes the logs, all hosts write checkpoints.
# Rerunning `run` with the same WORKDIR resumes.
set -euo pipefail

usage() { sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; }
case "${1:-all}" in
  -h|--help|help) usage; exit 0 ;;
  setup|run|all) STEP=${1:-all} ;;
  *) usage >&2; echo "error: unknown step '$1' (setup | run | all)" >&2; exit 2 ;;
esac

TPU_NAME=${TPU_NAME:?set TPU_NAME to the TPU VM pod slice name (see: bash launch/tpu_pod.sh --help)}
ZONE=${ZONE:?set ZONE to the zone of the TPU, e.g. us-central2-b}
CONFIG=${CONFIG:-configs/default.py}
DTYPE=${DTYPE:-bfloat16}
BATCH_SIZE=${BATCH_SIZE:-}
EXTRA=${EXTRA:-}
REF=${REF:-}
REPO_DIR=${REPO_DIR:-'~/tpp_jax'}   # expanded on the hosts
GCS_BUCKET=${GCS_BUCKET:-}
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project "$PROJECT"); fi

# Run a command string on all workers at once.
on_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all --command "$1"
}

setup() {
  local repo_url=${REPO_URL:?set REPO_URL to the git URL of tpp_jax (cloned on every host)}
  local cmd="set -e; python3 -m pip install -q -U 'jax[tpu]'"
  cmd+="; if [ -d $REPO_DIR/.git ]; then git -C $REPO_DIR fetch -q --all --tags;"
  cmd+=" else git clone -q $(printf '%q' "$repo_url") $REPO_DIR; fi"
  if [[ -n "$REF" ]]; then cmd+="; git -C $REPO_DIR checkout -q $(printf '%q' "$REF")"; fi
  cmd+="; git -C $REPO_DIR pull -q --ff-only 2>/dev/null || true"  # no-op on a tag / commit
  cmd+="; python3 -m pip install -q -e $REPO_DIR"
  if [[ -n "$GCS_BUCKET" ]]; then
    cmd+="; sudo mkdir -p /mnt/$GCS_BUCKET && sudo chown \$USER /mnt/$GCS_BUCKET"
    cmd+="; mountpoint -q /mnt/$GCS_BUCKET || gcsfuse --implicit-dirs $GCS_BUCKET /mnt/$GCS_BUCKET"
  fi
  cmd+="; python3 -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.default_backend())'"
  on_all "$cmd"
}

run() {
  local workdir=${WORKDIR:?set WORKDIR to a run folder shared by all hosts (NFS or a gcsfuse mount), same path on each}
  case "$workdir" in
    gs://*) echo "error: WORKDIR=$workdir: mount the bucket with gcsfuse (GCS_BUCKET=...) and use /mnt/BUCKET/..." >&2
            exit 2 ;;
  esac
  local args=( python3 -m tpp_jax.main --config "$CONFIG" --workdir "$workdir" \
               --config.distributed=True --config.model.dtype="$DTYPE" --config.progress=False )
  if [[ -n "$BATCH_SIZE" ]]; then
    args+=(--config.batch_size="$BATCH_SIZE" --config.eval_batch_size="$BATCH_SIZE"
           --config.pipeline.tpp_batch_size="$BATCH_SIZE")
  fi
  local quoted
  quoted=$(printf '%q ' "${args[@]}")
  # EXTRA is word-split on purpose (several flags); quote values inside it for the remote shell if needed.
  on_all "cd $REPO_DIR && $quoted $EXTRA"
}

case "$STEP" in
  setup) setup ;;
  run) run ;;
  all) setup; run ;;
esac
