"""Random-access data sources (grain-compatible: ``__len__`` / ``__getitem__``).

Every source returns dict records of numpy arrays:

* classification: ``{'image': uint8 (H, W, C), 'label': int32 scalar}``
* segmentation: ``{'image': uint8 (H, W, C), 'mask': uint8 (H, W)}`` with class
  indices ``0..K-1``.

``C`` is 1 (grey) or 3 (RGB). Sources validate eagerly: a user mistake raises
one ``ValueError`` / ``FileNotFoundError`` whose message names the path or the
config field and says how to fix it.

``cache`` ('auto' | 'on' | 'off', the ``data.cache`` field) decides whether a
split's decoded uint8 images are held in memory (one ``ImageStore`` per split,
decoded once up front) or decoded per item; both give bit-identical records.

The shared pieces live beside this module: ``image_store`` (the decoded-image
store), ``files`` (path checks, .npz reading), ``decode`` (PIL decoding and
image checks), ``source_base`` (``_Base``, label checks); ``TfdsSource`` and
``JpegNpzSource`` are in ``tfds_source`` / ``jpeg_npz_source``. Their public
names are re-exported here.
"""
from __future__ import annotations

import concurrent.futures
import csv
import os
import pathlib
import struct
from typing import Sequence

import numpy as np

from tpp_jax.data import config as config_lib
from tpp_jax.data import medical
from tpp_jax.data.decode import (
  IMAGE_EXTENSIONS,
  _as_uint8,
  _binarise_or_keep,
  _open_image,
  image_size,
  is_image_file,
  read_image,
)
from tpp_jax.data.files import NPZ_FIX, _stored_npy, check_path, open_npz, read_npz_member
from tpp_jax.data.image_store import ImageStore, _Column, _image_store, _threads
from tpp_jax.data.jpeg_npz_source import JpegNpzSource
from tpp_jax.data.source_base import CLASSIFICATION, SEGMENTATION, _Base, _check_labels, source_labels
from tpp_jax.data.tfds_source import TfdsSource

__all__ = [
    "NpzSource", "SegFolderSource", "ClassFolderSource", "TfdsSource",
    "JpegNpzSource", "ImageStore", "source_labels", "check_path",
    "open_npz", "read_npz_member", "IMAGE_EXTENSIONS", "CLASSIFICATION",
    "SEGMENTATION",
]


