"""Use a trained model: predict new images with a finished `finetune` / `linear` / `full` run.

  python -m tpp_jax.predict RUN INPUT OUT [--checkpoint best|latest] [--batch-size N] [--split test]

RUN    the run's --workdir (or a pipeline arm, e.g. PIPE/seed_0/tpp_finetune); only its config.json and
       checkpoint are read (no training data, backbone file or TPP run).
INPUT  a folder of images (.png .jpg .jpeg .bmp .tif .tiff, any size, grey or RGB; searched recursively),
       one image file, or an .npz with an `images` array or `<split>_images` arrays (pick one with --split).
OUT    created; it receives
  predictions.csv   classification: file, prediction, prob_<class> per class (probabilities sum to 1);
                    segmentation: file, mask, overlay, height, width, frac_<class> (pixel fractions)
  masks/*.png       segmentation: one mask per image at its ORIGINAL size, pixel value = class id (uint8)
  overlays/*.png    segmentation: the image with the predicted foreground classes tinted
  errors.csv        file, error: the inputs that could not be read (the rest are predicted)
  predict.json      what was run: run, checkpoint, step, counts
Each image is decoded as the data sources do and resized + normalised by the run's own eval transform
(data/transforms.make_transform(config.data, train=False)). Batches are sharded over all devices.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import io
import json
import math
import os
import pathlib
import sys
import time
from typing import Callable

import numpy as np

from tpp_jax.jsonio import write_atomic

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
TASK_STAGES = ("finetune", "linear", "full")
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, TypeError)
# Overlay colours of classes 1, 2, ... (class 0 = background is left untinted).
PALETTE = np.asarray([(230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180),
                      (70, 240, 240), (240, 50, 230), (245, 130, 48), (0, 128, 128)], np.float32)


class PredictError(ValueError):
  """A user mistake (input, run folder); the CLI prints it without a traceback and exits 2."""


@dataclasses.dataclass
class Item:
  name: str                        # the `file` column: path relative to INPUT, or 'test[17]' for an npz
  stem: str                        # output name (no suffix) of its mask / overlay
  load: Callable[[], np.ndarray]   # -> uint8 (H, W, 1|3), raises for an unreadable file


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------

def list_inputs(input_path, split: str | None = None, exclude=None) -> list[Item]:
  """The images of a folder (recursive), one image file, or an npz's images; errors name the fix."""
  from tpp_jax.data import sources
  p = pathlib.Path(input_path).expanduser()
  if not p.exists():
    raise PredictError(f"INPUT {p} does not exist; give a folder of images or an .npz file.")
  if p.is_file() and p.suffix.lower() == ".npz":
    return _npz_items(p, split)
  if split is not None:
    raise PredictError(f"--split {split} is only for .npz inputs; {p} is not one.")
  if p.is_file():
    if p.suffix.lower() not in IMAGE_EXTENSIONS:
      raise PredictError(f"INPUT {p} is neither an image ({' '.join(IMAGE_EXTENSIONS)}) nor an .npz file.")
    return [Item(p.name, p.stem, lambda q=p: sources._decode_image(q))]
  exclude = pathlib.Path(exclude).expanduser().absolute() if exclude is not None else None
  files = []
  for f in sorted(p.rglob("*")):
    rel = f.relative_to(p)
    if (f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file() and not any(s.startswith(".") for s in rel.parts)
        and not (exclude is not None and exclude in f.absolute().parents)):
      files.append(rel)
  if not files:
    raise PredictError(f"INPUT folder {p} holds no images ({' '.join(IMAGE_EXTENSIONS)}, searched recursively).")
  stems = [r.with_suffix("").as_posix() for r in files]
  dup = {s for s in stems if stems.count(s) > 1}
  return [Item(r.as_posix(), r.as_posix().replace(".", "_") if s in dup else s,
               lambda q=p / r: sources._decode_image(q)) for r, s in zip(files, stems)]


