"""Use a trained model: predict new images with a finished `finetune` / `linear` / `full` run.

  python -m tpp_jax.predict RUN INPUT OUT [--checkpoint best|latest] [--batch-size N] [--split test] [--overwrite]

RUN    the run's --workdir (or a pipeline arm, e.g. PIPE/seed_0/tpp_finetune); only its config.json and
       checkpoint are read (no training data, backbone file or TPP run).
INPUT  a folder of images (.png .jpg .jpeg .bmp .tif .tiff of any depth, DICOM .dcm or extensionless DICOM files,
       NIfTI .nii / .nii.gz volumes predicted slice by slice; any size, grey or RGB; searched recursively), one such
       file, or an .npz with an `images` array or `<split>_images` arrays (pick one with --split).
OUT    created; an existing non-empty OUT is refused unless --overwrite. It receives
  predictions.csv   classification: file, prediction, prob_<class> per class (probabilities sum to 1);
                    segmentation: file, mask, overlay, height, width, frac_<class> (pixel fractions)
  masks/*.png       segmentation: one mask per image at its ORIGINAL size, pixel value = class id (uint8): the
                    argmax of the logits upsampled bilinearly; a NIfTI input gets masks/NAME.nii.gz, a mask
                    volume with the input's affine
  overlays/*.png    segmentation: the image with the predicted foreground classes tinted
  errors.csv        file, error: the inputs that could not be read (the rest are predicted)
  predict.json      what was run: run, checkpoint, step, counts
Each image is decoded as the data sources do (data.decode.read_image, with the run's data.window) and resized +
normalised by the run's own eval transform (tpp_jax.predictor). Batches are sharded over all devices. Images whose
shape the resize distorts get one warning; any input that cannot be read is listed in errors.csv, the rest are
predicted, and the exit code is 1.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import io
import json
import os
import pathlib
import sys
import time
from typing import Callable

import numpy as np

from tpp_jax.data import medical
from tpp_jax.data.decode import IMAGE_EXTENSIONS, _as_uint8, is_image_file, read_image
from tpp_jax.jsonio import write_atomic
from tpp_jax.predictor import TASK_STAGES, PredictError, check_task_run  # noqa: F401 - the CLI's names

USER_ERRORS = (ValueError, FileNotFoundError, KeyError, TypeError)
# Overlay colours of classes 1, 2, ... (class 0 = background is left untinted).
PALETTE = np.asarray([(230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180),
                      (70, 240, 240), (240, 50, 230), (245, 130, 48), (0, 128, 128)], np.float32)


@dataclasses.dataclass
class Item:
  name: str                        # the `file` column: path relative to INPUT, 'test[17]' for an npz, 'v.nii.gz[3]'
  stem: str                        # output name (no suffix) of its mask / overlay
  load: Callable[[], np.ndarray]   # -> uint8 (H, W, 1|3), raises for an unreadable file
  volume: tuple | None = None      # a NIfTI slice: (the volume's path, slice index, slice count, its mask stem)


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------

def list_inputs(input_path, split: str | None = None, exclude=None, window=None, slice_axis: int = -1
                ) -> list[Item]:
  """The images of a folder (recursive), one image file, or an npz's images; errors name the fix."""
  p = pathlib.Path(input_path).expanduser()
  if not p.exists():
    raise PredictError(f"INPUT {p} does not exist; give a folder of images or an .npz file.")
  if p.is_file() and p.suffix.lower() == ".npz":
    return _npz_items(p, split)
  if split is not None:
    raise PredictError(f"--split {split} is only for .npz inputs; {p} is not one.")
  kinds = " ".join(IMAGE_EXTENSIONS + medical.NIFTI_SUFFIXES)
  if p.is_file():
    if medical.is_nifti(p):
      return _volume_items(p, p.name, window, slice_axis)
    if not is_image_file(p):
      raise PredictError(f"INPUT {p} is neither an image ({kinds}, DICOM) nor an .npz file.")
    return [Item(p.name, _stem(p.name), lambda q=p: read_image(q, window))]
  exclude = pathlib.Path(exclude).expanduser().absolute() if exclude is not None else None
  files = []
  for f in sorted(p.rglob("*")):
    rel = f.relative_to(p)
    if (not any(s.startswith(".") for s in rel.parts) and (medical.is_nifti(f) or is_image_file(f))
        and not (exclude is not None and exclude in f.absolute().parents)):
      files.append(rel)
  if not files:
    raise PredictError(f"INPUT folder {p} holds no images ({kinds}, DICOM; searched recursively).")
  stems = [_stem(r.as_posix()) for r in files]
  dup = {s for s in stems if stems.count(s) > 1}
  items = []
  for r, s in zip(files, stems):
    stem = r.as_posix().replace(".", "_") if s in dup else s
    if medical.is_nifti(r):
      items += _volume_items(p / r, r.as_posix(), window, slice_axis, stem)
    else:
      items.append(Item(r.as_posix(), stem, lambda q=p / r: read_image(q, window)))
  return items