# ----------------------------------------------------------------------------
# MedMNIST-style npz.
# ----------------------------------------------------------------------------
class NpzSource(_Base):
  """MedMNIST-style ``.npz``: ``{split}_images`` and ``{split}_labels``.

  Images are grey ``(N, H, W)`` / ``(N, H, W, 1)`` or RGB ``(N, H, W, 3)``
  uint8; labels ``(N,)`` or ``(N, 1)``. Multi-label files (``(N, K)``, K > 1)
  are rejected. The images are stored decoded: ``cache`` 'on' reads the
  split's array into memory once; 'off' (or 'auto' when it exceeds
  ``config.CACHE_BUDGET``) memory-maps it instead when the npz stores it
  uncompressed (``np.savez``); a compressed member is always read whole.
  """

  def __init__(self, path: os.PathLike | str, split: str,
               num_classes: int | None = None,
               class_names: Sequence[str] | None = None,
               cache: str = "auto", field: str = "data.path"):
    mode = config_lib.check_cache(cache)
    p = check_path(path, field, "a MedMNIST-style .npz file")
    if p.is_dir():
      raise ValueError(f"{field}: {p} is a folder; data.source=npz needs a "
                       ".npz file (use data.source=seg_folder / class_folder "
                       "for folders).")
    self.path, self.split = p, split
    with open_npz(p, field) as npz:
      keys = set(npz.files)
      splits = sorted(k[:-len("_images")] for k in keys
                      if k.endswith("_images") and
                      k[:-len("_images")] + "_labels" in keys)
      if num_classes is not None:  # a stage that trains on labels
        check_npz_labels(keys, split, p, field)
      for key in (f"{split}_images", f"{split}_labels"):
        if key not in keys:
          raise ValueError(
              f"{field}: {p} has no key {key!r} (keys: {sorted(keys)}). A "
              "MedMNIST-style npz needs '{split}_images' and '{split}_labels';"
              f" splits available: {splits}.")
      try:
        member = None if mode == "on" else _stored_npy(p, f"{split}_images")
      except (ValueError, OSError, EOFError, struct.error) as e:
        raise ValueError(f"{field}: {p} [{split}_images] is corrupt ({e}); "
                         f"{NPZ_FIX}.") from None
      if member is not None and (
          member[2] != np.uint8 or
          mode == "auto" and np.prod(member[1]) <= config_lib.CACHE_BUDGET):
        member = None
      images = (None if member else
                read_npz_member(npz, f"{split}_images", p, field))
      labels = read_npz_member(npz, f"{split}_labels", p, field)
    where = f"{p} [{split}_images]"
    shape = member[1] if member else images.shape
    if len(shape) == 3:
      shape = shape + (1,)
    if len(shape) != 4 or shape[-1] not in (1, 3):
      raise ValueError(
          f"{where}: expected (N, H, W) grey or (N, H, W, 1|3) images, got "
          f"shape {shape}. Convert the images to 1 or 3 channels.")
    if member:
      image_col = _Column.mapped(p, member[0], shape)
    else:
      image_col = _Column(_as_uint8(images.reshape(shape), where))
    self._store = ImageStore({"image": image_col})
    self.mapped = member is not None  # memory-mapped from the file
    where = f"{p} [{split}_labels]"
    if labels.ndim == 2 and labels.shape[1] > 1:
      raise ValueError(
          f"{where}: shape {labels.shape} looks multi-label ({labels.shape[1]}"
          " columns); multi-label classification is not supported. Use a "
          "single-label (N,) or (N, 1) label array.")
    if labels.ndim == 2:
      labels = labels[:, 0]
    if labels.ndim != 1 or len(labels) != shape[0]:
      raise ValueError(f"{where}: expected ({shape[0]},) or "
                       f"({shape[0]}, 1) labels, got {labels.shape}.")
    if not (np.issubdtype(labels.dtype, np.integer) or
            np.issubdtype(labels.dtype, np.bool_)):
      if not np.all(np.equal(np.mod(labels, 1), 0)):
        raise ValueError(f"{where}: labels must be integer class indices, got "
                         f"dtype {labels.dtype}.")
    labels = labels.astype(np.int64)
    _check_labels(labels, num_classes, where)
    self.labels = labels.astype(np.int32)
    self.num_classes = (num_classes if num_classes is not None else
                        int(self.labels.max()) + 1 if len(self.labels) else 0)
    self.class_names = tuple(class_names) if class_names else None

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = self._index(index)
    return {"image": self._store.columns["image"][index],
            "label": self.labels[index]}


def check_npz_labels(keys: set[str], split: str, path: pathlib.Path,
                     field: str) -> None:
  """For a stage that needs labels: every ``X_images`` of the splits a run
  reads (train / val / test and ``split``) has its ``X_labels``, else one
  ValueError naming the file and the missing key (otherwise the split would be
  skipped: a run without val / test metrics, or 'no train split')."""
  names = dict.fromkeys(("train", "val", "test", split))
  missing = [s for s in names
             if f"{s}_images" in keys and f"{s}_labels" not in keys]
  if missing:
    images = ", ".join(repr(f"{s}_images") for s in missing)
    labels = ", ".join(repr(f"{s}_labels") for s in missing)
    raise ValueError(
        f"{field}: {path} has {images} but no {labels}; this stage trains and "
        "evaluates on class labels, so each split's images need their labels."
        f" Add {labels} ((N,) integer class indices) to the npz, or remove "
        f"{images}.")


