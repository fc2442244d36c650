"""Concatenated JPEG bytes in an .npz (pretrain_natural_64), unlabelled."""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from tpp_jax.data import config as config_lib
from tpp_jax.data.files import NPZ_FIX, check_path, open_npz, read_npz_member
from tpp_jax.data.image_store import _Column, _image_store
from tpp_jax.data.source_base import _Base


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
