"""Numpy/PIL transforms on one record, driven by an ``np.random.Generator``.

Geometric transforms (resize, random-resized-crop, flips, rotation) act
jointly on ``record['image']`` (bilinear) and ``record['mask']`` (nearest) so
that segmentation masks stay aligned. Records are never modified in place
(sources may hand out cached, read-only arrays).

``make_transform(data_cfg, train)`` builds the full per-example function
``fn(record, rng) -> record`` whose output has ``image`` float32 (S, S, C) and
``label`` int32 scalar or ``mask`` int32 (S, S).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np
from PIL import Image

from tpp_jax.data import config as config_lib

Record = dict[str, Any]

# ITU-R BT.601 luma weights.
LUMA_601 = np.asarray([0.299, 0.587, 0.114], np.float32)


def _to_pil(image: np.ndarray) -> Image.Image:
  """(H, W), (H, W, 1) or (H, W, 3) array -> PIL image (uint8: no checks)."""
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.dtype != np.uint8 or image.ndim not in (2, 3):
    return Image.fromarray(image)
  image = np.ascontiguousarray(image)
  mode = "L" if image.ndim == 2 else "RGB"
  return Image.frombuffer(mode, image.shape[1::-1], image, "raw", mode, 0, 1)


def _from_pil(img: Image.Image, channels: int) -> np.ndarray:
  """PIL image -> uint8 (H, W, channels); (H, W) for a grey one if channels
  is 0 (masks)."""
  if img.mode not in ("L", "RGB"):
    arr = np.asarray(img)
  else:
    w, h = img.size
    arr = np.frombuffer(img.tobytes(), np.uint8).reshape(
        (h, w) if img.mode == "L" else (h, w, 3))
  return arr[..., None] if channels == 1 and arr.ndim == 2 else arr


def _resize_pair(record: Record, size: int,
                 box: Sequence[float] | None = None) -> Record:
  """Resizes (the ``box`` crop of) image and mask to ``size`` x ``size``."""
  image = record["image"]
  out = dict(record)
  h, w = image.shape[:2]
  if box is None and (h, w) == (size, size):
    return out
  box = tuple(float(b) for b in box) if box is not None else None
  out["image"] = _from_pil(
      _to_pil(image).resize((size, size), Image.BILINEAR, box=box),
      image.shape[-1])
  if "mask" in record:
    out["mask"] = np.asarray(
        Image.fromarray(record["mask"]).resize((size, size), Image.NEAREST,
                                               box=box))
  return out


def resize(record: Record, size: int) -> Record:
  """Resizes image (PIL bilinear) and mask (nearest) to ``size`` x ``size``."""
  return _resize_pair(record, size)


def crop_box(rng: np.random.Generator, height: int, width: int,
             scale: tuple[float, float],
             ratio: tuple[float, float] = (3 / 4, 4 / 3)
             ) -> tuple[float, float, float, float]:
  """A random-resized-crop box (left, top, right, bottom), torchvision rule."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    cw = int(round(math.sqrt(target * aspect)))
    ch = int(round(math.sqrt(target / aspect)))
    if 0 < cw <= width and 0 < ch <= height:
      top = int(rng.integers(0, height - ch + 1))
      left = int(rng.integers(0, width - cw + 1))
      return left, top, left + cw, top + ch
  # Fallback: central crop with the aspect ratio clipped to ``ratio``.
  in_ratio = width / height
  if in_ratio < ratio[0]:
    cw, ch = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    ch, cw = height, int(round(height * ratio[1]))
  else:
    cw, ch = width, height
  top, left = (height - ch) // 2, (width - cw) // 2
  return left, top, left + cw, top + ch


