"""Random-access data sources (grain-compatible: ``__len__`` / ``__getitem__``).

Every source returns dict records of numpy arrays:

* classification: ``{'image': uint8 (H, W, C), 'label': int32 scalar}``
* segmentation: ``{'image': uint8 (H, W, C), 'mask': uint8 (H, W)}`` with class
  indices ``0..K-1``.

``C`` is 1 (grey) or 3 (RGB). Sources validate eagerly: a user mistake raises
one ``ValueError`` / ``FileNotFoundError`` whose message names the path or the
config field and says how to fix it.
"""
from __future__ import annotations

import csv
import io
import os
import pathlib
import re
import threading
import zipfile
from typing import Any, Sequence

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
CLASSIFICATION = 'classification'
SEGMENTATION = 'segmentation'

__all__ = [
    'NpzSource', 'SegFolderSource', 'ClassFolderSource', 'TfdsSource',
    'JpegNpzSource', 'source_labels', 'check_path', 'IMAGE_EXTENSIONS',
]


# ----------------------------------------------------------------------------
# Shared helpers.
# ----------------------------------------------------------------------------
def check_path(path: os.PathLike | str | None, field: str,
                  what: str) -> pathlib.Path:
  """Returns ``path`` as a Path, or raises naming the config field."""
  if path is None or str(path) == '':
    raise ValueError(f'{field} is not set: point it at {what} '
                     f'(e.g. --config.{field}=/path/to/data).')
  p = pathlib.Path(path).expanduser()
  if not p.exists():
    raise FileNotFoundError(
        f'{field}: {p} does not exist. Set --config.{field} to {what}.')
  return p


