"""What every data source shares: the task names, label checks and the ``_Base`` class."""
from __future__ import annotations

from typing import Any

import numpy as np

CLASSIFICATION = "classification"
SEGMENTATION = "segmentation"


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
