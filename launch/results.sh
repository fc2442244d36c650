#!/usr/bin/env bash
# The README's results table: TPP vs plain PEFT with the house backbone, 5 seeds (each report.md has the paired
# t-test over them), two PEFT methods (LoRA, Houlsby adapters), chest X-ray classification and Kvasir-SEG
# segmentation (../shared/data), plus the linear probes.
# Pretext: MAE with the house backbone's own decoder; DINO too for pneumonia + LoRA.
# Usage: bash launch/results.sh [OUT=runs/results]   (each line can run on its own; reruns resume)
set -euo pipefail
OUT=${1:-runs/results}
run() { python -m tpp_jax.main --config "$1" --workdir "$2" --config.progress=False; }
PN="pneumonia,house,stage=pipeline,seeds=5,steps=150,pipeline.tpp_steps=200,batch_size=32,data.augment.hflip=False,best_metric=auc"
KV="kvasir,house,stage=pipeline,seeds=5,steps=150,pipeline.tpp_steps=200,batch_size=16,pipeline.tpp_batch_size=32,optim.lr=3e-3,task.seg_decoder_dim=64"
case "${2:-all}" in
  pneumonia|all)
    run "configs/experiment.py:$PN,peft.type=lora" "$OUT/pneumonia_lora"
    run "configs/experiment.py:$PN,peft.type=adapter" "$OUT/pneumonia_adapter"
    run "configs/experiment.py:$PN,peft.type=lora,pretext.type=dino" "$OUT/pneumonia_lora_dino" ;;&
  kvasir|all)
    run "configs/experiment.py:$KV,peft.type=lora" "$OUT/kvasir_lora"
    run "configs/experiment.py:$KV,peft.type=adapter" "$OUT/kvasir_adapter" ;;&
  probe|all)
    run "configs/experiment.py:demo,house,stage=linear,steps=300,optim.lr=1e-2" "$OUT/probe_house"
    run "configs/experiment.py:demo,house,stage=linear,steps=300,optim.lr=1e-2,init.path=''" "$OUT/probe_random" ;;
esac