def _npz_items(p: pathlib.Path, split: str | None) -> list[Item]:
  from tpp_jax.data import sources
  try:
    npz = np.load(p, allow_pickle=False)
  except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input
    raise PredictError(f"INPUT {p} is not a readable .npz file ({e}).") from None
  with npz:
    keys = sorted(npz.files)
    if split is not None:
      key = f"{split}_images"
    elif "images" in keys:
      key = "images"
    else:
      found = [k for k in keys if k.endswith("_images")]
      if len(found) != 1:
        choices = ", ".join(k[:-len("_images")] for k in found)
        raise PredictError(f"INPUT {p} has no 'images' array; pick one of its splits with --split ({choices})"
                           if found else f"INPUT {p} has no 'images' or '<split>_images' array (keys: {keys}).")
      key = found[0]
    if key not in keys:
      raise PredictError(f"INPUT {p} has no {key!r} array (keys: {keys}); check --split.")
    try:
      images = npz[key]
    except ValueError as e:
      raise PredictError(f"INPUT {p}[{key}] cannot be read without pickle ({e}); save plain uint8 arrays.") from None
  where = f"{p} [{key}]"
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3) or not len(images):
    raise PredictError(f"{where}: expected (N, H, W) grey or (N, H, W, 1|3) images with N > 0, got shape "
                       f"{images.shape}.")
  try:
    images = sources._as_uint8(images, where)
  except ValueError as e:
    raise PredictError(str(e)) from None
  prefix = key[:-len("_images")] if key != "images" else "images"
  return [Item(f"{prefix}[{i}]", f"{prefix}_{i}", lambda i=i: images[i]) for i in range(len(images))]


def class_names(config) -> list[str]:
  """Names of the classes: task.class_names if set, the class folders of a class_folder run, the
  segmentation default (background, foreground), else the indices."""
  k = int(config.task.num_classes)
  names = config.task.get("class_names", None)
  if names and len(names) == k:
    return [str(n) for n in names]
  if config.task.type == "segmentation" and k == 2:
    return ["background", "foreground"]
  root = pathlib.Path(str(config.data.path or ""))
  if config.task.type == "classification" and config.data.source == "class_folder" and root.is_dir():
    found = sorted({d.name for s in root.iterdir() if s.is_dir() and not s.name.startswith(".")
                    for d in s.iterdir() if d.is_dir() and not d.name.startswith(".")})
    if len(found) == k:
      return found
  return [str(i) for i in range(k)]


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------

def check_task_run(run_dir):
  """The run's config, or one error if it has no task head (a `pretrain` / `tpp` run)."""
  from tpp_jax.checkpoints import restore
  cfg = restore.read_run_config(run_dir)
  if cfg.stage not in TASK_STAGES:
    raise PredictError(f"{run_dir} is a {cfg.stage!r} run: it has no task head to predict with. Use a "
                       f"{' / '.join(TASK_STAGES)} run, e.g. a pipeline's tpp_finetune arm or a fine-tune started "
                       f"with --config.target_init={run_dir}.")
  return cfg