def random_resized_crop(record: Record, rng: np.random.Generator, size: int,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Record:
  """Crops a random area fraction ``scale`` / aspect ``ratio``; resizes."""
  h, w = record["image"].shape[:2]
  return _resize_pair(record, size, crop_box(rng, h, w, scale, ratio))


def hflip(record: Record, rng: np.random.Generator, p: float = 0.5) -> Record:
  """Flips image and mask left-right with probability ``p``."""
  if rng.random() >= p:
    return record
  return {k: (v[:, ::-1] if k in ("image", "mask") else v)
          for k, v in record.items()}


def vflip(record: Record, rng: np.random.Generator, p: float = 0.5) -> Record:
  """Flips image and mask top-bottom with probability ``p``."""
  if rng.random() >= p:
    return record
  return {k: (v[::-1] if k in ("image", "mask") else v)
          for k, v in record.items()}


def rotate(record: Record, rng: np.random.Generator, degrees: float) -> Record:
  """Rotates image (bilinear) and mask (nearest) by U(-degrees, degrees).

  Corners uncovered by the rotation are filled with 0 (mask: background).
  """
  if degrees <= 0:
    return record
  angle = float(rng.uniform(-degrees, degrees))
  out = dict(record)
  image = np.ascontiguousarray(record["image"])
  out["image"] = _from_pil(
      _to_pil(image).rotate(angle, resample=Image.BILINEAR, fillcolor=0),
      image.shape[-1])
  if "mask" in record:
    out["mask"] = np.asarray(
        Image.fromarray(np.ascontiguousarray(record["mask"])).rotate(
            angle, resample=Image.NEAREST, fillcolor=0))
  return out


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
  """(H, W, C) -> (H, W, channels): grey->RGB by repeat, RGB->grey by luma."""
  c = image.shape[-1]
  if c == channels:
    return image
  if c == 1 and channels == 3:
    return np.repeat(image, 3, axis=-1)
  if c == 3 and channels == 1:
    grey = image.astype(np.float32) @ LUMA_601
    if image.dtype == np.uint8:
      grey = np.clip(np.round(grey), 0, 255).astype(np.uint8)
    return grey[..., None]
  raise ValueError(f"cannot convert a {c}-channel image to {channels} "
                   "channels; images must have 1 or 3 channels.")


def intensity_jitter(image: np.ndarray, rng: np.random.Generator,
                     strength: float) -> np.ndarray:
  """Random contrast then brightness factors in [1 - s, 1 + s] on 0..255."""
  x = image.astype(np.float32)
  if strength <= 0:
    return x
  contrast = rng.uniform(1 - strength, 1 + strength)
  brightness = rng.uniform(1 - strength, 1 + strength)
  mean = x.mean()
  x = (x - mean) * np.float32(contrast) + mean
  return np.clip(x * np.float32(brightness), 0.0, 255.0)


def normalize(image: np.ndarray, mean: Sequence[float],
              std: Sequence[float]) -> np.ndarray:
  """float32 ``(x / 255 - mean) / std`` with per-channel mean/std."""
  mean = np.asarray(mean, np.float32).reshape(-1)
  std = np.asarray(std, np.float32).reshape(-1)
  x = image.astype(np.float32)  # always a fresh array
  if np.all(mean == mean[0]) and np.all(std == std[0]):  # fast scalar path
    x *= np.float32(1 / 255) / std[0]
    x -= mean[0] / std[0]
  else:
    x *= np.float32(1 / 255) / std
    x -= mean / std
  return x


def _geometry(arr: np.ndarray, size: int, box: Sequence[float] | None,
              flip_h: bool, flip_v: bool, angle: float | None,
              resample: int) -> np.ndarray:
  """Resize (of the ``box`` crop) to size x size, flips, rotation by ``angle``.

  The same operations, in the same order, as ``random_resized_crop`` /
  ``resize``, ``hflip``, ``vflip``, ``rotate``, done in PIL with one
  conversion each way (a numpy left-right flip makes later steps slow).
  """
  resize_to = box is not None or arr.shape[:2] != (size, size)
  if not (resize_to or flip_h or angle is not None):
    return arr[::-1] if flip_v else arr
  img = _to_pil(arr)
  if resize_to:
    box = tuple(float(b) for b in box) if box is not None else None
    img = img.resize((size, size), resample, box=box)
  if flip_h:
    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  if flip_v:
    img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
  if angle is not None:
    img = img.rotate(angle, resample=resample, fillcolor=0)
  return _from_pil(img, arr.shape[-1] if arr.ndim == 3 else 0)


@dataclasses.dataclass(frozen=True)
class RecordTransform:
  """Picklable ``fn(record, rng) -> record`` (see ``make_transform``).

  Draws from ``rng`` in the order crop box, hflip, vflip, rotation angle,
  intensity, and gives bit-for-bit the output of chaining
  ``random_resized_crop``, ``hflip``, ``vflip``, ``rotate``, ``to_channels``,
  ``intensity_jitter`` and ``normalize``.
  """
  image_size: int
  channels: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  train: bool = False
  augment: config_lib.Augment = config_lib.Augment()

  def __post_init__(self):
    # normalize() as one multiply and one subtract with (S, S, C) float32
    # constants (a trailing size-3 broadcast is ~8x slower in numpy).
    std = np.asarray(self.std, np.float32)
    shape = (self.image_size, self.image_size, self.channels)
    scale = np.float32(1 / 255) / std
    offset = np.asarray(self.mean, np.float32) / std
    object.__setattr__(self, "_scale", np.broadcast_to(scale, shape).copy())
    object.__setattr__(self, "_offset", np.broadcast_to(offset, shape).copy())

  def _normalize(self, image: np.ndarray) -> np.ndarray:
    if image.shape != self._scale.shape:
      return normalize(image, self.mean, self.std)
    x = np.multiply(image, self._scale, dtype=np.float32)
    return np.subtract(x, self._offset, out=x)

  def __call__(self, record: Record,
               rng: np.random.Generator | None = None) -> Record:
    aug = self.augment
    train = self.train
    if train and rng is None:
      raise ValueError("the training transform needs an np.random.Generator.")
    image = record["image"]
    box, flip_h, flip_v, angle = None, False, False, None
    on_device = train and aug.on_device  # resize only, uint8 out: device_augment does the rest in the train step
    if train and not on_device:
      if aug.crop_scale is not None:
        h, w = image.shape[:2]
        box = crop_box(rng, h, w, aug.crop_scale, aug.crop_ratio)
      flip_h = aug.hflip and rng.random() < 0.5
      flip_v = aug.vflip and rng.random() < 0.5
      if aug.rotate > 0:
        angle = float(rng.uniform(-aug.rotate, aug.rotate))
    size = self.image_size
    image = _geometry(image, size, box, flip_h, flip_v, angle, Image.BILINEAR)
    image = to_channels(image, self.channels)
    if train and aug.intensity > 0:
      image = intensity_jitter(image, rng, aug.intensity)
    out = {k: v for k, v in record.items()
           if k not in ("image", "mask", "label")}  # extra keys, e.g. 'valid'
    out["image"] = np.ascontiguousarray(image) if on_device else self._normalize(image)
    if "mask" in record:
      mask = _geometry(record["mask"], size, box, flip_h, flip_v, angle,
                       Image.NEAREST)
      out["mask"] = np.ascontiguousarray(mask, dtype=np.int32)
    if "label" in record:
      out["label"] = np.int32(record["label"])
    return out


def make_transform(data_cfg: Any, train: bool) -> RecordTransform:
  """Per-example transform from the ``data`` config.

  Args:
    data_cfg: the ``data`` block (ConfigDict / dict; see
      ``tpp_jax.data.config``): image_size, channels, mean, std, augment.
    train: random augmentation (crop/flips/rotation/intensity) when True;
      otherwise deterministic resize + channels + normalise.

  Returns:
    ``fn(record, rng) -> record`` with ``image`` float32 (S, S, C) and
    ``label`` int32 or ``mask`` int32 (S, S).
  """
  cfg = config_lib.resolve(data_cfg)
  return RecordTransform(image_size=cfg.image_size, channels=cfg.channels,
                         mean=cfg.mean, std=cfg.std, train=bool(train),
                         augment=cfg.augment)


@dataclasses.dataclass(frozen=True)
class MultiView:
  """Picklable ``fn(record, rng) -> record`` with several augmented views of one image.

  ``image`` and ``image2`` are two draws of ``base`` (the training transform: the global views);
  with ``local`` set, ``local`` is an (L, s, s, C) stack of L draws of that (smaller) transform,
  from the image alone (masks and labels are not cropped for them). Views are drawn in that order.
  """
  base: Any
  views: int = 2
  local: Any = None
  local_crops: int = 0

  def __call__(self, record: Record,
               rng: np.random.Generator | None = None) -> Record:
    out = self.base(record, rng)
    if self.views >= 2:
      out["image2"] = self.base(record, rng)["image"]
    if self.local is not None and self.local_crops > 0:
      image_only = {"image": record["image"]}
      out["local"] = np.stack([self.local(image_only, rng)["image"]
                               for _ in range(self.local_crops)])
    return out


def make_views(train_fn: Any, data_cfg: Any, views: int = 1,
               local_crops: int = 0, local_crop_size: int | None = None,
               local_crop_scale: tuple[float, float] = (0.05, 0.4)) -> Any:
  """The training transform with the views an objective needs.

  Args:
    train_fn: the per-view training transform (``make_transform(data_cfg, True)``).
    data_cfg: the ``data`` block (channels, mean, std, augment of the local crops).
    views: 1 -> ``train_fn`` itself; 2 -> adds ``image2`` (a second draw).
    local_crops: DINO multi-crop: number of extra local views (key ``local``).
    local_crop_size: their side in pixels.
    local_crop_scale: their random-resized-crop area fractions.
  """
  if views <= 1 and local_crops <= 0:
    return train_fn
  local = None
  if local_crops > 0:
    if not local_crop_size or local_crop_size <= 0:
      raise ValueError(f"pretext.local_crop_size={local_crop_size} must be "
                       "positive when pretext.local_crops > 0.")
    cfg = config_lib.resolve(data_cfg)
    aug = dataclasses.replace(
        cfg.augment, crop_scale=tuple(float(s) for s in local_crop_scale))
    local = RecordTransform(image_size=int(local_crop_size),
                            channels=cfg.channels, mean=cfg.mean, std=cfg.std,
                            train=True, augment=aug)
  return MultiView(base=train_fn, views=max(int(views), 1), local=local,
                   local_crops=int(local_crops))
