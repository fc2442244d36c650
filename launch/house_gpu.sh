#!/usr/bin/env bash
# Stage 0 on one GPU: MAE pre-training of the house ViT-Ti6/8 (configs/house_backbone.py) to the END of its
# cosine schedule, with a multi-process input pipeline (data.workers=auto), then the backbone export.
#
#   bash launch/house_gpu.sh OUT_DIR [EPOCHS=100] [DATA=.gpu_data/natural_train_plus_heldout.npz]
#
# DATA is a jpeg_npz file whose LAST 1,000 images are held out (data.val_count). Where ../shared does not
# travel (a lent device machine takes 64 MiB in all), carry a subset in the ignored folder .gpu_data/; the
# shipped backbone used the first 29,000 photographs + the usual held-out 44,000-44,999:
#   python -c "import numpy as np; d=np.load('../shared/data/pretrain_natural_64/images_jpeg.npz'); b,o=d['jpeg_bytes'],d['offsets']
#   i=[*range(29000),*range(44000,45000)]; p=[b[o[k]:o[k+1]] for k in i]
#   np.savez_compressed('.gpu_data/natural_train_plus_heldout.npz', jpeg_bytes=np.concatenate(p), offsets=np.cumsum([0]+[len(x) for x in p]))"
# The run's workdir is
# $WORKDIR (default /tmp/house_gpu; rerunning resumes it). Writes OUT_DIR/house_vit_ti8_64/ (fp16
# safetensors, eval.json, reconstructions.png), the run's metrics.jsonl and config.json, and
# gpu_util.csv (nvidia-smi samples, 1 s) when nvidia-smi exists. A guard stops training at
# $TRAIN_SECONDS (default 420) so the export of the last checkpoint still happens on a lent machine.
set -uo pipefail
OUT=${1:?usage: bash launch/house_gpu.sh OUT_DIR [EPOCHS] [DATA]}
EPOCHS=${2:-100}
DATA=${3:-.gpu_data/natural_train_plus_heldout.npz}
WORKDIR=${WORKDIR:-/tmp/house_gpu}
TRAIN_SECONDS=${TRAIN_SECONDS:-420}
BATCH=${BATCH:-256}
PY=${PYTHON:-python3}
mkdir -p "$OUT"

N=$($PY -c "import numpy as np; print(len(np.load('$DATA')['offsets']) - 1)") || exit 1
TRAIN=$((N - 1000))
STEPS=$($PY -c "import math; print(math.ceil($EPOCHS * $TRAIN / $BATCH))")
WARMUP=$($PY -c "print(round(5 * $TRAIN / $BATCH))")   # 5 epochs of linear warm-up (MAE recipe)
EVAL_EVERY=$(( (STEPS + 9) / 10 ))
echo "house_gpu: $N images ($TRAIN train, 1000 held out), $EPOCHS epochs = $STEPS steps of $BATCH, warm-up $WARMUP"

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -l 1 \
    > "$OUT/gpu_util.csv" 2>/dev/null &
  SMI=$!
fi

start=$(date +%s)
timeout --signal=KILL "$TRAIN_SECONDS" $PY -m tpp_jax.main --config configs/house_backbone.py --workdir "$WORKDIR" \
  --config.data.path="$DATA" --config.data.val_count=1000 --config.data.workers="${WORKERS:-auto}" \
  --config.batch_size="$BATCH" --config.eval_batch_size=200 --config.epochs="$EPOCHS" \
  --config.optim.warmup_steps="$WARMUP" --config.eval_every="$EVAL_EVERY" \
  --config.checkpoint_every="$EVAL_EVERY" --config.keep_checkpoints=1 --config.log_every=100 \
  --config.data.augment.on_device="${ON_DEVICE:-False}" \
  --config.progress=False 2>&1 | grep -v "^WARNING\|absl" | tail -40
echo "house_gpu: training exited after $(( $(date +%s) - start )) s"
[ -n "${SMI:-}" ] && kill "$SMI" 2>/dev/null
cp "$WORKDIR/metrics.jsonl" "$WORKDIR/config.json" "$OUT/" 2>/dev/null
[ -f "$WORKDIR/summary.json" ] && cp "$WORKDIR/summary.json" "$OUT/"
$PY -m tpp_jax.export_backbone "$WORKDIR" "$OUT/house_vit_ti8_64" 2>&1 | grep -v "^WARNING" | tail -30
