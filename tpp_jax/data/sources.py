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
"""
from __future__ import annotations

import concurrent.futures
import csv
import io
import os
import pathlib
import re
import struct
import tempfile
import weakref
import zipfile
import zlib
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from tpp_jax.data import config as config_lib

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
CLASSIFICATION = "classification"
SEGMENTATION = "segmentation"
# Stores at least this big reach spawned workers as a shared file mapping.
SHARE_BYTES = 32 << 20

__all__ = [
    "NpzSource", "SegFolderSource", "ClassFolderSource", "TfdsSource",
    "JpegNpzSource", "ImageStore", "source_labels", "check_path",
    "open_npz", "read_npz_member", "IMAGE_EXTENSIONS",
]


# ----------------------------------------------------------------------------
# Decoded images of a split, shared with grain workers.
# ----------------------------------------------------------------------------
def _remove(path: str) -> None:
  try:
    os.remove(path)
  except OSError:
    pass


class _Column:
  """One key's uint8 arrays: ``data`` (N, *shape), or flat + offsets/shapes.

  ``file`` = (path, byte offset) when ``data`` is a read-only mapping of a
  file; pickles then carry the path, not the bytes.
  """

  def __init__(self, data: np.ndarray, offsets: np.ndarray | None = None,
               shapes: np.ndarray | None = None,
               file: tuple[str, int] | None = None):
    if data.flags.writeable:
      data = data.view()
      data.setflags(write=False)
    self.data, self.offsets, self.shapes, self.file = data, offsets, shapes, file

  @classmethod
  def mapped(cls, path: str, offset: int, shape: tuple[int, ...], **kw):
    data = np.memmap(path, np.uint8, "r", offset=offset, shape=shape)
    return cls(np.asarray(data), file=(str(path), int(offset)), **kw)

  def __len__(self) -> int:
    return len(self.data) if self.offsets is None else len(self.offsets) - 1

  def __getitem__(self, i: int) -> np.ndarray:
    if self.offsets is None:
      return self.data[i]
    return self.data[self.offsets[i]:self.offsets[i + 1]].reshape(
        self.shapes[i])

  def share(self) -> None:
    """Moves ``data`` into a temporary file mapped read-only (once).

    The file lives in ``tempfile.gettempdir()`` and is removed when this
    object is garbage-collected or at exit.
    """
    if self.file is not None:
      return
    fd, path = tempfile.mkstemp(prefix="tpp_jax_images_", suffix=".u8")
    weakref.finalize(self, _remove, path)
    with os.fdopen(fd, "wb") as f:
      np.ascontiguousarray(self.data).tofile(f)
    mapped = _Column.mapped(path, 0, self.data.shape)
    self.data, self.file = mapped.data, mapped.file

  def __getstate__(self):
    if self.data.nbytes >= SHARE_BYTES:
      try:
        self.share()
      except OSError:  # no writable temp dir: pickle the bytes instead
        pass
    state = dict(self.__dict__)
    if self.file is not None:
      state["data"] = self.data.shape
    return state

  def __setstate__(self, state):
    if state["file"] is not None:
      path, offset = state["file"]
      state["data"] = np.asarray(
          np.memmap(path, np.uint8, "r", offset=offset, shape=state["data"]))
    self.__dict__.update(state)


def _threads() -> int:
  """Decoding threads: the usable cores, at most 8."""
  return min(8, len(os.sched_getaffinity(0)) if hasattr(
      os, "sched_getaffinity") else (os.cpu_count() or 1))


class ImageStore:
  """Decoded uint8 arrays of one split (keys e.g. 'image', 'mask').

  ``ImageStore.decode(fn, n)`` decodes every item once, up front, in the
  calling (parent) process with a thread pool (PIL releases the GIL while
  decoding) into one buffer per key: (N, H, W, C) when all items have the
  first item's shape, else one flat buffer with offsets. Items are read-only
  views. grain workers are spawned processes that receive the source by
  pickle: a buffer of at least ``SHARE_BYTES`` is then written once to a
  temporary file that the parent and every worker memory-map read-only, so the
  workers share one copy (the page cache) instead of each holding a pickled
  copy; smaller buffers are pickled with the source.
  """

  def __init__(self, columns: dict[str, _Column]):
    self.columns = columns
    self._n = len(next(iter(columns.values())))

  @classmethod
  def decode(cls, fn: Callable[[int], dict[str, np.ndarray]], n: int,
             first: dict[str, np.ndarray] | None = None,
             threads: int | None = None) -> 'ImageStore':
    """Decodes ``fn(i)`` (a dict of uint8 arrays) for i < n into one store."""
    first = fn(0) if first is None else first
    bufs = {k: np.empty((n,) + a.shape, np.uint8) for k, a in first.items()}
    odd: dict[str, dict[int, np.ndarray]] = {k: {} for k in first}

    def fill(lo: int, hi: int) -> None:
      for i in range(lo, hi):
        for k, a in (first if i == 0 else fn(i)).items():
          if a.shape == bufs[k].shape[1:]:
            bufs[k][i] = a
          else:
            odd[k][i] = a

    threads = threads or _threads()
    step = max(1, min(512, -(-n // (4 * threads))))
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      futures = [pool.submit(fill, lo, min(lo + step, n))
                 for lo in range(0, n, step)]
      try:
        for f in futures:
          f.result()
      except BaseException:
        for f in futures:
          f.cancel()
        raise
    columns = {}
    for k, buf in bufs.items():
      if not odd[k]:
        columns[k] = _Column(buf)
        continue
      items = [odd[k][i] if i in odd[k] else buf[i] for i in range(n)]
      shapes = np.asarray([a.shape for a in items], np.int64)
      offsets = np.concatenate([[0], np.cumsum(shapes.prod(axis=1))])
      flat = np.empty(int(offsets[-1]), np.uint8)
      for i, a in enumerate(items):
        flat[offsets[i]:offsets[i + 1]] = a.reshape(-1)
      del items
      columns[k] = _Column(flat, offsets, shapes)
    return cls(columns)

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {k: c[i] for k, c in self.columns.items()}

  @property
  def nbytes(self) -> int:
    return sum(c.data.nbytes for c in self.columns.values())


def _image_store(cache: str, n: int,
                 decode: Callable[[int], dict[str, np.ndarray]]
                 ) -> ImageStore | None:
  """The split's store for ``data.cache``, or None (decode per item).

  'auto' caches when the first item's decoded bytes x n fit
  ``config.CACHE_BUDGET``.
  """
  mode = config_lib.check_cache(cache)
  if mode == "off":
    return None
  first = decode(0)
  size = sum(a.nbytes for a in first.values()) * n
  if mode == "auto" and size > config_lib.CACHE_BUDGET:
    return None
  return ImageStore.decode(decode, n, first=first)


def _stored_npy(path: pathlib.Path, key: str
                ) -> tuple[int, tuple[int, ...], np.dtype] | None:
  """(byte offset, shape, dtype) of an uncompressed C-order ``key`` in an npz.

  None when the member is compressed (np.savez_compressed) or Fortran-order.
  """
  with zipfile.ZipFile(path) as zf:
    info = zf.getinfo(key + ".npy")
  if info.compress_type != zipfile.ZIP_STORED:
    return None
  with open(path, "rb") as f:
    f.seek(info.header_offset)
    local = f.read(30)
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    f.seek(info.header_offset + 30 + name_len + extra_len)
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
      shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if fortran and len(shape) > 1:
      return None
    return f.tell(), tuple(shape), dtype


# ----------------------------------------------------------------------------
# Shared helpers.
# ----------------------------------------------------------------------------
def check_path(path: os.PathLike | str | None, field: str,
                  what: str) -> pathlib.Path:
  """Returns ``path`` as a Path, or raises naming the config field."""
  if path is None or str(path) == "":
    raise ValueError(f"{field} is not set: point it at {what} "
                     f"(e.g. --config.{field}=/path/to/data).")
  p = pathlib.Path(path).expanduser()
  if not p.exists():
    raise FileNotFoundError(
        f"{field}: {p} does not exist. Set --config.{field} to {what}.")
  return p


NPZ_FIX = "download it again or re-create it with np.savez"


def open_npz(path: pathlib.Path, field: str = "data.path",
             fix: str = NPZ_FIX) -> Any:
  """``np.load(path, allow_pickle=False)`` of an .npz file.

  A file that is not a zip archive (random bytes, a cut-short download, an
  .npy / pickle renamed .npz) raises one ValueError naming it and ``fix``
  (np.load would call it 'pickled data').
  """
  path = pathlib.Path(path)
  try:
    is_zip = zipfile.is_zipfile(path)
    with open(path, "rb") as f:
      head = f.read(6)
  except OSError as e:
    raise ValueError(f"{field}: {path} cannot be read ({e}).") from None
  if not is_zip:
    why = ("a zip archive cut short: truncated" if head[:4] == b"PK\x03\x04"
           else "an .npy file, not an .npz" if head == b"\x93NUMPY"
           else "not a zip archive")
    raise ValueError(f"{field}: {path} is not a valid .npz file ({why}); "
                     f"{fix}.")
  try:
    return np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{field}: {path} is not a readable .npz file ({e}); "
                     f"{fix}.") from None


def read_npz_member(npz: Any, key: str, path: pathlib.Path,
                    field: str = "data.path", fix: str = NPZ_FIX
                    ) -> np.ndarray:
  """``npz[key]``; a corrupt member or object data -> ValueError naming it."""
  try:
    return npz[key]
  except ValueError as e:
    if "pickle" in str(e):  # object arrays
      raise ValueError(f"{field}: {path} [{key}] holds Python objects that "
                       f"need pickle ({e}); save it as a plain numeric array."
                       ) from None
    raise ValueError(f"{field}: {path} [{key}] is corrupt ({e}); {fix}."
                     ) from None
  except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise ValueError(f"{field}: {path} [{key}] is corrupt ({e}); {fix}."
                     ) from None


def _as_hwc(image: np.ndarray, where: str) -> np.ndarray:
  """(H, W) or (H, W, C) with C in {1, 3} -> (H, W, C) uint8."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(
        f"{where}: expected a grey (H, W) / (H, W, 1) or RGB (H, W, 3) image, "
        f"got shape {image.shape}. Convert the images to 1 or 3 channels.")
  return _as_uint8(image, where)