def make_predict_fn(run, mesh):
  """jit(params, aux, images) -> class probabilities (B, K) or predicted class ids (B, S, S)."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  obj = run.objective
  if run.config.task.type == "segmentation":
    def fn(params, aux, images):
      del aux
      return obj.logits(params, images, False).argmax(-1).astype(jnp.int32)
  else:
    def fn(params, aux, images):
      return jax.nn.softmax(obj.logits(params, aux, images, False)[0].astype(jnp.float32), axis=-1)
  repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  return jax.jit(fn, in_shardings=(repl, repl, data), out_shardings=data)


# ------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------

def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
  """uint8 RGB: the image with each foreground class tinted by its palette colour."""
  rgb = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image
  out = rgb.astype(np.float32)
  fg = mask > 0
  colour = PALETTE[(mask[fg].astype(np.int64) - 1) % len(PALETTE)]
  out[fg] = (1 - alpha) * out[fg] + alpha * colour
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


class _Writer:
  """predictions.csv (+ masks/overlays for segmentation) written batch by batch into a temporary file that becomes
  predictions.csv only when every batch is in: a killed predict leaves no partial table under that name."""

  def __init__(self, out: pathlib.Path, task: str, names: list[str]):
    self.out, self.task, self.names = out, task, names
    self.partial = out / ".predictions.csv.partial"
    self.file = open(self.partial, "w", newline="")
    self.csv = csv.writer(self.file)
    if task == "segmentation":
      (out / "masks").mkdir(exist_ok=True)
      (out / "overlays").mkdir(exist_ok=True)
      self.csv.writerow(["file", "mask", "overlay", "height", "width"] + [f"frac_{n}" for n in names])
    else:
      self.csv.writerow(["file", "prediction"] + [f"prob_{n}" for n in names])

  def add(self, item: Item, result: np.ndarray, image: np.ndarray):
    if self.task != "segmentation":
      probs = np.asarray(result, np.float64)
      self.csv.writerow([item.name, self.names[int(probs.argmax())]] + [f"{p:.8g}" for p in probs])
      return
    from PIL import Image
    h, w = image.shape[:2]
    mask = np.asarray(Image.fromarray(result.astype(np.uint8)).resize((w, h), Image.NEAREST))
    mask_rel, over_rel = f"masks/{item.stem}.png", f"overlays/{item.stem}.png"
    for rel, arr in ((mask_rel, mask), (over_rel, overlay(image, mask))):
      (self.out / rel).parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(arr).save(self.out / rel)
    fracs = np.bincount(mask.reshape(-1), minlength=len(self.names))[:len(self.names)] / mask.size
    self.csv.writerow([item.name, mask_rel, over_rel, h, w] + [f"{f:.6g}" for f in fracs])

  def close(self, complete: bool):
    self.file.close()
    if complete:
      os.replace(self.partial, self.out / "predictions.csv")
    else:
      self.partial.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

def predict(run_dir, input_path, out_dir, checkpoint: str = "best", batch_size: int | None = None,
            split: str | None = None, progress: bool = True, workers: int | None = None) -> dict:
  """Predict every image of INPUT with the run in RUN; write OUT (see the module docstring)."""
  import jax

  from tpp_jax import build as build_lib
  from tpp_jax.checkpoints import restore
  from tpp_jax.data import transforms
  from tpp_jax.logging_utils import progress as progress_bar
  t0 = time.time()
  run_dir, out = pathlib.Path(run_dir).expanduser().absolute(), pathlib.Path(out_dir).expanduser().absolute()
  check_task_run(run_dir)
  items = list_inputs(input_path, split, exclude=out)
  if batch_size is not None and batch_size <= 0:
    raise PredictError(f"--batch-size {batch_size} must be positive.")
  run = restore.load_run(run_dir, checkpoint)
  cfg, task = run.config, run.config.task.type
  names = class_names(cfg)
  mesh = build_lib.make_mesh()
  n_dev = mesh.devices.size
  bs = math.ceil(int(batch_size or cfg.eval_batch_size) / n_dev) * n_dev
  step_fn = make_predict_fn(run, mesh)
  params, aux = jax.device_put((run.params, run.aux), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  fn = transforms.make_transform(cfg.data, train=False)

  def prepare(item):
    try:
      image = item.load()
      return item, image, fn({"image": image})["image"], None
    except Exception as e:  # noqa: BLE001 - any unreadable input is reported, the rest go on
      return item, None, None, f"{type(e).__name__}: {e}".replace("\n", " ")

  out.mkdir(parents=True, exist_ok=True)
  writer = _Writer(out, task, names)
  errors, done = [], 0
  bar = progress_bar(None, desc="predict", enabled=progress, total=len(items))

  def flush(pending):
    x = np.stack([p[2] for p in pending])
    if len(x) < bs:  # pad the last batch by repeating its last image
      x = np.concatenate([x, np.repeat(x[-1:], bs - len(x), axis=0)])
    res = np.asarray(jax.device_get(step_fn(params, aux, build_lib.global_batch({"image": x}, mesh)["image"])))
    for (item, image, _, _), r in zip(pending, res):
      writer.add(item, r, image)
    bar.update(len(pending))
    return len(pending)

  workers = workers or min(8, os.cpu_count() or 1)
  complete = False
  try:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      pending = []
      for start in range(0, len(items), bs):
        for res in pool.map(prepare, items[start:start + bs]):
          if res[3] is not None:
            errors.append((res[0].name, res[3]))
            bar.update(1)
            continue
          pending.append(res)
          if len(pending) == bs:
            done += flush(pending)
            pending = []
      if pending:
        done += flush(pending)
    complete = True
  finally:
    writer.close(complete)
    bar.close()
  table = io.StringIO()
  csv.writer(table).writerows([["file", "error"], *errors])
  write_atomic(out / "errors.csv", table.getvalue())
  summary = {"run": str(run_dir), "stage": cfg.stage, "task": task, "checkpoint": run.checkpoint, "step": run.step,
             "input": str(pathlib.Path(input_path).expanduser().absolute()), "images": len(items),
             "predicted": done, "errors": len(errors), "classes": names, "image_size": int(cfg.data.image_size),
             "batch_size": bs, "devices": n_dev, "seconds": round(time.time() - t0, 2)}
  write_atomic(out / "predict.json", json.dumps(summary, indent=2))
  print(f"Predicted {done} of {len(items)} image(s) with {run_dir} ({cfg.stage}, {run.checkpoint} checkpoint, "
        f"step {run.step}) -> {out / 'predictions.csv'}"
        + (f"; {len(errors)} could not be read, see {out / 'errors.csv'}" if errors else ""))
  if not done:
    raise PredictError(f"none of the {len(items)} input image(s) could be read; reasons in {out / 'errors.csv'} "
                       f"(first: {errors[0][0]}: {errors[0][1]}).")
  return summary


def _fail(msg: str):
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(2)


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m tpp_jax.predict", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("run", metavar="RUN", help="a finished finetune / linear / full run folder")
  ap.add_argument("input", metavar="INPUT", help="a folder of images, an image file, or an .npz")
  ap.add_argument("out", metavar="OUT", help="output folder (created)")
  ap.add_argument("--checkpoint", choices=("best", "latest"), default="best",
                  help="best (by validation metric; falls back to latest if the run kept none) or latest")
  ap.add_argument("--batch-size", type=int, default=None, help="images per step (default: the run's "
                  "eval_batch_size), rounded up to a multiple of the device count")
  ap.add_argument("--split", default=None, help="npz input: predict `<split>_images` (e.g. test)")
  ap.add_argument("--no-progress", action="store_true", help="no progress bar")
  a = ap.parse_args(argv)
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
  from tpp_jax.errors import ConfigError
  try:
    return predict(a.run, a.input, a.out, a.checkpoint, a.batch_size, a.split, progress=not a.no_progress)
  except (PredictError, ConfigError) + USER_ERRORS as e:
    if os.environ.get("TPP_DEBUG"):
      raise
    msg = str(e) if isinstance(e, (PredictError, ConfigError)) else f"{type(e).__name__}: {e}"
    _fail(f"{msg}  (set TPP_DEBUG=1 for the traceback)")
  except OSError as e:  # OUT unwritable, its disk full
    if os.environ.get("TPP_DEBUG"):
      raise
    from tpp_jax.errors import output_error_line
    _fail(output_error_line(e, a.out, "writing the predictions (OUT)", "OUT"))


if __name__ == "__main__":
  main()
