"""Stage 0: MAE pre-training of the house ViT-Ti/8 (6 blocks, 64 px) on 45,000 natural photographs.

  python -m tpp_jax.main --config configs/house_backbone.py --workdir runs/house
  python -m tpp_jax.export_backbone runs/house tpp_jax/assets/house_vit_ti8_64   # fp16 safetensors + card
Args: `:epochs=N` (default 6: what one CPU core did in ~45 min; the engine sets steps from the train split's size,
like `--config.epochs=N`), `:epochs=0,steps=N` for a step budget, `:smoke` for a seconds-long check.
"""
from tpp_jax.config import apply_arg, base_config
from tpp_jax.configs.presets import PRESETS


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
  c.epochs = 6  # steps = ceil(epochs x 44,000 train photos / batch_size), computed by the engine from the data
  c.eval_every = 500
  c.checkpoint_every = 250
  c.keep_checkpoints = 2
  return apply_arg(c, arg, PRESETS)
