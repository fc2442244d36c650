"""The embedded demo: TPP vs plain LoRA on real chest X-rays with the house MAE backbone.

  python -m tpp_jax.main --config configs/default.py --workdir runs/demo          (~5-10 min, 2 CPU cores)
  python -m tpp_jax.main --config configs/default.py:smoke --workdir runs/smoke   (same path, < 2 min)

Stage `pipeline`: TPP (MAE on the LoRA target parameters, backbone frozen) -> fine-tune from TPP, and the
fine-tune baseline from random LoRA init, same seed, steps and evaluation; then runs/demo/report.md.
Data: tpp_jax/assets/demo_cxr_64 (CC BY 4.0). Backbone: tpp_jax/assets/house_vit_ti8_64.
Arguments: `:seeds=3`, `:peft.type=dora`, `:pretext.type=dino`, ... (any key=value, comma separated).
"""
from tpp_jax.config import apply_arg, base_config
from tpp_jax.configs.presets import PRESETS


def smoke(c):
  """Same code path (house backbone, all three arms, report), a handful of steps."""
  c.steps = 4
  c.pipeline.update(tpp_steps=4)
  c.update(batch_size=16, eval_batch_size=32, log_every=2, checkpoint_every=0, eval_every=2)
  c.data.update(max_train_examples=128, max_eval_examples=64)
  c.progress = False


def get_config(arg=None):
  c = base_config()
  PRESETS["house"](c)
  PRESETS["demo"](c)
  c.stage = "pipeline"
  c.seed = 0
  c.peft.update(type="lora", rank=8, alpha=8.0, targets="q,v")
  c.pretext.update(type="mae", mask_ratio=0.75, norm_pix_loss=True)  # decoder: the house backbone's
  c.data.augment.update(crop_scale=(0.8, 1.0), hflip=False)  # chest X-rays: keep left/right
  c.pipeline.update(tpp_steps=300, tpp_lr=1e-3, tpp_batch_size=64)
  c.steps = 200
  c.batch_size = 32
  c.eval_batch_size = 128
  c.optim.update(lr=2e-3, warmup_steps=20, weight_decay=0.01)
  c.eval_every = 50
  c.checkpoint_every = 100
  c.log_every = 10
  c.best_metric = "auc"
  return apply_arg(c, arg, {**PRESETS, "smoke": smoke})