def _as_uint8(x: np.ndarray, where: str) -> np.ndarray:
  if x.dtype == np.uint8:
    return x
  if np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.bool_):
    if x.size and (x.min() < 0 or x.max() > 255):
      raise ValueError(f"{where}: integer values outside 0..255 "
                       f"(dtype {x.dtype}); store images as uint8.")
    return x.astype(np.uint8)
  raise ValueError(f"{where}: images must be uint8 0..255, got dtype "
                   f"{x.dtype}. Store them as uint8, e.g. "
                   "(x * 255).round().astype(uint8).")


def _pil_to_array(img: Image.Image, where: str) -> np.ndarray:
  """Decoded PIL image -> uint8 (H, W, 1|3)."""
  if img.mode in ("L", "RGB"):
    pass
  elif img.mode in ("LA", "1"):
    img = img.convert("L")
  elif img.mode in ("RGBA", "P", "CMYK", "YCbCr", "LAB", "HSV", "PA", "RGBX"):
    img = img.convert("RGB")
  else:
    raise ValueError(
        f"{where}: unsupported image mode {img.mode!r} (e.g. 16-bit). "
        "Save the image as 8-bit grey (L) or RGB.")
  return _as_hwc(np.asarray(img), where)


# What PIL raises for a file it cannot decode (UnidentifiedImageError and
# 'image file is truncated' are OSErrors).
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error,
               Image.DecompressionBombError)