def _as_hwc(image: np.ndarray, where: str) -> np.ndarray:
  """(H, W) or (H, W, C) with C in {1, 3} -> (H, W, C) uint8."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(
        f'{where}: expected a grey (H, W) / (H, W, 1) or RGB (H, W, 3) image, '
        f'got shape {image.shape}. Convert the images to 1 or 3 channels.')
  return _as_uint8(image, where)


def _as_uint8(x: np.ndarray, where: str) -> np.ndarray:
  if x.dtype == np.uint8:
    return x
  if np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.bool_):
    if x.size and (x.min() < 0 or x.max() > 255):
      raise ValueError(f'{where}: integer values outside 0..255 '
                       f'(dtype {x.dtype}); store images as uint8.')
    return x.astype(np.uint8)
  raise ValueError(f'{where}: images must be uint8 0..255, got dtype '
                   f'{x.dtype}. Store them as uint8, e.g. '
                   '(x * 255).round().astype(uint8).')


def _pil_to_array(img: Image.Image, where: str) -> np.ndarray:
  """Decoded PIL image -> uint8 (H, W, 1|3)."""
  if img.mode in ('L', 'RGB'):
    pass
  elif img.mode in ('LA', '1'):
    img = img.convert('L')
  elif img.mode in ('RGBA', 'P', 'CMYK', 'YCbCr', 'LAB', 'HSV', 'PA', 'RGBX'):
    img = img.convert('RGB')
  else:
    raise ValueError(
        f'{where}: unsupported image mode {img.mode!r} (e.g. 16-bit). '
        'Save the image as 8-bit grey (L) or RGB.')
  return _as_hwc(np.asarray(img), where)


def _decode_image(path: pathlib.Path) -> np.ndarray:
  with Image.open(path) as img:
    return _pil_to_array(img, str(path))


def _binarise_or_keep(mask: np.ndarray) -> np.ndarray:
  """{0, 255} masks -> {0, 1}; anything else is kept as class indices."""
  if mask.size and mask.max() > 1:
    values = np.unique(mask)
    if np.all((values == 0) | (values == 255)):
      return (mask > 127).astype(np.uint8)
  return mask.astype(np.uint8)


def _check_labels(labels: np.ndarray, num_classes: int | None,
                  where: str) -> None:
  if labels.size == 0:
    return
  lo, hi = int(labels.min()), int(labels.max())
  if lo < 0:
    raise ValueError(f'{where}: negative label {lo}; labels must be class '
                     'indices 0..num_classes-1.')
  if num_classes is not None and hi >= num_classes:
    raise ValueError(
        f'{where}: label {hi} is outside [0, {num_classes}) '
        f'(task.num_classes={num_classes}). Set task.num_classes to at least '
        f'{hi + 1} or fix the labels.')


def source_labels(source: Any) -> np.ndarray:
  """Integer labels of a classification source as an int32 (N,) array.

  Uses ``source.labels`` when available, otherwise reads every record.
  """
  labels = getattr(source, 'labels', None)
  if labels is not None:
    return np.asarray(labels, np.int32)
  return np.asarray([int(source[i]['label']) for i in range(len(source))],
                    np.int32)


class _Base:
  """Common bits: ``task``, ``num_classes``, ``class_names``, ``__repr__``."""

  task: str = CLASSIFICATION
  num_classes: int | None = None
  class_names: tuple[str, ...] | None = None
  split: str = ''

  def __repr__(self) -> str:
    return (f'{type(self).__name__}(split={self.split!r}, n={len(self)}, '
            f'task={self.task!r}, num_classes={self.num_classes})')

  def __iter__(self):
    for i in range(len(self)):
      yield self[i]

  def _index(self, index: int) -> int:
    n = len(self)
    index = int(index)
    if index < 0:
      index += n
    if not 0 <= index < n:
      raise IndexError(f'index {index} out of range for {self!r}')
    return index


# ----------------------------------------------------------------------------
# MedMNIST-style npz.
# ----------------------------------------------------------------------------
class NpzSource(_Base):
  """MedMNIST-style ``.npz``: ``{split}_images`` and ``{split}_labels``.

  Images are grey ``(N, H, W)`` / ``(N, H, W, 1)`` or RGB ``(N, H, W, 3)``
  uint8; labels ``(N,)`` or ``(N, 1)``. Multi-label files (``(N, K)``, K > 1)
  are rejected. The split's arrays are loaded once (no pickle).
  """

  def __init__(self, path: os.PathLike | str, split: str,
               num_classes: int | None = None,
               class_names: Sequence[str] | None = None,
               field: str = 'data.path'):
    p = check_path(path, field, 'a MedMNIST-style .npz file')
    if p.is_dir():
      raise ValueError(f'{field}: {p} is a folder; data.source=npz needs a '
                       '.npz file (use data.source=seg_folder / class_folder '
                       'for folders).')
    self.path, self.split = p, split
    try:
      npz = np.load(p, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as e:
      raise ValueError(
          f'{field}: {p} is not a readable .npz file ({e}).') from e
    with npz:
      keys = set(npz.files)
      splits = sorted(k[:-len('_images')] for k in keys
                      if k.endswith('_images') and
                      k[:-len('_images')] + '_labels' in keys)
      for key in (f'{split}_images', f'{split}_labels'):
        if key not in keys:
          raise ValueError(
              f'{field}: {p} has no key {key!r} (keys: {sorted(keys)}). A '
              "MedMNIST-style npz needs '{split}_images' and '{split}_labels';"
              f' splits available: {splits}.')
      try:
        images = npz[f'{split}_images']
        labels = npz[f'{split}_labels']
      except ValueError as e:  # object arrays need pickle
        raise ValueError(f'{field}: {p}: cannot load {split} arrays without '
                         f'pickle ({e}); save them as plain numeric arrays.'
                         ) from e
    where = f'{p} [{split}_images]'
    if images.ndim == 3:
      images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(
          f'{where}: expected (N, H, W) grey or (N, H, W, 1|3) images, got '
          f'shape {images.shape}. Convert the images to 1 or 3 channels.')
    self.images = _as_uint8(images, where)
    where = f'{p} [{split}_labels]'
    if labels.ndim == 2 and labels.shape[1] > 1:
      raise ValueError(
          f'{where}: shape {labels.shape} looks multi-label ({labels.shape[1]}'
          ' columns); multi-label classification is not supported. Use a '
          'single-label (N,) or (N, 1) label array.')
    if labels.ndim == 2:
      labels = labels[:, 0]
    if labels.ndim != 1 or len(labels) != len(images):
      raise ValueError(f'{where}: expected ({len(images)},) or '
                       f'({len(images)}, 1) labels, got {labels.shape}.')
    if not (np.issubdtype(labels.dtype, np.integer) or
            np.issubdtype(labels.dtype, np.bool_)):
      if not np.all(np.equal(np.mod(labels, 1), 0)):
        raise ValueError(f'{where}: labels must be integer class indices, got '
                         f'dtype {labels.dtype}.')
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
    return {'image': self.images[index], 'label': self.labels[index]}


# ----------------------------------------------------------------------------
# Image + mask folders with split.csv.
# ----------------------------------------------------------------------------
class SegFolderSource(_Base):
  """Segmentation pairs listed in ``root/split.csv`` (``image,mask,split``).

  Paths in the csv are relative to ``root``. Masks with values {0, 255} are
  binarised (``> 127 -> 1``); other masks are kept as class indices. Decoding
  is lazy (PIL) and the decoded arrays are cached in memory after first read.
  """

  task = SEGMENTATION

  def __init__(self, root: os.PathLike | str, split: str,
               num_classes: int | None = None,
               class_names: Sequence[str] | None = None,
               cache: bool = True, field: str = 'data.path'):
    root = check_path(root, field,
                         'a folder with images/, masks/ and split.csv')
    csv_path = root / 'split.csv'
    if not csv_path.exists():
      raise FileNotFoundError(
          f'{field}: {csv_path} not found. data.source=seg_folder needs a '
          'split.csv with columns image,mask,split in the data folder.')
    with open(csv_path, newline='') as f:
      reader = csv.DictReader(f)
      cols = set(reader.fieldnames or ())
      if not {'image', 'mask', 'split'} <= cols:
        raise ValueError(f'{csv_path}: needs columns image,mask,split, got '
                         f'{sorted(cols)}.')
      rows = list(reader)
    splits = sorted({r['split'] for r in rows})
    rows = [r for r in rows if r['split'] == split]
    if not rows:
      raise ValueError(f'{csv_path}: no rows with split={split!r} '
                       f'(splits present: {splits}).')
    self.root, self.split = root, split
    self.image_paths = [root / r['image'] for r in rows]
    self.mask_paths = [root / r['mask'] for r in rows]
    for ip, mp in zip(self.image_paths, self.mask_paths):
      for q in (ip, mp):
        if not q.is_file():
          raise FileNotFoundError(f'{csv_path}: listed file {q} does not exist;'
                                  ' fix split.csv or add the file.')
      with Image.open(ip) as im, Image.open(mp) as mk:  # headers only
        if im.size != mk.size:
          raise ValueError(
              f'mask {mp} is {mk.size[0]}x{mk.size[1]} (WxH) but its image {ip}'
              f' is {im.size[0]}x{im.size[1]}; every mask must have the size '
              'of its image.')
        if mk.mode not in ('L', 'P', '1', 'I', 'I;16', 'LA', 'RGB', 'RGBA'):
          raise ValueError(f'mask {mp}: unsupported mode {mk.mode!r}; save '
                           'masks as single-channel 8-bit PNG.')
    self.num_classes = num_classes if num_classes is not None else 2
    if class_names:
      self.class_names = tuple(class_names)
    elif self.num_classes == 2:
      self.class_names = ('background', 'foreground')
    self._cache: dict[int, dict[str, np.ndarray]] | None = {} if cache else None
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self.image_paths)

  def _load_mask(self, path: pathlib.Path) -> np.ndarray:
    with Image.open(path) as mk:
      if mk.mode in ('RGB', 'RGBA', 'LA'):
        mk = mk.convert('L')
      mask = np.asarray(mk)
    if mask.ndim != 2:
      raise ValueError(f'mask {path}: expected a single-channel mask, got shape'
                       f' {mask.shape}.')
    if mask.size and (mask.min() < 0 or mask.max() > 255):
      raise ValueError(f'mask {path}: values outside 0..255.')
    mask = _binarise_or_keep(mask)
    if mask.size and int(mask.max()) >= self.num_classes:
      raise ValueError(
          f'mask {path}: class index {int(mask.max())} is outside '
          f'[0, {self.num_classes}) (task.num_classes={self.num_classes}). '
          'Set task.num_classes or store masks as {0,255} / class indices.')
    return mask

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = self._index(index)
    if self._cache is not None:
      rec = self._cache.get(index)
      if rec is not None:
        return rec
    rec = {'image': _decode_image(self.image_paths[index]),
           'mask': self._load_mask(self.mask_paths[index])}
    if rec['image'].shape[:2] != rec['mask'].shape:
      raise ValueError(f'mask {self.mask_paths[index]} has shape '
                       f'{rec["mask"].shape}, image {self.image_paths[index]} '
                       f'{rec["image"].shape[:2]}; they must match.')
    rec['image'].setflags(write=False)
    rec['mask'].setflags(write=False)
    if self._cache is not None:
      with self._lock:
        self._cache[index] = rec
    return rec

  def __getstate__(self):
    state = self.__dict__.copy()
    del state['_lock']
    if state['_cache'] is not None:
      state['_cache'] = {}
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()


# ----------------------------------------------------------------------------
# root/split/class_name/*.png folders.
# ----------------------------------------------------------------------------
class ClassFolderSource(_Base):
  """Classification images in ``root/split/class_name/*.{png,jpg,jpeg}``.

  Class index = position in the sorted class names, taken over the union of
  the class folders of every split folder under ``root`` (so a split missing
  a class keeps the same indices), unless ``class_names`` is given.
  """

  def __init__(self, root: os.PathLike | str, split: str,
               num_classes: int | None = None,
               class_names: Sequence[str] | None = None,
               field: str = 'data.path'):
    root = check_path(root, field, 'a folder laid out as '
                         'root/<split>/<class_name>/*.png')
    split_dir = root / split
    splits = sorted(d.name for d in root.iterdir()
                    if d.is_dir() and not d.name.startswith('.'))
    if not split_dir.is_dir():
      raise FileNotFoundError(
          f'{field}: no split folder {split_dir} (folders present: {splits}).'
          ' data.source=class_folder expects root/<split>/<class_name>/*.png.')
    if class_names is None:
      names = set()
      for s in splits:
        names.update(d.name for d in (root / s).iterdir()
                     if d.is_dir() and not d.name.startswith('.'))
      class_names = sorted(names)
    self.class_names = tuple(class_names)
    if not self.class_names:
      raise ValueError(f'{split_dir}: no class folders found; expected '
                       f'{split_dir}/<class_name>/*.png.')
    if num_classes is not None and num_classes < len(self.class_names):
      raise ValueError(
          f'{root}: {len(self.class_names)} class folders '
          f'{list(self.class_names)} but task.num_classes={num_classes}. '
          'Set task.num_classes to the number of class folders.')
    self.num_classes = (num_classes if num_classes is not None
                        else len(self.class_names))
    self.root, self.split = root, split
    paths, labels = [], []
    for c, name in enumerate(self.class_names):
      d = split_dir / name
      if not d.is_dir():
        continue
      files = sorted(f for f in d.iterdir()
                     if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
      paths.extend(files)
      labels.extend([c] * len(files))
    if not paths:
      raise ValueError(f'{split_dir}: no {"/".join(IMAGE_EXTENSIONS)} images '
                       'in its class folders.')
    self.paths = paths
    self.labels = np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = self._index(index)
    return {'image': _decode_image(self.paths[index]),
            'label': self.labels[index]}


# ----------------------------------------------------------------------------
# TFDS (array_record, no TensorFlow).
# ----------------------------------------------------------------------------
def _base_split_names(split: str) -> list[str]:
  """'train[:90%]+validation' -> ['train', 'validation']."""
  return [re.split(r'[\[(]', s.strip())[0] for s in split.split('+')]


class TfdsSource(_Base):
  """A prepared TFDS dataset in ``array_record`` format, read without TF.

  The dataset must already be prepared in ``data_dir`` (``tfds build
  --file_format=array_record`` or ``builder.download_and_prepare``). The
  record is mapped to our dict: ``image_key`` -> 'image', and ``mask_key`` ->
  'mask' when that feature exists (segmentation), else ``label_key`` ->
  'label' (classification).
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None,
               image_key: str = 'image', label_key: str = 'label',
               mask_key: str = 'mask', num_classes: int | None = None,
               field: str = 'data.tfds_name'):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    if not name:
      raise ValueError(f'{field} is not set: give the TFDS dataset name '
                       '(e.g. --config.data.tfds_name=my_dataset).')
    if data_dir is not None:
      check_path(data_dir, 'data.tfds_data_dir',
                    'the folder holding the prepared TFDS dataset')
      data_dir = str(data_dir)
    try:
      builder = tfds.builder(name, data_dir=data_dir,
                             file_format='array_record')
    except Exception as e:  # pylint: disable=broad-except
      first_line = (str(e).strip().splitlines() or [''])[0]  # no catalogue
      raise ValueError(
          f'{field}={name!r}: cannot find the TFDS dataset in '
          f'data.tfds_data_dir={data_dir} ({type(e).__name__}: '
          f'{first_line}). Prepare it'
          ' with `tfds build --file_format=array_record` or set '
          'data.tfds_data_dir to where it was prepared.') from e
    info = builder.info
    prepared = getattr(builder, 'is_prepared', None)
    if (prepared() if callable(prepared) else bool(info.splits)) is False:
      raise FileNotFoundError(
          f'{field}={name!r} is not prepared in data.tfds_data_dir={data_dir}.'
          ' Prepare it with `tfds build --file_format=array_record` (or '
          "builder.download_and_prepare(file_format='array_record')).")
    available = sorted(info.splits.keys())
    for s in _base_split_names(split):
      if s not in available:
        raise ValueError(f'{field}={name!r}: no split {s!r} (splits: '
                         f'{available}).')
    features = info.features
    keys = set(features.keys()) if hasattr(features, 'keys') else set()
    if image_key not in keys:
      raise ValueError(f'{field}={name!r}: no image feature {image_key!r} '
                       f'(features: {sorted(keys)}); set '
                       'data.tfds_image_key.')
    if mask_key and mask_key in keys:
      self.task, self._target_key = SEGMENTATION, mask_key
      self._out_key = 'mask'
    elif label_key in keys:
      self.task, self._target_key = CLASSIFICATION, label_key
      self._out_key = 'label'
    else:
      raise ValueError(
          f'{field}={name!r}: no label feature {label_key!r} nor mask feature '
          f'{mask_key!r} (features: {sorted(keys)}); set data.tfds_label_key '
          'or data.tfds_mask_key.')
    feat = features[self._target_key]
    known = getattr(feat, 'num_classes', None)
    names = getattr(feat, 'names', None)
    if known is not None and num_classes is not None and known > num_classes:
      raise ValueError(f'{field}={name!r}: {self._target_key!r} has {known} '
                       f'classes but task.num_classes={num_classes}.')
    self.num_classes = num_classes if num_classes is not None else known
    self.class_names = tuple(names) if names else None
    try:
      self._ds = builder.as_data_source(split=split)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(
          f'{field}={name!r}: cannot open split {split!r} as an array_record '
          f'data source ({type(e).__name__}: {e}). Re-prepare it with '
          "file_format='array_record'.") from e
    self.name, self.split, self.data_dir = name, split, data_dir
    self._image_key = image_key
    self._labels: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self._ds)

  def _convert(self, rec: dict[str, Any], index: int) -> dict[str, np.ndarray]:
    where = f'tfds {self.name}[{self.split}] #{index}'
    out = {'image': _as_hwc(np.asarray(rec[self._image_key]), where)}
    target = np.asarray(rec[self._target_key])
    if self._out_key == 'label':
      if target.ndim:
        raise ValueError(f'{where}: label {self._target_key!r} has shape '
                         f'{target.shape}; only single-label (scalar) '
                         'classification is supported.')
      _check_labels(target, self.num_classes, where)
      out['label'] = np.int32(target)
    else:
      if target.ndim == 3 and target.shape[-1] == 1:
        target = target[..., 0]
      if target.shape != out['image'].shape[:2]:
        raise ValueError(f'{where}: mask shape {target.shape} does not match '
                         f'image {out["image"].shape[:2]}.')
      mask = _binarise_or_keep(target)
      if self.num_classes is not None and mask.size and (
          int(mask.max()) >= self.num_classes):
        raise ValueError(f'{where}: mask class {int(mask.max())} outside '
                         f'[0, {self.num_classes}).')
      out['mask'] = mask
    return out

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = self._index(index)
    return self._convert(self._ds[index], index)

  @property
  def labels(self) -> np.ndarray | None:
    """All labels (reads every record once; cached). None for segmentation."""
    if self.task != CLASSIFICATION:
      return None
    if self._labels is None:
      self._labels = np.asarray(
          [int(self._ds[i][self._target_key]) for i in range(len(self))],
          np.int32)
    return self._labels


# ----------------------------------------------------------------------------
# Concatenated JPEG bytes (pretrain_natural_64).
# ----------------------------------------------------------------------------
class JpegNpzSource(_Base):
  """JPEGs concatenated in ``jpeg_bytes`` with ``offsets`` (N+1,), unlabelled.

  Split 'train' = all but the last ``val_count`` images, 'val' = the last
  ``val_count``. Images are decoded per item with PIL ``.convert('RGB')``;
  every label is 0.
  """

  SPLITS = ('train', 'val')

  def __init__(self, path: os.PathLike | str, split: str,
               val_count: int = 1000, field: str = 'data.path'):
    p = check_path(path, field, 'an .npz with jpeg_bytes and offsets')
    if split not in self.SPLITS:
      raise ValueError(f'data.source=jpeg_npz has splits {self.SPLITS}, not '
                       f'{split!r}.')
    try:
      npz = np.load(p, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as e:
      raise ValueError(
          f'{field}: {p} is not a readable .npz file ({e}).') from e
    with npz:
      missing = [k for k in ('jpeg_bytes', 'offsets') if k not in npz.files]
      if missing:
        raise ValueError(f'{field}: {p} has no key(s) {missing} (keys: '
                         f'{sorted(npz.files)}); data.source=jpeg_npz needs '
                         'jpeg_bytes (uint8) and offsets (N+1,).')
      data = npz['jpeg_bytes']
      offsets = npz['offsets'].astype(np.int64)
    if data.dtype != np.uint8 or data.ndim != 1:
      raise ValueError(f'{p}: jpeg_bytes must be a flat uint8 array, got '
                       f'{data.dtype} {data.shape}.')
    if (offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0 or
        np.any(np.diff(offsets) <= 0) or offsets[-1] > len(data)):
      raise ValueError(f'{p}: offsets must be increasing from 0 to at most '
                       f'len(jpeg_bytes)={len(data)} with N+1 entries.')
    n = len(offsets) - 1
    val_count = int(val_count)
    if not 0 < val_count < n:
      raise ValueError(f'data.val_count={val_count} must be in [1, {n - 1}] '
                       f'for {p} ({n} images).')
    start, stop = (0, n - val_count) if split == 'train' else (n - val_count, n)
    self.path, self.split, self.val_count = p, split, val_count
    self._data, self._offsets = data, offsets
    self._start, self._len = start, stop - start
    self.labels = np.zeros(self._len, np.int32)
    self.num_classes, self.class_names = 1, ('unlabelled',)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    j = self._start + self._index(index)
    raw = self._data[self._offsets[j]:self._offsets[j + 1]].tobytes()
    where = f'{self.path} image #{j}'
    try:
      with Image.open(io.BytesIO(raw)) as img:
        image = np.asarray(img.convert('RGB'))
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'{where}: cannot decode JPEG ({e}).') from e
    return {'image': image, 'label': np.int32(0)}
