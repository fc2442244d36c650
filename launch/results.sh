#!/usr/bin/env bash
# The README's results tables: TPP vs plain PEFT with the house backbone, 5 seeds each (paired t-tests in each
# report.md and in `python launch/results_table.py OUT`), chest X-ray classification and Kvasir-SEG segmentation
# (../shared/data), LoRA and Houlsby adapters, MAE / contrastive / DINO as the TPP pretext.
# Fine-tunes: 300 steps, checkpoint selected by validation AUC / Dice every 50 steps, both reported.
# The first pipeline also runs the controls: a compute-matched baseline (pipeline.compute_matched) and the
# brackets (pipeline.brackets: linear probe, full fine-tune).
# Usage: [SEEDS=5] bash launch/results.sh [OUT=runs/results] [ROW|all]   (rows run in this order; reruns resume)
# A rerun with more SEEDS adds seeds to every finished pipeline (seeds 0..SEEDS-1) and keeps the ones it has.
set -euo pipefail
OUT=${1:-runs/results}
SEEDS=${SEEDS:-5}
run() { python -m tpp_jax.main --config "$1" --workdir "$2" --config.progress=False; }
PN="pneumonia,house,stage=pipeline,seeds=$SEEDS,steps=300,pipeline.tpp_steps=200,batch_size=32,eval_every=50"
PN="$PN,data.augment.hflip=False,best_metric=auc"
KV="kvasir,house,stage=pipeline,seeds=$SEEDS,steps=300,pipeline.tpp_steps=200,batch_size=16,pipeline.tpp_batch_size=32"
KV="$KV,eval_every=50,optim.lr=3e-3,task.seg_decoder_dim=64"
DINO="pretext.type=dino,pretext.local_crops=4,pretext.local_crop_size=32,pretext.teacher_temp_warmup_steps=60"
case "${2:-all}" in
  pneumonia_lora|all)
    run "configs/experiment.py:$PN,pipeline.tpp_steps=300,peft.type=lora,pipeline.compute_matched=True,pipeline.brackets=True" \
        "$OUT/pneumonia_lora" ;;&
  kvasir_lora|all)
    run "configs/experiment.py:$KV,peft.type=lora" "$OUT/kvasir_lora" ;;&
  pneumonia_adapter|all)
    run "configs/experiment.py:$PN,peft.type=adapter" "$OUT/pneumonia_adapter" ;;&
  pneumonia_lora_contrastive|all)
    run "configs/experiment.py:$PN,peft.type=lora,pretext.type=contrastive" "$OUT/pneumonia_lora_contrastive" ;;&
  pneumonia_lora_dino|all)
    run "configs/experiment.py:$PN,peft.type=lora,$DINO" "$OUT/pneumonia_lora_dino" ;;&
  probe|all)
    run "configs/experiment.py:demo,house,stage=linear,steps=300,optim.lr=1e-2" "$OUT/probe_house"
    run "configs/experiment.py:demo,house,stage=linear,steps=300,optim.lr=1e-2,init.path=''" "$OUT/probe_random" ;;
esac
python launch/results_table.py "$OUT"