def _open_image(path: pathlib.Path, what: str = "image",
                fix: str = "replace it or delete it", load: bool = True
                ) -> Image.Image:
  """``Image.open`` (+ full decode with ``load``); a bad file -> ValueError.

  The message names the file and the fix; a missing file stays a
  FileNotFoundError.
  """
  img = None
  try:
    img = Image.open(path)
    if load:
      img.load()
    return img
  except FileNotFoundError:
    raise
  except _PIL_ERRORS as e:
    if img is not None:
      img.close()
    reason = str(e).replace(f"'{path}'", "").strip() or type(e).__name__
    raise ValueError(f"{what} {path} cannot be decoded, the file is "
                     f"truncated or corrupt ({reason}); {fix}.") from None


def _decode_image(path: pathlib.Path, fix: str = "replace it or delete it"
                  ) -> np.ndarray:
  with _open_image(path, fix=fix) as img:
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
    raise ValueError(f"{where}: negative label {lo}; labels must be class "
                     "indices 0..num_classes-1.")
  if num_classes is not None and hi >= num_classes:
    raise ValueError(
        f"{where}: label {hi} is outside [0, {num_classes}) "
        f"(task.num_classes={num_classes}). Set task.num_classes to at least "
        f"{hi + 1} or fix the labels.")


