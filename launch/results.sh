#!/usr/bin/env bash
# docs/results.md's study: where TPP helps, at converged budgets (issue 32). The house backbone (LoRA r=8 on q,v,
# MAE pretext), 5 seeds, chest X-ray pneumonia (AUC) and Kvasir-SEG polyps (Dice) from ../shared/data:
#   *_lora      TPP 200 steps (pretext head trained) -> fine-tune, the baseline, the compute-matched baseline
#               (TPP's 200 steps + the TPP fine-tune's own)
#   *_fractions the *_lora workdir again with pipeline.label_fractions: its TPP arms reused, both fine-tune arms again
#               on a stratified 5 % of the training labels (Kvasir: 10 %, 28 images; 5 % is 14, under one batch of
#               16), no compute-matched arm there
#   *_frozen    the same TPP with the pretext head (the backbone's MAE decoder) frozen: only LoRA trains
#   *_tpp1000   TPP 1,000 steps (head trained)
# The *_frozen and *_tpp1000 rows share their row's baseline (pipeline.controls_from: linked, checked equal).
# Every labelled arm stops at convergence (pipeline.budget=converged): validation every 50 steps, stop after
# pipeline.patience=2 evaluations without a new best, `steps` (300, cosine to zero there) is the cap; the checkpoint
# with the best validation metric is kept and evaluated beside the final one. Tables: `python launch/results_table.py
# OUT` (Holm-adjusted p).
# Usage: [SEEDS=5] [LANES=2] bash launch/results.sh [OUT=runs/results] [ROW|all]   (reruns resume)
# SEEDS="3 5" runs every row with seeds 0-2 first, then adds seeds 3-4 to each (a study cut short has every
# comparison at n=3 rather than some rows at n=5 and others missing).
# LANES=2 (the default where there are >= 2 cores) runs the X-ray rows and the Kvasir rows in two lanes at once,
# each pinned to half of the cores with taskset (logs: OUT/lane_0.log, OUT/lane_1.log); LANES=1: one after another.
# Every arm compiles the same steps: JAX's persistent compilation cache (default OUT/.xla_cache) compiles each once.
# EXTRA=",k=v,..." is appended to every config (a quick check of the script: EXTRA=",data.max_train_examples=256,...").
# DRY_RUN=1 prints each lane's commands instead of running them.
set -euo pipefail
OUT=${1:-runs/results}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$OUT/.xla_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}
ROW=${2:-all}
SEEDS=${SEEDS:-5}
SEED_PASSES=($SEEDS)
CORES=$(nproc)
LANES=${LANES:-$(( CORES >= 2 ? 2 : 1 ))}
EXTRA=${EXTRA:-}
PIN=""
run() {
  local cmd=(python -m tpp_jax.main --config "$1,seeds=$N$EXTRA" --workdir "$2" --config.progress=False)
  if [ "${DRY_RUN:-0}" = 1 ]; then echo "${PIN:+$PIN }${cmd[*]}"; else $PIN "${cmd[@]}"; fi
}
STUDY="house,stage=pipeline,peft.type=lora,pipeline.budget=converged,pipeline.patience=2,eval_every=50"
PN="pneumonia,$STUDY,steps=300,batch_size=32,data.augment.hflip=False,best_metric=auc,optim.lr=6e-3"
KV="kvasir,$STUDY,steps=300,batch_size=16,pipeline.tpp_batch_size=32,optim.lr=3e-3,task.seg_decoder_dim=64"
MAIN="pipeline.tpp_steps=200,pipeline.compute_matched=True"
FRACTIONS="pipeline.tpp_steps=200,pipeline.label_fractions"
FROZEN="pipeline.tpp_steps=200,pretext.head=frozen"
LONG="pipeline.tpp_steps=1000"
row() {
  case "$1" in
    pn_lora) run "configs/experiment.py:$PN,$MAIN" "$OUT/$1" ;;
    pn_fractions) run "configs/experiment.py:$PN,$FRACTIONS=(0.05,1.0)" "$OUT/pn_lora" ;;
    pn_frozen) run "configs/experiment.py:$PN,$FROZEN,pipeline.controls_from=$OUT/pn_lora" "$OUT/$1" ;;
    pn_tpp1000) run "configs/experiment.py:$PN,$LONG,pipeline.controls_from=$OUT/pn_lora" "$OUT/$1" ;;
    kv_lora) run "configs/experiment.py:$KV,$MAIN" "$OUT/$1" ;;
    kv_fractions) run "configs/experiment.py:$KV,$FRACTIONS=(0.1,1.0)" "$OUT/kv_lora" ;;
    kv_frozen) run "configs/experiment.py:$KV,$FROZEN,pipeline.controls_from=$OUT/kv_lora" "$OUT/$1" ;;
    kv_tpp1000) run "configs/experiment.py:$KV,$LONG,pipeline.controls_from=$OUT/kv_lora" "$OUT/$1" ;;
    *) echo "unknown row '$1' (rows: ${LANE_ROWS[*]})" >&2; exit 2 ;;
  esac
}
LANE_ROWS=("pn_lora pn_fractions pn_frozen pn_tpp1000" "kv_lora kv_fractions kv_frozen kv_tpp1000")
lane() {  # lane I: its rows in order, pinned to its share of the cores
  if [ "$LANES" -gt 1 ] && command -v taskset > /dev/null; then
    local per=$(( CORES / 2 ))
    PIN="taskset -c $(( $1 * per ))-$(( $1 * per + per - 1 ))"
  fi
  for N in "${SEED_PASSES[@]}"; do
    for r in ${LANE_ROWS[$1]}; do row "$r"; done
  done
}
mkdir -p "$OUT"
if [ "$ROW" != all ]; then
  for N in "${SEED_PASSES[@]}"; do row "$ROW"; done
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