def _stem(name: str) -> str:
  """The output name of an input: without its suffix (both of .nii.gz)."""
  name = name[:-len(".gz")] if name.lower().endswith(".nii.gz") else name
  return str(pathlib.PurePosixPath(name).with_suffix(""))


def _volume_items(path: pathlib.Path, name: str, window, slice_axis: int, stem: str | None = None) -> list[Item]:
  """One item per slice of a NIfTI volume (its header read here: a bad volume is one error)."""
  shape = medical.volume_shape(path, slice_axis)
  reader, stem = medical.VolumeReader(window, slice_axis, keep=1), stem or _stem(name)
  n = shape[slice_axis]
  return [Item(f"{name}[{k}]", f"{stem}_{k}", lambda k=k: reader.image(path, k), (path, k, n, stem))
          for k in range(n)]


def _npz_items(p: pathlib.Path, split: str | None) -> list[Item]:
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
    images = _as_uint8(images, where)  # as the npz source reads them for training
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
  predictions.csv only when every batch is in: a killed predict leaves no partial table under that name. The
  slices of a NIfTI volume are gathered into one mask volume, written with the input's affine."""

  def __init__(self, out: pathlib.Path, task: str, names: list[str], slice_axis: int = -1):
    self.out, self.task, self.names, self.slice_axis = out, task, names, slice_axis
    self.partial = out / ".predictions.csv.partial"
    self.file = open(self.partial, "w", newline="")
    self.csv = csv.writer(self.file)
    self.volumes = {}  # volume path -> {slice index: mask}
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
    mask = result  # the class ids at the image's own size (predictor.upsample_argmax)
    h, w = mask.shape
    over_rel = f"overlays/{item.stem}.png"
    if item.volume is None:
      mask_rel = f"masks/{item.stem}.png"
      (self.out / mask_rel).parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(mask).save(self.out / mask_rel)
    else:
      path, k, n, stem = item.volume
      mask_rel = f"masks/{stem}.nii.gz"
      slices = self.volumes.setdefault(path, {})
      slices[k] = mask
      if len(slices) == n:
        self._write_volume(path, slices, self.out / mask_rel)
        del self.volumes[path]
    (self.out / over_rel).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay(image, mask)).save(self.out / over_rel)
    fracs = np.bincount(mask.reshape(-1), minlength=len(self.names))[:len(self.names)] / mask.size
    self.csv.writerow([item.name, mask_rel, over_rel, h, w] + [f"{f:.6g}" for f in fracs])

  def _write_volume(self, source: pathlib.Path, slices: dict, dest: pathlib.Path):
    """The mask slices stacked back along the slice axis, saved with the input volume's affine and header."""
    import nibabel as nib
    image = medical.load_nifti(source)
    masks = np.stack([slices[k] for k in range(len(slices))], axis=self.slice_axis % 3)
    header = image.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1, 0)
    dest.parent.mkdir(parents=True, exist_ok=True)
    nib.save(type(image)(masks.astype(np.uint8), image.affine, header), str(dest))

  def close(self, complete: bool):
    self.file.close()
    if complete:
      os.replace(self.partial, self.out / "predictions.csv")
    else:
      self.partial.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

# What an earlier predict wrote into OUT: --overwrite replaces these (and nothing else there).
OUTPUTS = ("predictions.csv", "errors.csv", "predict.json", "masks", "overlays")