def source_labels(source: Any) -> np.ndarray:
  """Integer labels of a classification source as an int32 (N,) array.

  Uses ``source.labels`` when available, otherwise reads every record.
  """
  labels = getattr(source, "labels", None)
  if labels is not None:
    return np.asarray(labels, np.int32)
  return np.asarray([int(source[i]["label"]) for i in range(len(source))],
                    np.int32)


class _Base:
  """Common bits: ``task``, ``num_classes``, ``class_names``, ``__repr__``."""

  task: str = CLASSIFICATION
  num_classes: int | None = None
  class_names: tuple[str, ...] | None = None
  split: str = ""

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(split={self.split!r}, n={len(self)}, "
            f"task={self.task!r}, num_classes={self.num_classes})")

  def __iter__(self):
    for i in range(len(self)):
      yield self[i]

  def gather(self, indices: np.ndarray) -> dict[str, np.ndarray] | None:
    """{'image': (n, H, W, C) uint8, 'label': (n,) int32} of these items in one fancy index, when the split is
    decoded into memory (data.cache) with one image shape and has class labels; else None (read item by item)."""
    store = getattr(self, "_store", None)
    labels = getattr(self, "labels", None)
    if (store is None or labels is None or set(store.columns) != {"image"}
        or store.columns["image"].offsets is not None):
      return None
    indices = np.asarray(indices)
    return {"image": store.columns["image"].data[indices], "label": np.asarray(labels, np.int32)[indices]}

  def _index(self, index: int) -> int:
    n = len(self)
    index = int(index)
    if index < 0:
      index += n
    if not 0 <= index < n:
      raise IndexError(f"index {index} out of range for {self!r}")
    return index


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


# ----------------------------------------------------------------------------
# Image + mask folders with split.csv.
# ----------------------------------------------------------------------------
_SEG_FIX = "replace it, or remove its row from split.csv"