# ----------------------------------------------------------------------------
# Image + mask folders with split.csv.
# ----------------------------------------------------------------------------
_SEG_FIX = "replace it, or remove its row from split.csv"


def _check_inside(root: pathlib.Path, real_root: pathlib.Path,
                  value: str | None, csv_path: pathlib.Path, number: int,
                  line: int, col: str, field: str) -> None:
  """A path listed in ``csv_path`` must resolve (``..`` and symlinks followed)
  inside the data root ``root`` (``real_root``: its realpath), else one
  ValueError naming the row and the fix (an absolute path, ``../`` or a symlink
  out of the folder would open any file the process can read)."""
  real = pathlib.Path(os.path.realpath(root / (value or "")))
  if real == real_root or real_root in real.parents:
    return
  raise ValueError(
      f"{csv_path} row {number} (line {line}): {col} path {value!r} resolves to "
      f"{real}, outside the data folder {real_root}; paths in split.csv are "
      f"relative to DATA_ROOT ({field}={root}) and must stay inside it. Move "
      "the file under the data folder and list it relative to it (e.g. "
      "images/x.png), or remove the row.")


class SegFolderSource(_Base):
  """Segmentation pairs listed in ``root/split.csv`` (``image,mask,split``).

  Paths in the csv are relative to ``root`` and must resolve inside it (an
  absolute path, ``..`` or a symlink out of ``root`` is refused). Masks with
  values {0, 255} are binarised (``> 127 -> 1``); other masks are kept as class
  indices. A row may pair two NIfTI volumes (``.nii`` / ``.nii.gz``): it gives
  one item per slice along ``slice_axis`` (all in that row's split, so no
  volume is split across train and test); ``skip_empty_slices`` drops the
  slices whose mask has no foreground. With ``cache`` on (see ``ImageStore``)
  every pair is decoded once at construction; off, each read decodes.
  """

  task = SEGMENTATION

  def __init__(self, root: os.PathLike | str, split: str,
               num_classes: int | None = None,
               class_names: Sequence[str] | None = None,
               cache: str = "auto", field: str = "data.path",
               window: Sequence[float] | None = None, slice_axis: int = -1,
               skip_empty_slices: bool = False):
    config_lib.check_cache(cache)
    root = check_path(root, field,
                         "a folder with images/, masks/ and split.csv")
    csv_path = root / "split.csv"
    if not csv_path.exists():
      raise FileNotFoundError(
          f"{field}: {csv_path} not found. data.source=seg_folder needs a "
          "split.csv with columns image,mask,split in the data folder.")
    with open(csv_path, newline="") as f:
      reader = csv.DictReader(f)
      cols = set(reader.fieldnames or ())
      if not {"image", "mask", "split"} <= cols:
        raise ValueError(f"{csv_path}: needs columns image,mask,split, got "
                         f"{sorted(cols)}.")
      rows, real_root = [], pathlib.Path(os.path.realpath(root))
      for number, r in enumerate(reader, 1):  # every row, whatever its split
        for col in ("image", "mask"):
          _check_inside(root, real_root, r[col], csv_path, number,
                        reader.line_num, col, field)
        rows.append(r)
    splits = sorted({r["split"] for r in rows})
    rows = [r for r in rows if r["split"] == split]
    if not rows:
      raise ValueError(f"{csv_path}: no rows with split={split!r} "
                       f"(splits present: {splits}).")
    self.root, self.split, self.window = root, split, window
    self.volumes = medical.VolumeReader(window, slice_axis)
    self.image_paths, self.mask_paths, self.slices = [], [], []
    for r in rows:
      ip, mp = root / r["image"], root / r["mask"]
      for q in (ip, mp):
        if not q.is_file():
          raise FileNotFoundError(f"{csv_path}: listed file {q} does not exist;"
                                  " fix split.csv or add the file.")
      if medical.is_nifti(ip) or medical.is_nifti(mp):
        kept = self._volume_slices(ip, mp, slice_axis, skip_empty_slices)
      else:
        _check_pair_sizes(ip, mp)
        kept = [None]
      self.image_paths += [ip] * len(kept)
      self.mask_paths += [mp] * len(kept)
      self.slices += kept
    if not self.image_paths:
      raise ValueError(f"{csv_path}: every slice of the {split!r} volumes has an empty mask and "
                       "data.skip_empty_slices=True drops them all; set it False or add volumes.")
    self.num_classes = num_classes if num_classes is not None else 2
    if class_names:
      self.class_names = tuple(class_names)
    elif self.num_classes == 2:
      self.class_names = ("background", "foreground")
    self._store = _image_store(cache, len(self.image_paths), self._decode)
    if self._store is None:  # not decoded up front: still check every mask now
      self._check_masks()

  def _volume_slices(self, ip: pathlib.Path, mp: pathlib.Path, slice_axis: int,
                     skip_empty: bool) -> list[int]:
    """The slice indices of one image / mask volume pair (checked: both NIfTI, 3-D, one shape)."""
    if not (medical.is_nifti(ip) and medical.is_nifti(mp)):
      raise ValueError(f"{ip} and its mask {mp}: a NIfTI volume pairs with a NIfTI mask volume only; convert "
                       "both to .nii.gz (or both to 2-D images).")
    shape = medical.volume_shape(ip, slice_axis)
    mask_shape = medical.volume_shape(mp, slice_axis, "NIfTI mask")
    if shape != mask_shape:
      raise ValueError(f"NIfTI mask {mp} has shape {mask_shape} but its image {ip} has shape {shape}; every mask "
                       "volume must have the shape of its image volume.")
    if skip_empty:
      return [int(k) for k in self.volumes.foreground_slices(mp)]
    return list(range(shape[slice_axis]))

  def __len__(self) -> int:
    return len(self.image_paths)

  def _check_masks(self) -> None:
    """Decodes every mask once (not kept): a class id >= num_classes or an
    unreadable mask raises here, before any training step."""
    with concurrent.futures.ThreadPoolExecutor(_threads()) as pool:
      for _ in pool.map(self._load_mask, range(len(self))):
        pass

  def _load_mask(self, index: int) -> np.ndarray:
    path, k = self.mask_paths[index], self.slices[index]
    if k is not None:
      mask, path = self.volumes.mask(path, k), f"{path} (slice {k})"
    else:
      with _open_image(path, "mask", _SEG_FIX) as mk:
        if mk.mode in ("RGB", "RGBA", "LA"):
          mk = mk.convert("L")
        mask = np.asarray(mk)
    if mask.ndim != 2:
      raise ValueError(f"mask {path}: expected a single-channel mask, got shape"
                       f" {mask.shape}.")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
      raise ValueError(f"mask {path}: values outside 0..255.")
    mask = _binarise_or_keep(mask)
    if mask.size and int(mask.max()) >= self.num_classes:
      raise ValueError(
          f"mask {path}: class index {int(mask.max())} is outside "
          f"[0, {self.num_classes}) (task.num_classes={self.num_classes}). "
          f"Set task.num_classes to at least {int(mask.max()) + 1}, or store "
          "binary masks as {0, 255} / class indices 0..num_classes-1.")
    return mask

  def _decode(self, index: int) -> dict[str, np.ndarray]:
    k = self.slices[index]
    image = (read_image(self.image_paths[index], self.window, _SEG_FIX) if k is None
             else self.volumes.image(self.image_paths[index], k))
    rec = {"image": image, "mask": self._load_mask(index)}
    if rec["image"].shape[:2] != rec["mask"].shape:
      raise ValueError(f'mask {self.mask_paths[index]} has shape '
                       f'{rec["mask"].shape}, image {self.image_paths[index]} '
                       f'{rec["image"].shape[:2]}; they must match.')
    return rec

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = self._index(index)
    if self._store is not None:
      return self._store[index]
    return self._decode(index)


