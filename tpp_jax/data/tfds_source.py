"""TFDS (array_record, no TensorFlow) data source."""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from tpp_jax.data.decode import _as_hwc, _binarise_or_keep
from tpp_jax.data.files import check_path
from tpp_jax.data.source_base import CLASSIFICATION, SEGMENTATION, _Base, _check_labels


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