class SegFolderSource(_Base):
  """Segmentation pairs listed in ``root/split.csv`` (``image,mask,split``).

  Paths in the csv are relative to ``root``. Masks with values {0, 255} are
  binarised (``> 127 -> 1``); other masks are kept as class indices. With
  ``cache`` on (see ``ImageStore``) every pair is decoded once at construction;
  off, each read decodes with PIL.
  """

  task = SEGMENTATION

  def __init__(self, root: os.PathLike | str, split: str,
               num_classes: int | None = None,
               class_names: Sequence[str] | None = None,
               cache: str = "auto", field: str = "data.path"):
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
      rows = list(reader)
    splits = sorted({r["split"] for r in rows})
    rows = [r for r in rows if r["split"] == split]
    if not rows:
      raise ValueError(f"{csv_path}: no rows with split={split!r} "
                       f"(splits present: {splits}).")
    self.root, self.split = root, split
    self.image_paths = [root / r["image"] for r in rows]
    self.mask_paths = [root / r["mask"] for r in rows]
    for ip, mp in zip(self.image_paths, self.mask_paths):
      for q in (ip, mp):
        if not q.is_file():
          raise FileNotFoundError(f"{csv_path}: listed file {q} does not exist;"
                                  " fix split.csv or add the file.")
      with _open_image(ip, fix=_SEG_FIX, load=False) as im, _open_image(
          mp, "mask", _SEG_FIX, load=False) as mk:  # headers only
        if im.size != mk.size:
          raise ValueError(
              f"mask {mp} is {mk.size[0]}x{mk.size[1]} (WxH) but its image {ip}"
              f" is {im.size[0]}x{im.size[1]}; every mask must have the size "
              "of its image.")
        if mk.mode not in ("L", "P", "1", "I", "I;16", "LA", "RGB", "RGBA"):
          raise ValueError(f"mask {mp}: unsupported mode {mk.mode!r}; save "
                           "masks as single-channel 8-bit PNG.")
    self.num_classes = num_classes if num_classes is not None else 2
    if class_names:
      self.class_names = tuple(class_names)
    elif self.num_classes == 2:
      self.class_names = ("background", "foreground")
    self._store = _image_store(cache, len(self.image_paths), self._decode)
    if self._store is None:  # not decoded up front: still check every mask now
      self._check_masks()

  def __len__(self) -> int:
    return len(self.image_paths)

  def _check_masks(self) -> None:
    """Decodes every mask once (not kept): a class id >= num_classes or an
    unreadable mask raises here, before any training step."""
    with concurrent.futures.ThreadPoolExecutor(_threads()) as pool:
      for _ in pool.map(self._load_mask, self.mask_paths):
        pass

  def _load_mask(self, path: pathlib.Path) -> np.ndarray:
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
    rec = {"image": _decode_image(self.image_paths[index], _SEG_FIX),
           "mask": self._load_mask(self.mask_paths[index])}
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


