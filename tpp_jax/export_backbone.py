"""Export a `pretrain` run as a shippable backbone: fp16 safetensors + held-out evaluation + figure.

  python -m tpp_jax.export_backbone RUN_DIR OUT_DIR [--name NAME]

Writes OUT_DIR/NAME.safetensors (encoder/... and decoder/... leaves, '/'-joined names, fp16; load with
`init.path=OUT_DIR/NAME.safetensors`, which casts to float32), OUT_DIR/reconstructions.png and
OUT_DIR/eval.json with the held-out MAE numbers:
  mae_loss           masked-patch loss in the training target space (per-patch normalised pixels)
  mean_patch_loss    the same loss when every masked patch is predicted as its own mean colour
                     (a flat patch; = (P*P*C - 1) / (P*P*C) with norm_pix_loss)
  pixel_mse          masked-pixel MSE of the reconstruction (normalised image space)
  mean_patch_pixel_mse   masked-pixel MSE of flat true-mean patches

The run is restored from its own folder (config.json + the latest checkpoint, checkpoints.restore.load_run): its
init.path need not exist any more. Only the run's data (val split, and train for the epoch count) is read.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from tpp_jax import build as build_lib
from tpp_jax import report
from tpp_jax.checkpoints import restore as restore_lib
from tpp_jax.checkpoints import store as store_lib
from tpp_jax.data import pipeline as data_pipeline
from tpp_jax.data import transforms as data_transforms
from tpp_jax.figures import mae_reconstructions
from tpp_jax.jsonio import read_jsonl, write_atomic
from tpp_jax.models.mae import patchify


class RestoredRun:
  """What heldout_eval / figures.mae_reconstructions read of a trainer, from a restored run and its data."""

  def __init__(self, run: restore_lib.LoadedRun, sources: dict):
    self.config, self.encoder, self.objective = run.config, run.encoder, run.objective
    self.sources = sources
    self.eval_fn = data_transforms.make_transform(run.config.data, train=False)
    self.state = {"params": run.params, "aux": run.aux, "step": run.step}


def heldout_eval(trainer, split: str = "val", batch_size: int = 250) -> dict:
  obj, cfg = trainer.objective, trainer.encoder.cfg
  sums = {"mae_loss": 0.0, "mean_patch_loss": 0.0, "pixel_mse": 0.0, "mean_patch_pixel_mse": 0.0}
  n_masked = 0.0

  @jax.jit
  def stats(params, images, noise):
    pred, mask = obj.forward(params, images, noise, False)
    target = patchify(images, cfg.patch)
    mu = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True, ddof=1)
    tn = (target - mu) / (var + 1e-6) ** 0.5
    if obj.norm_pix:
      pix = pred * (var + 1e-6) ** 0.5 + mu
      norm_pred = pred
    else:
      pix = pred
      norm_pred = (pred - mu) / (var + 1e-6) ** 0.5
    m = mask
    per = lambda e: (e.mean(-1) * m).sum()
    return jnp.stack([per(jnp.square(norm_pred - tn)), per(jnp.square(tn)),
                      per(jnp.square(pix - target)), per(jnp.square(mu - target)), m.sum()])

  key = jax.random.key(0)
  for i, batch in enumerate(data_pipeline.eval_batches(trainer.sources[split], trainer.eval_fn, batch_size)):
    valid = batch["valid"]
    images = jnp.asarray(batch["image"][valid])
    noise = jax.random.uniform(jax.random.fold_in(key, i), (images.shape[0], cfg.num_patches))
    s = np.asarray(stats(trainer.state["params"], images, noise))
    for k, v in zip(sums, s[:4]):
      sums[k] += float(v)
    n_masked += float(s[4])
  return {k: v / n_masked for k, v in sums.items()}


def export(run_dir, out_dir, name: str) -> dict:
  run_dir, out_dir = pathlib.Path(run_dir).absolute(), pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  cfg = restore_lib.read_run_config(run_dir)
  if cfg.stage != "pretrain":
    raise ValueError(f"{run_dir} is a {cfg.stage!r} run; export_backbone takes a `pretrain` run.")
  run = restore_lib.load_run(run_dir, "latest")  # the build step + the run's own checkpoint; no upstream file
  trainer = RestoredRun(run, build_lib.build_sources(run.config))
  cfg, state = run.config, trainer.state
  params = jax.device_get(state["params"])
  weights = out_dir / f"{name}.safetensors"
  store_lib.save_flat(weights, {"encoder": params["encoder"], "decoder": params["decoder"]},
                      metadata={"model": json.dumps(cfg.model.to_dict()),
                                "pretext": json.dumps(cfg.pretext.to_dict()), "step": int(state["step"])})
  # fp16 round trip: the shipped weights are what we evaluate
  loaded = store_lib.load_flat(weights)
  trainer.state = {**trainer.state, "params": {"encoder": loaded["encoder"], "decoder": loaded["decoder"]}}
  ev = heldout_eval(trainer)
  images = next(iter(data_pipeline.eval_batches(trainer.sources["val"], trainer.eval_fn, 8)))["image"]
  orig, masked, recon = mae_reconstructions(trainer, images)
  report.plot_reconstructions(orig, masked, recon, out_dir / "reconstructions.png",
                              mean=np.asarray(cfg.data.mean), std=np.asarray(cfg.data.std))
  rows = read_jsonl(run_dir / "metrics.jsonl")
  train_rows = [r for r in rows if r["split"] == "train"]
  summary = {
      "weights": weights.name, "bytes": weights.stat().st_size, "step": int(state["step"]),
      "epochs": int(state["step"]) * cfg.batch_size / len(trainer.sources["train"]),
      "final_train_loss": train_rows[-1]["loss"] if train_rows else None,
      "images_per_sec": train_rows[-1].get("images_per_sec") if train_rows else None,
      "heldout": ev, "heldout_images": len(trainer.sources["val"]),
  }
  write_atomic(out_dir / "eval.json", json.dumps(summary, indent=2))
  print(json.dumps(summary, indent=2))
  return summary


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("run_dir")
  ap.add_argument("out_dir")
  ap.add_argument("--name", default="house_vit_ti8_64")
  a = ap.parse_args()
  try:
    export(a.run_dir, a.out_dir, a.name)
  except Exception as e:  # noqa: BLE001 - a user mistake or a disk failure is one line; anything else raises
    if os.environ.get("TPP_DEBUG"):
      raise
    from tpp_jax.export import disk_error
    disk = disk_error(e)
    if disk is not None:  # OUT_DIR unwritable, its disk full
      from tpp_jax.errors import output_error_line
      print("error: " + output_error_line(disk, a.out_dir, "writing the backbone (OUT_DIR)", "OUT_DIR"),
            file=sys.stderr)
      sys.exit(2)
    if not isinstance(e, (ValueError, FileNotFoundError, KeyError, TypeError)):
      raise
    print(f"error: {type(e).__name__}: {e}  (set TPP_DEBUG=1 for the traceback)", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
