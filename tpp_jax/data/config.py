"""The ``data`` config block as a typed, validated view.

The fields and their defaults are ``defaults()`` (``tpp_jax.config.base_config().data``,
the one schema); a partial block (a plain dict in tests, an
older run's config.json) takes the fields it lacks from there. ``resolve``
only checks values and converts them to the ``DataConfig`` types.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

from tpp_jax.data import medical

SOURCES = ("npz", "seg_folder", "class_folder", "tfds", "jpeg_npz")
CACHE_MODES = ("auto", "on", "off")
CACHE_BUDGET = 2 << 30  # bytes of decoded images per split that 'auto' caches
_MISSING = object()


def lookup(cfg: Any, name: str, default: Any = None,
           keep_none: bool = False) -> Any:
  """``cfg.a.b`` of a ConfigDict / dict / object; missing (or None) -> default.

  With ``keep_none`` an explicit None is returned as None (only a missing
  field takes the default).
  """
  node = cfg
  for key in name.split("."):
    if node is None or node is _MISSING:
      return default
    if isinstance(node, Mapping):
      node = node.get(key, _MISSING)
    elif callable(getattr(node, "get", None)):  # ConfigDict
      node = node.get(key, _MISSING)
    else:
      node = getattr(node, key, _MISSING)
  if node is _MISSING or (node is None and not keep_none):
    return default
  return node


def defaults() -> dict:
  """The data block's fields and defaults: the one data schema (``base_config().data``); resolve() reads it (a
  partial block takes the rest from here)."""
  return dict(
    source="npz",              # npz | seg_folder | class_folder | tfds | jpeg_npz (tpp_jax.data.sources)
    path="",                   # the .npz file or data folder (not used by tfds)
    image_size=224, channels=3,  # square model input side; 1 (grey) or 3 channels
    mean=(0.5,), std=(0.5,),   # (x/255 - mean)/std; 1 value (broadcast) or one per channel
    augment=dict(
        crop_scale=(0.7, 1.0),     # random-resized-crop area fractions; None = plain resize
        crop_ratio=(3 / 4, 4 / 3),  # its aspect-ratio range
        hflip=True, vflip=False, rotate=0.0,  # rotate: max degrees
        intensity=0.0,             # brightness/contrast jitter strength in [0, 1)
        on_device=False),         # crop / flips / normalisation in the jitted train step (the host ships uint8)
    balance=False,             # class-balanced sampling of the training split
    tfds_name="", tfds_data_dir="",
    tfds_image_key="image", tfds_label_key="label", tfds_mask_key="mask",
    tfds_splits="",            # "" = the dataset's splits; or "train=train[:90%],val=train[90%:]"
    val_count=1000,            # jpeg_npz: the last N images are the val split
    max_train_examples=0, max_eval_examples=0,  # fixed random subsets (0 = all)
    label_fraction=1.0,        # stages that need labels train on this stratified fraction of the train split,
                               # drawn by seed (after max_train_examples); stage pipeline: set per arm
    workers="0",               # training-input processes (grain multiprocessing): "auto" | "0" (in-process) | "N"
    prefetch=2,                # batches the training iterator reads ahead (0 = none)
    cache="auto",              # decoded images in memory: "auto" (split fits 2 GiB) | "on" | "off"
    window=None,               # (center, width) mapping raw DICOM / 16-bit / NIfTI values to 0..255; None = the
                               # DICOM file's own window, else min..max (tpp_jax.data.medical)
    slice_axis=-1,             # seg_folder NIfTI volumes: the axis cut into 2-D slices
    skip_empty_slices=False,   # seg_folder NIfTI volumes: drop slices whose mask has no foreground (every split)
  )


@functools.lru_cache(maxsize=1)
def _defaults():
  return defaults()


@dataclasses.dataclass(frozen=True)
class Augment:
  """Resolved ``data.augment``; the class defaults are NO augmentation
  (``RecordTransform``'s eval path), not the config defaults."""
  crop_scale: tuple[float, float] | None = None
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  hflip: bool = False
  vflip: bool = False
  rotate: float = 0.0
  intensity: float = 0.0
  on_device: bool = False  # crop / flips / normalisation in the train step (tpp_jax.data.device_augment)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Resolved and validated ``data`` config (defaults: base_config)."""
  source: str
  path: str
  image_size: int
  channels: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  augment: Augment
  balance: bool
  tfds_name: str
  tfds_data_dir: str | None
  tfds_image_key: str
  tfds_label_key: str
  tfds_mask_key: str
  tfds_splits: Mapping[str, str] | None
  val_count: int
  max_train_examples: int
  max_eval_examples: int
  prefetch: int
  cache: str
  window: tuple[float, float] | None
  slice_axis: int
  skip_empty_slices: bool


def _per_channel(value: Any, channels: int, field: str) -> tuple[float, ...]:
  if isinstance(value, (int, float)):
    values = [float(value)]
  else:
    values = [float(v) for v in value]
  if len(values) == 1:
    values = values * channels
  if len(values) != channels:
    raise ValueError(f"data.{field}={list(value)} has {len(values)} values but "
                     f"data.channels={channels}; give 1 or {channels} values.")
  return tuple(values)


def _pair(value: Any, field: str) -> tuple[float, float]:
  try:
    lo, hi = (float(v) for v in value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{field}={value!r} must be a pair (lo, hi).") from e
  return lo, hi


def check_cache(value: Any) -> str:
  """``data.cache`` -> 'auto' | 'on' | 'off'; anything else raises one ValueError."""
  text = value.strip().lower() if isinstance(value, str) else None
  if text not in CACHE_MODES:
    raise ValueError(
        f"data.cache={value!r}: use 'auto' (decode a split into memory when it "
        f"fits {CACHE_BUDGET / 2**30:g} GiB), 'on' or 'off' "
        "(e.g. --config.data.cache=off).")
  return text


def parse_splits(value: Any) -> dict[str, str] | None:
  """``data.tfds_splits``: '' / None -> None (the dataset's splits), a dict,
  or 'train=train[:90%],val=train[90%:]' -> {'train': ..., 'val': ...}."""
  if not value:
    return None
  if hasattr(value, "items"):
    return {str(k): str(v) for k, v in value.items()}
  out = {}
  for part in str(value).split(","):
    name, sep, spec = part.partition("=")
    if not sep or not name.strip() or not spec.strip():
      raise ValueError(
          f"data.tfds_splits={value!r}: give comma-separated name=tfds_split "
          "pairs, e.g. 'train=train[:90%],val=train[90%:]', or '' for the "
          "dataset's own splits.")
    out[name.strip()] = spec.strip()
  return out


def resolve(data_cfg: Any) -> DataConfig:
  """``data_cfg`` (ConfigDict / dict / None) -> a validated ``DataConfig``;
  missing fields take ``base_config().data``'s values."""
  if isinstance(data_cfg, DataConfig):
    return data_cfg
  defaults = _defaults()

  def get(name, keep_none=False):
    return lookup(data_cfg, name, lookup(defaults, name), keep_none)

  source = str(get("source"))
  if source not in SOURCES:
    raise ValueError(f"data.source={source!r} is not one of {list(SOURCES)}.")
  size = get("image_size")
  if isinstance(size, (tuple, list)):
    if len(size) != 2 or size[0] != size[1]:
      raise ValueError(f"data.image_size={size!r}: only square inputs are "
                       "supported; give one int.")
    size = size[0]
  size = int(size)
  if size <= 0:
    raise ValueError(f"data.image_size={size} must be positive.")
  channels = int(get("channels"))
  if channels not in (1, 3):
    raise ValueError(f"data.channels={channels} must be 1 or 3.")
  mean = _per_channel(get("mean"), channels, "mean")
  std = _per_channel(get("std"), channels, "std")
  if min(std) <= 0:
    raise ValueError(f"data.std={list(std)} must be positive.")
  crop_scale = get("augment.crop_scale", keep_none=True)  # None: plain resize
  if crop_scale is not None:
    crop_scale = _pair(crop_scale, "data.augment.crop_scale")
    if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
      raise ValueError(f"data.augment.crop_scale={crop_scale} must satisfy "
                       "0 < lo <= hi <= 1 (fractions of the image area).")
  crop_ratio = _pair(get("augment.crop_ratio"), "data.augment.crop_ratio")
  if not 0 < crop_ratio[0] <= crop_ratio[1]:
    raise ValueError(f"data.augment.crop_ratio={crop_ratio} must satisfy "
                     "0 < lo <= hi.")
  rotate = float(get("augment.rotate"))
  intensity = float(get("augment.intensity"))
  if rotate < 0 or intensity < 0 or intensity >= 1:
    raise ValueError("data.augment.rotate must be >= 0 degrees and "
                     "data.augment.intensity in [0, 1); got "
                     f"{rotate}, {intensity}.")
  on_device = get("augment.on_device")
  if not isinstance(on_device, bool):
    raise ValueError(f"data.augment.on_device={on_device!r} must be True or "
                     "False.")
  if on_device and (rotate or intensity):
    raise ValueError(
        "data.augment.on_device=True does the crop, flips and normalisation "
        "in the train step, not rotation or intensity jitter: set "
        "data.augment.rotate=0 and data.augment.intensity=0, or "
        "data.augment.on_device=False.")
  augment = Augment(crop_scale=crop_scale, crop_ratio=crop_ratio,
                    hflip=bool(get("augment.hflip")),
                    vflip=bool(get("augment.vflip")),
                    rotate=rotate, intensity=intensity, on_device=on_device)
  prefetch = int(get("prefetch"))
  if prefetch < 0:
    raise ValueError(f"data.prefetch={prefetch} must be >= 0 (batches read "
                     "ahead by the training iterator; 0 = none).")
  data_dir = get("tfds_data_dir")
  return DataConfig(
      source=source, path=str(get("path") or ""), image_size=size,
      channels=channels, mean=mean, std=std, augment=augment,
      balance=bool(get("balance")), tfds_name=str(get("tfds_name") or ""),
      tfds_data_dir=str(data_dir) if data_dir else None,
      tfds_image_key=str(get("tfds_image_key")),
      tfds_label_key=str(get("tfds_label_key")),
      tfds_mask_key=str(get("tfds_mask_key")),
      tfds_splits=parse_splits(get("tfds_splits")),
      val_count=int(get("val_count")),
      max_train_examples=int(get("max_train_examples")),
      max_eval_examples=int(get("max_eval_examples")),
      prefetch=prefetch, cache=check_cache(get("cache")),
      window=medical.check_window(get("window", keep_none=True)), slice_axis=_slice_axis(get("slice_axis")),
      skip_empty_slices=bool(get("skip_empty_slices")))


def _slice_axis(value: Any) -> int:
  axis = int(value)
  if not -3 <= axis < 3:
    raise ValueError(f"data.slice_axis={value} is out of range for 3-D volumes; use 0, 1 or 2 (or -1, the last).")
  return axis