# ----------------------------------------------------------------------------
# root/split/class_name/*.png folders.
# ----------------------------------------------------------------------------
class ClassFolderSource(_Base):
  """Classification images in ``root/split/class_name/*.{png,jpg,jpeg}``.

  Class index = position in the sorted class names, taken over the union of
  the class folders of every split folder under ``root`` (so a split missing
  a class keeps the same indices), unless ``class_names`` is given. With
  ``cache`` on (see ``ImageStore``) the images are decoded once at
  construction; off, each read decodes with PIL.
  """

  def __init__(self, root: os.PathLike | str, split: str,
               num_classes: int | None = None,
               class_names: Sequence[str] | None = None,
               cache: str = "auto", field: str = "data.path"):
    config_lib.check_cache(cache)
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
      files = sorted(f for f in d.iterdir()
                     if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
      paths.extend(files)
      labels.extend([c] * len(files))
    if not paths:
      raise ValueError(f'{split_dir}: no {"/".join(IMAGE_EXTENSIONS)} images '
                       'in its class folders.')
    self.paths = paths
    self.labels = np.asarray(labels, np.int32)
    self._store = _image_store(cache, len(paths), self._decode)

  def __len__(self) -> int:
    return len(self.paths)

  def _decode(self, index: int) -> dict[str, np.ndarray]:
    return {"image": _decode_image(self.paths[index])}

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = self._index(index)
    rec = (self._decode(index) if self._store is None else
           self._store[index])
    rec["label"] = self.labels[index]
    return rec


# ----------------------------------------------------------------------------
# TFDS (array_record, no TensorFlow).
# ----------------------------------------------------------------------------
def _base_split_names(split: str) -> list[str]:
  """'train[:90%]+validation' -> ['train', 'validation']."""
  return [re.split(r"[\[(]", s.strip())[0] for s in split.split("+")]


class TfdsSource(_Base):
  """A prepared TFDS dataset in ``array_record`` format, read without TF.

  The dataset must already be prepared in ``data_dir`` (``tfds build
  --file_format=array_record`` or ``builder.download_and_prepare``). The
  record is mapped to our dict: ``image_key`` -> 'image', and ``mask_key`` ->
  'mask' when that feature exists (segmentation), else ``label_key`` ->
  'label' (classification).
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None,
               image_key: str = "image", label_key: str = "label",
               mask_key: str = "mask", num_classes: int | None = None,
               field: str = "data.tfds_name"):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    if not name:
      raise ValueError(f"{field} is not set: give the TFDS dataset name "
                       "(e.g. --config.data.tfds_name=my_dataset).")
    if data_dir is not None:
      check_path(data_dir, "data.tfds_data_dir",
                    "the folder holding the prepared TFDS dataset")
      data_dir = str(data_dir)
    try:
      builder = tfds.builder(name, data_dir=data_dir,
                             file_format="array_record")
    except Exception as e:  # pylint: disable=broad-except
      first_line = (str(e).strip().splitlines() or [""])[0]  # no catalogue
      raise ValueError(
          f"{field}={name!r}: cannot find the TFDS dataset in "
          f"data.tfds_data_dir={data_dir} ({type(e).__name__}: "
          f"{first_line}). Prepare it"
          " with `tfds build --file_format=array_record` or set "
          "data.tfds_data_dir to where it was prepared.") from e
    info = builder.info
    prepared = getattr(builder, "is_prepared", None)
    if (prepared() if callable(prepared) else bool(info.splits)) is False:
      raise FileNotFoundError(
          f"{field}={name!r} is not prepared in data.tfds_data_dir={data_dir}."
          " Prepare it with `tfds build --file_format=array_record` (or "
          "builder.download_and_prepare(file_format='array_record')).")
    available = sorted(info.splits.keys())
    for s in _base_split_names(split):
      if s not in available:
        raise ValueError(f"{field}={name!r}: no split {s!r} (splits: "
                         f"{available}).")
    features = info.features
    keys = set(features.keys()) if hasattr(features, "keys") else set()
    if image_key not in keys:
      raise ValueError(f"{field}={name!r}: no image feature {image_key!r} "
                       f"(features: {sorted(keys)}); set "
                       "data.tfds_image_key.")
    if mask_key and mask_key in keys:
      self.task, self._target_key = SEGMENTATION, mask_key
      self._out_key = "mask"
    elif label_key in keys:
      self.task, self._target_key = CLASSIFICATION, label_key
      self._out_key = "label"
    else:
      raise ValueError(
          f"{field}={name!r}: no label feature {label_key!r} nor mask feature "
          f"{mask_key!r} (features: {sorted(keys)}); set data.tfds_label_key "
          "or data.tfds_mask_key.")
    feat = features[self._target_key]
    known = getattr(feat, "num_classes", None)
    names = getattr(feat, "names", None)
    if known is not None and num_classes is not None and known > num_classes:
      raise ValueError(f"{field}={name!r}: {self._target_key!r} has {known} "
                       f"classes but task.num_classes={num_classes}.")
    self.num_classes = num_classes if num_classes is not None else known
    self.class_names = tuple(names) if names else None
    try:
      self._ds = builder.as_data_source(split=split)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(
          f"{field}={name!r}: cannot open split {split!r} as an array_record "
          f"data source ({type(e).__name__}: {e}). Re-prepare it with "
          "file_format='array_record'.") from e
    self.name, self.split, self.data_dir = name, split, data_dir
    self._image_key = image_key
    self._labels: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self._ds)

  def _convert(self, rec: dict[str, Any], index: int) -> dict[str, np.ndarray]:
    where = f"tfds {self.name}[{self.split}] #{index}"
    out = {"image": _as_hwc(np.asarray(rec[self._image_key]), where)}
    target = np.asarray(rec[self._target_key])
    if self._out_key == "label":
      if target.ndim:
        raise ValueError(f"{where}: label {self._target_key!r} has shape "
                         f"{target.shape}; only single-label (scalar) "
                         "classification is supported.")
      _check_labels(target, self.num_classes, where)
      out["label"] = np.int32(target)
    else:
      if target.ndim == 3 and target.shape[-1] == 1:
        target = target[..., 0]
      if target.shape != out["image"].shape[:2]:
        raise ValueError(f'{where}: mask shape {target.shape} does not match '
                         f'image {out["image"].shape[:2]}.')
      mask = _binarise_or_keep(target)
      if self.num_classes is not None and mask.size and (
          int(mask.max()) >= self.num_classes):
        raise ValueError(f"{where}: mask class {int(mask.max())} outside "
                         f"[0, {self.num_classes}).")
      out["mask"] = mask
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
  ``val_count``. Images are decoded with PIL ``.convert('RGB')``: once at
  construction with ``cache`` on (see ``ImageStore``; the JPEG bytes are then
  dropped), else per item from the split's bytes. Every label is 0.
  """

  SPLITS = ("train", "val")

  def __init__(self, path: os.PathLike | str, split: str,
               val_count: int = 1000, cache: str = "auto",
               field: str = "data.path"):
    config_lib.check_cache(cache)
    p = check_path(path, field, "an .npz with jpeg_bytes and offsets")
    if split not in self.SPLITS:
      raise ValueError(f"data.source=jpeg_npz has splits {self.SPLITS}, not "
                       f"{split!r}.")
    with open_npz(p, field) as npz:
      missing = [k for k in ("jpeg_bytes", "offsets") if k not in npz.files]
      if missing:
        raise ValueError(f"{field}: {p} has no key(s) {missing} (keys: "
                         f"{sorted(npz.files)}); data.source=jpeg_npz needs "
                         "jpeg_bytes (uint8) and offsets (N+1,).")
      data = read_npz_member(npz, "jpeg_bytes", p, field)
      offsets = read_npz_member(npz, "offsets", p, field).astype(np.int64)
    if data.dtype != np.uint8 or data.ndim != 1:
      raise ValueError(f"{p}: jpeg_bytes must be a flat uint8 array, got "
                       f"{data.dtype} {data.shape}.")
    if (offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0 or
        np.any(np.diff(offsets) <= 0) or offsets[-1] > len(data)):
      raise ValueError(f"{p}: offsets must be increasing from 0 to at most "
                       f"len(jpeg_bytes)={len(data)} with N+1 entries.")
    n = len(offsets) - 1
    val_count = int(val_count)
    if not 0 < val_count < n:
      raise ValueError(f"data.val_count={val_count} must be in [1, {n - 1}] "
                       f"for {p} ({n} images).")
    start, stop = (0, n - val_count) if split == "train" else (n - val_count, n)
    self.path, self.split, self.val_count = p, split, val_count
    offsets = offsets[start:stop + 1]
    self._bytes = _Column(data[offsets[0]:offsets[-1]].copy(),  # this split's
                          offsets - offsets[0], np.diff(offsets)[:, None])
    del data
    self._start, self._len = start, stop - start
    self.labels = np.zeros(self._len, np.int32)
    self.num_classes, self.class_names = 1, ("unlabelled",)
    self._store = _image_store(cache, self._len, self._decode)
    if self._store is not None:
      self._bytes = None

  def __len__(self) -> int:
    return self._len

  def _decode(self, index: int) -> dict[str, np.ndarray]:
    raw = self._bytes[index].tobytes()
    try:
      with Image.open(io.BytesIO(raw), formats=("JPEG",)) as img:
        image = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{self.path} image #{self._start + index}: cannot "
                       f"decode JPEG ({e}); the file is corrupt: {NPZ_FIX}."
                       ) from None
    return {"image": image}

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = self._index(index)
    rec = (self._decode(index) if self._store is None else
           self._store[index])
    rec["label"] = np.int32(0)
    return rec