def _check_pair_sizes(ip: pathlib.Path, mp: pathlib.Path) -> None:
  """A 2-D image and its mask: one size (headers only), a mask mode we read."""
  width, height = image_size(ip, _SEG_FIX)
  with _open_image(mp, "mask", _SEG_FIX, load=False) as mk:
    if (width, height) != mk.size:
      raise ValueError(
          f"mask {mp} is {mk.size[0]}x{mk.size[1]} (WxH) but its image {ip}"
          f" is {width}x{height}; every mask must have the size "
          "of its image.")
    if mk.mode not in ("L", "P", "1", "I", "I;16", "LA", "RGB", "RGBA"):
      raise ValueError(f"mask {mp}: unsupported mode {mk.mode!r}; save "
                       "masks as single-channel 8-bit PNG.")


# ----------------------------------------------------------------------------
# root/split/class_name/*.png folders.
# ----------------------------------------------------------------------------
class ClassFolderSource(_Base):
  """Classification images in ``root/split/class_name/*`` (PNG / JPEG / BMP / TIFF of any depth, DICOM).

  Class index = position in the sorted class names, taken over the union of
  the class folders of every split folder under ``root`` (so a split missing
  a class keeps the same indices), unless ``class_names`` is given. With
  ``cache`` on (see ``ImageStore``) the images are decoded once at
  construction; off, each read decodes with PIL.
  """

  def __init__(self, root: os.PathLike | str, split: str,
               num_classes: int | None = None,
               class_names: Sequence[str] | None = None,
               cache: str = "auto", field: str = "data.path",
               window: Sequence[float] | None = None):
    config_lib.check_cache(cache)
    self.window = window
    root = check_path(root, field, "a folder laid out as "
                         "root/<split>/<class_name>/*.png")
    split_dir = root / split
    splits = sorted(d.name for d in root.iterdir()
                    if d.is_dir() and not d.name.startswith("."))
    if not split_dir.is_dir():
      raise FileNotFoundError(
          f"{field}: no split folder {split_dir} (folders present: {splits})."
          " data.source=class_folder expects root/<split>/<class_name>/*.png.")
    if class_names is None:
      names = set()
      for s in splits:
        names.update(d.name for d in (root / s).iterdir()
                     if d.is_dir() and not d.name.startswith("."))
      class_names = sorted(names)
    self.class_names = tuple(class_names)
    if not self.class_names:
      raise ValueError(f"{split_dir}: no class folders found; expected "
                       f"{split_dir}/<class_name>/*.png.")
    if num_classes is not None and num_classes < len(self.class_names):
      raise ValueError(
          f"{root}: {len(self.class_names)} class folders "
          f"{list(self.class_names)} but task.num_classes={num_classes}. "
          "Set task.num_classes to the number of class folders.")
    self.num_classes = (num_classes if num_classes is not None
                        else len(self.class_names))
    self.root, self.split = root, split
    paths, labels = [], []
    for c, name in enumerate(self.class_names):
      d = split_dir / name
      if not d.is_dir():
        continue
      files = sorted(f for f in d.iterdir() if not f.name.startswith(".") and is_image_file(f))
      paths.extend(files)
      labels.extend([c] * len(files))
    if not paths:
      raise ValueError(f'{split_dir}: no {"/".join(IMAGE_EXTENSIONS)} images '
                       '(or extensionless DICOM files) in its class folders.')
    self.paths = paths
    self.labels = np.asarray(labels, np.int32)
    self._store = _image_store(cache, len(paths), self._decode)

  def __len__(self) -> int:
    return len(self.paths)

  def _decode(self, index: int) -> dict[str, np.ndarray]:
    return {"image": read_image(self.paths[index], self.window)}

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = self._index(index)
    rec = (self._decode(index) if self._store is None else
           self._store[index])
    rec["label"] = self.labels[index]
    return rec