def check_out(out: pathlib.Path, overwrite: bool):
  """OUT may not hold anything unless --overwrite; then an earlier predict's outputs are removed first."""
  if out.is_file():
    raise PredictError(f"OUT {out} is a file; give a folder (created if missing).")
  if not out.is_dir() or not any(out.iterdir()):
    return
  if not overwrite:
    raise PredictError(f"OUT {out} already holds files; choose a new folder, or add --overwrite to replace an "
                       "earlier prediction there.")
  import shutil
  for name in OUTPUTS:
    q = out / name
    if q.is_dir():
      shutil.rmtree(q)
    elif q.exists():
      q.unlink()


def predict(run_dir, input_path, out_dir, checkpoint: str = "best", batch_size: int | None = None,
            split: str | None = None, progress: bool = True, workers: int | None = None,
            overwrite: bool = False) -> dict:
  """Predict every image of INPUT with the run in RUN; write OUT (see the module docstring)."""
  from tpp_jax.logging_utils import progress as progress_bar
  from tpp_jax.predictor import Predictor, distortion
  t0 = time.time()
  run_dir, out = pathlib.Path(run_dir).expanduser().absolute(), pathlib.Path(out_dir).expanduser().absolute()
  cfg = check_task_run(run_dir)
  from tpp_jax.data import config as data_config
  data = data_config.resolve(cfg.data)
  items = list_inputs(input_path, split, exclude=out, window=data.window, slice_axis=data.slice_axis)
  if batch_size is not None and batch_size <= 0:
    raise PredictError(f"--batch-size {batch_size} must be positive.")
  check_out(out, overwrite)
  model = Predictor(run_dir, checkpoint, batch_size)
  task, names, bs = model.task, class_names(cfg), model.batch_size
  distorted = []

  def prepare(item):
    try:
      image = item.load()
      why = distortion(image.shape, data.image_size)
      return item, image, model.prepare(image), None, why
    except Exception as e:  # noqa: BLE001 - any unreadable input is reported, the rest go on
      return item, None, None, f"{type(e).__name__}: {e}".replace("\n", " "), None

  out.mkdir(parents=True, exist_ok=True)
  writer = _Writer(out, task, names, data.slice_axis)
  errors, done = [], 0
  bar = progress_bar(None, desc="predict", enabled=progress, total=len(items))

  def flush(pending):
    results = model.predict_prepared([p[2] for p in pending], [p[1].shape[:2] for p in pending])
    for (item, image, *_), r in zip(pending, results):
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
          if res[4] is not None:
            distorted.append((res[0].name, res[4]))
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
  summary = {"run": str(run_dir), "stage": cfg.stage, "task": task, "checkpoint": model.run.checkpoint,
             "step": model.run.step, "input": str(pathlib.Path(input_path).expanduser().absolute()),
             "images": len(items), "predicted": done, "errors": len(errors), "distorted": len(distorted),
             "classes": names, "image_size": int(data.image_size), "batch_size": bs,
             "devices": int(model.mesh.devices.size), "seconds": round(time.time() - t0, 2)}
  write_atomic(out / "predict.json", json.dumps(summary, indent=2))
  if distorted:
    print(f"warning: {len(distorted)} image(s) were resized to the model's {data.image_size}x{data.image_size} "
          f"input with more than a small change of shape (first: {distorted[0][0]}: {distorted[0][1]}); crop or "
          "pad them to a square of about that size first if that distorts what the model should see.",
          file=sys.stderr)
  print(f"Predicted {done} of {len(items)} image(s) with {run_dir} ({cfg.stage}, {model.run.checkpoint} checkpoint, "
        f"step {model.run.step}) -> {out / 'predictions.csv'}"
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
  ap.add_argument("--overwrite", action="store_true", help="replace an earlier prediction in OUT (by default an "
                  "OUT that holds files is refused)")
  ap.add_argument("--no-progress", action="store_true", help="no progress bar")
  a = ap.parse_args(argv)
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
  from tpp_jax.errors import ConfigError
  try:
    summary = predict(a.run, a.input, a.out, a.checkpoint, a.batch_size, a.split, progress=not a.no_progress,
                      overwrite=a.overwrite)
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
  if summary["errors"]:  # the rest are predicted and written; the exit code says not all were
    print(f"error: {summary['errors']} of {summary['images']} input(s) could not be read; the others are "
          f"predicted. See {pathlib.Path(a.out) / 'errors.csv'}.", file=sys.stderr)
    sys.exit(1)
  return summary


if __name__ == "__main__":
  main()
