"""Any stage on any data: `--config configs/experiment.py:PRESETS,key=value,...`.

Examples
  TPP (MAE on LoRA) on chest X-rays:   configs/experiment.py:pneumonia,house,stage=tpp
  Fine-tune from it:                   configs/experiment.py:pneumonia,house --config.target_init=RUN
  Plain-PEFT baseline (DoRA):          configs/experiment.py:pneumonia,house,peft.type=dora
  DINO instead of MAE:                 configs/experiment.py:pneumonia,house,stage=tpp,pretext.type=dino
  Kvasir-SEG segmentation:             configs/experiment.py:kvasir,house
  Linear probe / full fine-tune:       configs/experiment.py:pneumonia,house,stage=linear (or stage=full)
Presets: see configs/presets.py (demo, pneumonia, kvasir, natural, house, smoke, px32/64/128).
"""
from tpp_jax.config import apply_arg, base_config
from tpp_jax.configs.presets import PRESETS


def get_config(arg=None):
  c = base_config()
  PRESETS["house"](c)
  PRESETS["demo"](c)
  return apply_arg(c, arg, PRESETS)
