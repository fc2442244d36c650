#!/usr/bin/env bash
# The prepared script for a lent GPU machine (issue 13's GPU goals), in one call, writing everything under OUT:
#   1. benchmarks/step_speed.py --full: ViT-B/16, 224 px, batch 256, bf16; tpp_jax vs transformers+peft (eager and
#      torch.compile) for the LoRA fine-tune step and the TPP MAE+LoRA step, MFU vs the detected peak -> step_speed.txt
#   2. benchmarks/step_profile.py is CPU-only; on GPU the same step under XProf: not run here.
#   3. stage-0 house pre-training for STAGE0_SECONDS with nvidia-smi sampling (launch/house_gpu.sh) -> OUT/stage0/
#      (gpu_util.csv: is the GPU busy > 80 %?), only when the jpeg_npz DATA file is present; crop / flip /
#      normalisation in the train step (data.augment.on_device; ON_DEVICE=False: on the host, as before).
#
#   bash launch/gpu_check.sh OUT [DATA=.gpu_data/natural_train_plus_heldout.npz]
# Wheels the machine lacks (grain, ml-collections, tensorboardX): `bash ../shared/tools/device_wheels.sh` here puts
# them in .whl/ (carry it); this script installs them from there when the folder exists.
set -uo pipefail
OUT=${1:?usage: bash launch/gpu_check.sh OUT [DATA]}
DATA=${2:-.gpu_data/natural_train_plus_heldout.npz}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
[ -d .whl ] && $PY -m pip install -q --no-index --find-links .whl grain ml-collections tensorboardX 2>&1 | tail -2
$PY -m pip install -q --no-deps -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
timeout 300 $PY benchmarks/step_speed.py --full --steps 10 --repeats 3 2>&1 | grep -v "^WARNING" | tee "$OUT/step_speed.txt"
if [ -f "$DATA" ]; then
  ON_DEVICE=${ON_DEVICE:-True} WORKDIR=/tmp/gpu_check_stage0 TRAIN_SECONDS=${STAGE0_SECONDS:-150} \
    bash launch/house_gpu.sh "$OUT/stage0" 100 "$DATA"
  $PY - "$OUT/stage0/gpu_util.csv" <<'PYEOF'
import sys
u = [float(l.split(",")[1]) for l in open(sys.argv[1]) if l.count(",") >= 2]
busy = sorted(u)[len(u) // 2] if u else float("nan")
print(f"stage 0: GPU utilisation median {busy:.0f} % over {len(u)} one-second samples (goal > 80 %)")
PYEOF
fi
