"""Decoded images of a split, shared with grain workers (``ImageStore``, one per split for ``data.cache``)."""
from __future__ import annotations

import concurrent.futures
import os
import tempfile
import weakref
from typing import Callable

import numpy as np

from tpp_jax.data import config as config_lib

# Stores at least this big reach spawned workers as a shared file mapping.
SHARE_BYTES = 32 << 20


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
