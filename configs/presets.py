"""Named presets shared by the config files (data sets, model sizes, run lengths).

Paths: tpp_jax/assets (shipped with the package: the demo data, the house backbone) and ../shared/data
beside the repository checkout (development data; elsewhere pass --config.data.path=...).
"""
from __future__ import annotations

import pathlib

import tpp_jax

PACKAGE = pathlib.Path(tpp_jax.__file__).resolve().parent  # tpp_jax/
ROOT = PACKAGE.parent  # the checkout (site-packages when installed)
SHARED = ROOT.parent / "shared" / "data"
ASSETS = PACKAGE / "assets"
HOUSE_BACKBONE = ASSETS / "house_vit_ti8_64" / "house_vit_ti8_64.safetensors"
DEMO_DATA = ASSETS / "demo_cxr_64" / "demo_cxr_64.npz"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def house_model(c):
  """ViT-Ti/8 with 6 blocks at 64 px, as pre-trained by configs/house_backbone.py (MAE, natural photos)."""
  c.model.update(variant="Ti6/8", image_size=64, channels=3, pooling="gap", pos_emb="sincos")
  c.data.update(image_size=64, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD)
  c.init.update(path=str(HOUSE_BACKBONE), format="auto")
  c.pretext.update(decoder_width=128, decoder_depth=1, decoder_heads=4, decoder_mlp_dim=512)  # its MAE decoder


def demo(c):
  """The embedded chest X-ray demo set (tpp_jax/assets/demo_cxr_64, CC BY 4.0)."""
  c.data.update(source="npz", path=str(DEMO_DATA))
  c.task.update(type="classification", num_classes=2)


def pneumonia(c):
  c.data.update(source="npz", path=str(SHARED / "pneumonia_cxr_128" / "pneumonia_cxr_128.npz"))
  c.task.update(type="classification", num_classes=2)


def kvasir(c):
  c.data.update(source="seg_folder", path=str(SHARED / "kvasir_seg_256"))
  c.task.update(type="segmentation", num_classes=2)
  c.best_metric = "dice"


def natural(c):
  c.data.update(source="jpeg_npz", path=str(SHARED / "pretrain_natural_64" / "images_jpeg.npz"), val_count=1000)


def smoke(c):
  """Tiny and short: the same code path in seconds (used by the tests)."""
  c.model.update(variant="Mu/8", depth=2)
  c.init.path = ""
  c.update(steps=6, epochs=0, batch_size=16, eval_batch_size=32, log_every=2, eval_every=0, checkpoint_every=3)
  c.pretext.update(decoder_width=32, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=64,
                   dino_out_dim=64, dino_hidden_dim=32, dino_bottleneck_dim=16)
  c.task.seg_decoder_dim = 16
  c.data.update(max_train_examples=256, max_eval_examples=64)
  c.pipeline.update(tpp_steps=6)
  c.data.val_count = 64
  c.progress = False


def size(n):
  def apply(c):
    c.model.image_size = c.data.image_size = n
  return apply


PRESETS = {"demo": demo, "pneumonia": pneumonia, "kvasir": kvasir, "natural": natural, "smoke": smoke,
           "house": house_model, "px32": size(32), "px64": size(64), "px128": size(128)}
