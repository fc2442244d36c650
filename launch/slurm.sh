#!/usr/bin/env bash
#SBATCH --job-name=tpp_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%x-%j.out
#
# Multi-node GPU run of tpp_jax: one task (one JAX process) per node, each driving all GPUs of its node.
#
# Usage, from the repository root (on a filesystem all nodes see):
#   sbatch launch/slurm.sh [CONFIG] [WORKDIR] [--config.x=V ...]
#   sbatch --nodes=4 launch/slurm.sh configs/experiment.py:demo,house,stage=tpp runs/tpp_4n --config.seeds=3
# Defaults: CONFIG=configs/default.py, WORKDIR=runs/slurm_demo (resubmitting with the same WORKDIR resumes).
# Env: VENV (default .venv; activated when present; JAX for CUDA: pip install -U "jax[cuda12]" -e .),
#      XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.90), DTYPE (model.dtype, default bfloat16).
#
# main calls jax.distributed.initialize() (--config.distributed=True), which reads SLURM_* (coordinator =
# first node, process id = SLURM_PROCID). With one task per node JAX would otherwise keep only GPU
# SLURM_LOCALID (=0) per process, so JAX_LOCAL_DEVICE_IDS lists all GPUs of the node.
# batch_size / eval_batch_size / pipeline.tpp_batch_size must be multiples of nodes x GPUs per node.
set -euo pipefail

CONFIG=${1:-configs/default.py}
WORKDIR=${2:-runs/slurm_demo}
shift $(( $# < 2 ? $# : 2 ))
EXTRA=("$@")

cd "${SLURM_SUBMIT_DIR:-.}"
VENV=${VENV:-.venv}
if [[ -f "$VENV/bin/activate" ]]; then . "$VENV/bin/activate"; fi

export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-8}}
gpus=${gpus##*:}  # "a100:8" -> 8
JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))
export JAX_LOCAL_DEVICE_IDS

echo "tpp_jax: ${SLURM_JOB_NUM_NODES:-1} node(s) x $gpus GPU(s); config=$CONFIG workdir=$WORKDIR"
srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
  python -m tpp_jax.main --config "$CONFIG" --workdir "$WORKDIR" \
  --config.distributed=True --config.model.dtype="${DTYPE:-bfloat16}" --config.progress=False "${EXTRA[@]}"
