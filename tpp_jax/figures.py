"""Figures drawn from a model and its data: MAE reconstructions and segmentation overlays, for the pipeline's
report (PNG files) and for TensorBoard at eval time (images handed to the logger)."""
from __future__ import annotations

import dataclasses
import pathlib
import weakref

import jax
import numpy as np

from tpp_jax import build as build_lib
from tpp_jax import stages


def readable_png(path) -> bool:
  """Whether `path` is a whole PNG (a file torn by a kill, or empty, is not)."""
  from PIL import Image
  try:
    with Image.open(path) as im:
      im.load()
    return True
  except (OSError, SyntaxError, ValueError):
    return False


def pipeline_figure_files(config) -> list[str]:
  """The pipeline's own figures for this config (besides the report's learning curves)."""
  return ((["mae_reconstructions.png"] if config.pretext.type == "mae" else [])
          + (["segmentation_overlays.png"] if config.task.type == "segmentation" else []))


@dataclasses.dataclass(eq=False)
class SavedArm:
  """What render_figure reads of a trainer, restored from an arm's final checkpoint (no training, no upstream file)."""
  config: object
  encoder: object
  objective: object
  sources: dict
  eval_fn: object
  state: dict


def saved_arm(run_dir: pathlib.Path) -> SavedArm:
  from tpp_jax.checkpoints import restore
  from tpp_jax.data import transforms
  run = restore.load_run(run_dir, "latest")
  return SavedArm(config=run.config, encoder=run.encoder, objective=run.objective,
                  sources=build_lib.build_sources(run.config),
                  eval_fn=transforms.make_transform(run.config.data, train=False),
                  state={"params": run.params, "aux": run.aux})


def draw_pipeline_figures(config, wd: pathlib.Path, seed: int, fraction: float, n: int = 6):
  """A pipeline's figures: MAE reconstructions of validation images (TPP arm) and segmentation overlays (fine-tune
  arm of the labelled `fraction`) of one seed."""
  if config.pretext.type == "mae":
    t = saved_arm(wd / f"seed_{seed}" / "tpp")
    render_figure(t, "mae_reconstructions", wd / "mae_reconstructions.png", "val" if "val" in t.sources else "train",
                  n)
  if config.task.type == "segmentation":
    t = saved_arm(wd / f"seed_{seed}" / stages.fraction_dir(fraction) / "tpp_finetune")
    render_figure(t, "segmentation_overlays", wd / "segmentation_overlays.png",
                  next(s for s in ("test", "val", "train") if s in t.sources), n)


def figure_kinds(trainer) -> list[str]:
  """The report figures a trainer's stage makes: MAE reconstructions (pretrain / tpp with MAE), segmentation
  overlays (the task stages of a segmentation config)."""
  c = trainer.config
  if stages.get(c.stage).objective == "pretext":
    return ["mae_reconstructions"] if c.pretext.type == "mae" else []
  return ["segmentation_overlays"] if c.task.type == "segmentation" else []


def render_figure(trainer, kind: str, out, split: str, n: int = 6):
  """Draw one figure kind ('mae_reconstructions' | 'segmentation_overlays') of `n` `split` images into `out`
  (a PNG path or a binary file object)."""
  from tpp_jax.report import plots
  mean = np.asarray(trainer.config.data.mean, np.float32)
  std = np.asarray(trainer.config.data.std, np.float32)
  batch = next(iter(_eval_batch(trainer, split, n)))
  if kind == "mae_reconstructions":
    orig, masked, recon = mae_reconstructions(trainer, batch["image"])
    return plots.plot_reconstructions(orig, masked, recon, out, mean=mean, std=std)
  if kind == "segmentation_overlays":
    obj = trainer.objective  # not `trainer`: the cache holds the function weakly keyed by the trainer
    preds = _jitted(trainer, "seg", lambda: lambda p, x: obj.logits(p, x, False).argmax(-1))
    preds = np.asarray(preds(trainer.state["params"], jax.numpy.asarray(batch["image"])))
    return plots.plot_segmentation_overlays(batch["image"], batch["mask"], preds, out, mean=mean, std=std)
  raise ValueError(f"unknown figure kind {kind!r}")


def eval_images(trainer, split: str | None = None, n: int = 4) -> dict[str, np.ndarray]:
  """{kind: (H, W, 3) uint8 image} of the trainer's report figures (TensorBoard images at eval time)."""
  import io

  from PIL import Image
  split = split or next((s for s in ("val", "test", "train") if s in trainer.sources), None)
  out = {}
  for kind in figure_kinds(trainer):
    buf = io.BytesIO()
    render_figure(trainer, kind, buf, split, n)
    out[kind] = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
  return out


def _eval_batch(t, split, n):
  from tpp_jax.data import pipeline as data_pipeline
  for b in data_pipeline.eval_batches(t.sources[split], t.eval_fn, n):
    yield {k: v[:n] for k, v in b.items()}


_JITTED = weakref.WeakKeyDictionary()  # trainer -> {name: jitted fn}: figures at every eval compile once


def _jitted(trainer, name: str, make):
  fns = _JITTED.setdefault(trainer, {})
  if name not in fns:
    fns[name] = jax.jit(make())
  return fns[name]


def mae_reconstructions(trainer, images: np.ndarray, seed: int = 0):
  """(original, masked input, reconstruction) images, in the normalised input space."""
  from tpp_jax.models.mae import patchify, unpatchify
  obj, cfg = trainer.objective, trainer.encoder.cfg

  def make():
    def recon(params, x, noise):
      pred, mask = obj.forward(params, x, noise, False)
      target = patchify(x, cfg.patch)
      if obj.norm_pix:  # predictions are per-patch normalised: undo with the true patch statistics
        mu = target.mean(-1, keepdims=True)
        var = target.var(-1, keepdims=True, ddof=1)
        pred = pred * (var + 1e-6) ** 0.5 + mu
      m = mask[:, :, None]
      grey = jax.numpy.zeros_like(target)  # masked patches shown at the data mean
      return (unpatchify(target * (1 - m) + grey * m, cfg.patch, cfg.channels),
              unpatchify(target * (1 - m) + pred * m, cfg.patch, cfg.channels))
    return recon

  x = np.asarray(images, np.float32)
  noise = np.random.default_rng(seed).random((x.shape[0], cfg.num_patches), dtype=np.float32)
  masked, recon = _jitted(trainer, "mae", make)(trainer.state["params"], x, noise)
  return x, np.asarray(masked), np.asarray(recon)
