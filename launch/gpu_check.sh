#!/usr/bin/env bash
# The prepared script for a lent GPU machine (issue 13's GPU goals), in one call, writing at most 6 files under OUT:
#   env.txt         GPU, driver, jax / torch versions
#   step_speed.txt  benchmarks/step_speed.py --full: ViT-B/16, 224 px, batch 256, bf16; tpp_jax vs transformers+peft
#                   (eager and torch.compile) for the LoRA fine-tune step and the TPP MAE+LoRA step, MFU vs the peak
#   profile.txt     benchmarks/step_profile.py --full for both steps: GPU time by group and the top kernels (XLA's
#                   command buffers off, so that each kernel names its XLA op)
#   variants.txt    the tpp_jax fine-tune row with model.attention=xla and =cudnn (what 'auto' chose, side by side)
#   stage0.txt, gpu_util.csv, metrics.jsonl
#                   stage-0 house pre-training for STAGE0_SECONDS (launch/house_gpu.sh, data.workers=auto, crop / flip /
#                   normalisation in the train step: ON_DEVICE=True) with nvidia-smi sampling: is the GPU busy > 80 %?
#                   Only when the jpeg_npz DATA file is present.
#   PARTS="speed profile variants stage0" (the default) picks the parts and their order (profile_finetune and
#   profile_tpp: one row's profile); SPEED_ARGS adds step_speed.py flags.
#
#   bash launch/gpu_check.sh OUT [DATA=.gpu_data/natural_train_plus_heldout.npz]
# Wheels the machine lacks (grain, ml-collections, tensorboardX, this project's flax / optax / orbax pins):
# `bash ../shared/tools/device_wheels.sh` here puts them in .whl/ (carry it); they are installed from there.
set -uo pipefail
OUT=${1:?usage: bash launch/gpu_check.sh OUT [DATA]}
DATA=${2:-.gpu_data/natural_train_plus_heldout.npz}
PARTS=${PARTS:-speed profile variants stage0}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tail -2
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
start=$(date +%s)
elapsed() { echo "[gpu_check] $1 at +$(( $(date +%s) - start )) s"; }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import jax, flax, optax, torch, transformers, peft; print('jax', jax.__version__, jax.devices(), '| flax',
flax.__version__, '| optax', optax.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__,
'| peft', peft.__version__)"
  nproc
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

run_part() {
  case "$1" in
    speed)
      timeout "${SPEED_SECONDS:-240}" $PY benchmarks/step_speed.py --full --steps 10 --repeats 3 ${SPEED_ARGS:-} 2>&1 \
        | grep -v "^WARNING\|^W[0-9]\{4\}\|^I[0-9]\{4\}" | tee "$OUT/step_speed.txt" ;;
    profile|profile_finetune|profile_tpp)
      local rows="finetune tpp"; [ "$1" != profile ] && rows=${1#profile_}
      for row in $rows; do
        XLA_FLAGS="--xla_gpu_enable_command_buffer= ${XLA_FLAGS:-}" \
          timeout "${PROFILE_SECONDS:-90}" $PY benchmarks/step_profile.py --full --row "$row" --steps 5 --top 40 2>&1 \
          | grep -v "^WARNING\|^W[0-9]\{4\}\|^I[0-9]\{4\}" | tee -a "$OUT/profile.txt"
      done ;;
    variants)
      for att in xla cudnn; do
        timeout "${VARIANT_SECONDS:-60}" $PY benchmarks/step_speed.py --full --only finetune --no-torch \
          --attention "$att" --steps 10 --repeats 3 2>&1 | grep "^| LoRA\|rror\|attention" | tee -a "$OUT/variants.txt"
      done ;;
    stage0)
      [ -f "$DATA" ] || { echo "stage0: no $DATA"; return; }
      ON_DEVICE=${ON_DEVICE:-True} WORKDIR=/tmp/gpu_check_stage0 TRAIN_SECONDS=${STAGE0_SECONDS:-120} \
        bash launch/house_gpu.sh /tmp/gpu_check_stage0_out 100 "$DATA" 2>&1 | tee "$OUT/stage0.txt"
      cp /tmp/gpu_check_stage0_out/gpu_util.csv /tmp/gpu_check_stage0_out/metrics.jsonl "$OUT/" 2>/dev/null
      $PY - "$OUT/gpu_util.csv" <<'PYEOF' | tee -a "$OUT/stage0.txt"
import sys
u = [float(l.split(",")[1]) for l in open(sys.argv[1]) if l.count(",") >= 2]
first = next((i for i, x in enumerate(u) if x >= 20), len(u))  # training starts: start-up and compilation before
busy = sorted(x for x in u[first:] if x > 0)  # 0 %: evaluations and checkpoints
med = busy[len(busy) // 2] if busy else float("nan")
print(f"stage 0: GPU utilisation median {med:.0f} % over the {len(busy)} busy one-second samples from the first "
      f"above 20 % (at {first} s; {len(u) - first - len(busy)} idle samples after it, evaluations and checkpoints) "
      "(goal > 80 %)")
PYEOF
      ;;
    *) echo "gpu_check: unknown part $1 (speed, profile, profile_finetune, profile_tpp, variants, stage0)" ;;
  esac
}
for part in $PARTS; do
  elapsed "$part"
  run_part "$part"
done
elapsed "done"
