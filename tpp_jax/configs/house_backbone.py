"""Stage 0: MAE pre-training of the house ViT-Ti/8 (6 blocks, 64 px) on 45,000 natural photographs.

  python -m tpp_jax.main --config configs/house_backbone.py --workdir runs/house
  python -m tpp_jax.export_backbone runs/house tpp_jax/assets/house_vit_ti8_64   # fp16 safetensors + card
Args: `:epochs=N` (default 6: what one CPU core did in ~45 min), `:smoke` for a seconds-long check.
"""
import math

from tpp_jax.config import apply_arg, base_config, split_arg
from tpp_jax.configs.presets import PRESETS

TRAIN_IMAGES = 44_000  # 45,000 minus the 1,000 held-out photographs (data.val_count)


def get_config(arg=None):
  c = base_config()
  PRESETS["house"](c)
  PRESETS["natural"](c)
  c.init.path = ""
  c.stage = "pretrain"
  c.peft.type = "none"
  c.pretext.update(type="mae", mask_ratio=0.75, norm_pix_loss=True,
                   decoder_width=128, decoder_depth=1, decoder_heads=4, decoder_mlp_dim=512)
  c.batch_size = 128
  c.optim.update(lr=1.5e-3, weight_decay=0.05, b2=0.95, warmup_steps=200, clip_norm=0.0)
  c.data.augment.update(crop_scale=(0.35, 1.0), hflip=True)
  c.eval_splits = ("val",)
  c.epochs = 6
  c.eval_every = 500
  c.checkpoint_every = 250
  c.keep_checkpoints = 2
  arg_tokens = split_arg(arg or "")
  epochs = [t for t in arg_tokens if t.startswith("epochs=")]
  if epochs:
    c.epochs = int(epochs[0].split("=")[1])
  c.steps = math.ceil(c.epochs * TRAIN_IMAGES / c.batch_size)
  rest = ",".join(t for t in arg_tokens if not t.startswith("epochs="))
  return apply_arg(c, rest, PRESETS)
