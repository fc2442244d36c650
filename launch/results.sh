#!/usr/bin/env bash
# The README's results tables: TPP vs plain PEFT with the house backbone, 5 seeds each (paired t-tests in each
# report.md and in `python launch/results_table.py OUT`), chest X-ray classification and Kvasir-SEG segmentation
# (../shared/data), LoRA and Houlsby adapters, MAE / contrastive / DINO as the TPP pretext.
# Fine-tunes: 200 steps at lr 6e-3 (chest X-rays; the lr chosen on seed 0's validation AUC among 1e-3, 3e-3, 6e-3 with
# 300 steps, where the validation AUC levelled off by step 150-200: README "Fixed budgets"), checkpoint selected by
# validation AUC / Dice every 50 steps, both reported. TPP: 200 steps (batch 64; DINO / contrastive, which encode
# 6 / 2 views of each image: batch 32). The LoRA MAE pipeline also runs the controls: a compute-matched baseline
# (pipeline.compute_matched: 200 + 200 steps) and the brackets (pipeline.brackets: linear probe, full fine-tune at
# pipeline.full_lr=1e-3); the `fractions` row then adds its two fine-tune arms on 5 % of the training labels
# (pipeline.label_fractions). The DINO and contrastive pipelines share its control arms (pipeline.controls_from:
# links, checked equal, not trained again).
# Usage: [SEEDS=5] [LANES=2] bash launch/results.sh [OUT=runs/results] [ROW|all]   (reruns resume)
# A rerun with more SEEDS adds seeds to every finished pipeline (seeds 0..SEEDS-1) and keeps the ones it has.
# LANES=2 (the default where there are >= 2 cores) runs the rows in two lanes at once, each pinned to half of the
# cores with taskset (lane logs: OUT/lane_0.log, OUT/lane_1.log): XLA:CPU keeps 2 cores only ~65 % busy on these
# small steps, and two single-core runs train 1.26x the images/s of one 2-core run. LANES=1: one row after another.
# Lane 1 runs the rows that share pneumonia_lora's controls last: a shared arm lane 0 has not trained yet is waited for.
# Every arm of a row compiles the same train / eval steps: JAX's persistent compilation cache (default OUT/.xla_cache,
# or your JAX_COMPILATION_CACHE_DIR) compiles each once (an arm's start-up on this CPU: 31 -> 20 s).
# DRY_RUN=1 prints each lane's commands instead of running them.
set -euo pipefail
OUT=${1:-runs/results}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$OUT/.xla_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}
ROW=${2:-all}
SEEDS=${SEEDS:-5}
CORES=$(nproc)
LANES=${LANES:-$(( CORES >= 2 ? 2 : 1 ))}
PIN=""
run() {
  local cmd=(python -m tpp_jax.main --config "$1" --workdir "$2" --config.progress=False)
  if [ "${DRY_RUN:-0}" = 1 ]; then echo "${PIN:+$PIN }${cmd[*]}"; else $PIN "${cmd[@]}"; fi
}
PN="pneumonia,house,stage=pipeline,seeds=$SEEDS,steps=200,pipeline.tpp_steps=200,batch_size=32,eval_every=50"
PN="$PN,data.augment.hflip=False,best_metric=auc,optim.lr=6e-3"
KV="kvasir,house,stage=pipeline,seeds=$SEEDS,steps=300,pipeline.tpp_steps=200,batch_size=16,pipeline.tpp_batch_size=32"
KV="$KV,eval_every=50,optim.lr=3e-3,task.seg_decoder_dim=64"
DINO="pretext.type=dino,pretext.local_crops=4,pretext.local_crop_size=32,pretext.teacher_temp_warmup_steps=60"
SHARED="pipeline.tpp_batch_size=32,pipeline.compute_matched=True,pipeline.controls_from=$OUT/pneumonia_lora"
row() {
  case "$1" in
    pneumonia_lora)
      run "configs/experiment.py:$PN,peft.type=lora,pipeline.compute_matched=True,pipeline.brackets=True,pipeline.full_lr=1e-3" \
          "$OUT/pneumonia_lora" ;;
    kvasir_lora)
      run "configs/experiment.py:$KV,peft.type=lora" "$OUT/kvasir_lora" ;;
    pneumonia_adapter)
      run "configs/experiment.py:$PN,peft.type=adapter" "$OUT/pneumonia_adapter" ;;
    pneumonia_lora_contrastive)
      run "configs/experiment.py:$PN,peft.type=lora,pretext.type=contrastive,$SHARED" "$OUT/pneumonia_lora_contrastive" ;;
    pneumonia_lora_dino)
      run "configs/experiment.py:$PN,peft.type=lora,$DINO,$SHARED" "$OUT/pneumonia_lora_dino" ;;
    fractions)  # pneumonia_lora again, + its fine-tune arms on 5 % of the training labels (its TPP arms; no matched
      # arm, no brackets at 5 %): a rerun of the same workdir, right after pneumonia_lora in lane 0
      run "configs/experiment.py:$PN,peft.type=lora,pipeline.full_lr=1e-3,pipeline.label_fractions=(0.05,1.0)" \
          "$OUT/pneumonia_lora" ;;
    probe)
      run "configs/experiment.py:demo,house,stage=linear,steps=300,optim.lr=1e-2" "$OUT/probe_house"
      run "configs/experiment.py:demo,house,stage=linear,steps=300,optim.lr=1e-2,init.path=''" "$OUT/probe_random" ;;
    *) echo "unknown row '$1' (rows: ${LANE_ROWS[*]})" >&2; exit 2 ;;
  esac
}
# two lanes of about the same length (core-minutes with 5 seeds, estimated from the 300-step run: the LoRA MAE row
# with its controls ~45, its 5 % label arms ~14, Kvasir ~19 | adapter ~20, DINO ~29, contrastive ~19, probe ~2);
# the rows sharing pneumonia_lora's controls come after the adapter row in lane 1 (a shared arm lane 0 has not
# trained yet is waited for)
LANE_ROWS=("pneumonia_lora fractions kvasir_lora" "pneumonia_adapter pneumonia_lora_dino pneumonia_lora_contrastive probe")
lane() {  # lane I: its rows in order, pinned to its share of the cores
  if [ "$LANES" -gt 1 ] && command -v taskset > /dev/null; then
    local per=$(( CORES / 2 ))
    PIN="taskset -c $(( $1 * per ))-$(( $1 * per + per - 1 ))"
  fi
  for r in ${LANE_ROWS[$1]}; do row "$r"; done
}
mkdir -p "$OUT"
if [ "$ROW" != all ]; then
  row "$ROW"
elif [ "$LANES" -le 1 ]; then
  lane 0; lane 1
elif [ "${DRY_RUN:-0}" = 1 ]; then
  for i in 0 1; do echo "lane $i:"; lane "$i"; done
else
  pids=()
  for i in 0 1; do
    lane "$i" > "$OUT/lane_$i.log" 2>&1 &
    pids+=($!)
  done
  failed=0
  for i in 0 1; do wait "${pids[$i]}" || { failed=1; echo "lane $i failed: see $OUT/lane_$i.log" >&2; }; done
  [ "$failed" = 0 ] || exit 1
fi
[ "${DRY_RUN:-0}" = 1 ] || python launch/results_table.py "$OUT"
