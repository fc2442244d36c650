"""The training augmentation inside the jitted train step (``data.augment.on_device=True``).

The host then only decodes and resizes each image to (S, S) and ships it as uint8 (4x fewer bytes than float32,
and no per-image crop / flip / normalise on the host's cores: on a GPU the host is what bounds a small model).
Here every example gets what ``tpp_jax.data.transforms.RecordTransform`` would give it on the host:

  crop     a random-resized crop, torchvision's rule (area fraction ``crop_scale``, log-uniform aspect in
           ``crop_ratio``, integer box, uniform position; up to 10 draws until the box fits, else a central crop)
  resize   the box back to S x S: images bilinear as PIL does for an upscale (a box is never larger than the image),
           masks nearest as PIL does
  flips    left-right / top-bottom with probability 1/2 each (``hflip`` / ``vflip``), after the crop
  values   float32 ``(x / 255 - mean) / std``

Differences from the host path: the crop is taken from the S x S resized image (not from the full-size source),
the resized values are not rounded to uint8 before normalising, and the random draws come from the step's JAX key
(so an interrupted and resumed run draws the same crops). Rotation and intensity jitter stay on the host
(``data.config.resolve`` refuses them with on_device).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tpp_jax.data import config as config_lib


def crop_boxes(key, n: int, size: int, scale: tuple[float, float], ratio: tuple[float, float],
               tries: int = 10) -> jax.Array:
  """(n, 4) int32 boxes (top, left, height, width) inside a size x size image, torchvision's rule: up to `tries`
  draws of (area, aspect), the first box that fits; none fits: the central crop with the aspect clipped to `ratio`."""
  k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
  area = size * size * jax.random.uniform(k_area, (n, tries), minval=scale[0], maxval=scale[1])
  aspect = jnp.exp(jax.random.uniform(k_ratio, (n, tries), minval=math.log(ratio[0]), maxval=math.log(ratio[1])))
  w = jnp.round(jnp.sqrt(area * aspect))
  h = jnp.round(jnp.sqrt(area / aspect))
  fits = (w > 0) & (w <= size) & (h > 0) & (h <= size)
  first = jnp.argmax(fits, axis=1)
  pick = lambda a: jnp.take_along_axis(a, first[:, None], axis=1)[:, 0]
  any_fits = fits.any(axis=1)
  # the fallback of a square image: its aspect 1 clipped to `ratio`
  fw = float(size if ratio[0] <= 1 <= ratio[1] else (round(size * ratio[1]) if ratio[1] < 1 else size))
  fh = float(size if ratio[0] <= 1 <= ratio[1] else (size if ratio[1] < 1 else round(size / ratio[0])))
  w = jnp.where(any_fits, pick(w), fw)
  h = jnp.where(any_fits, pick(h), fh)
  top = jnp.where(any_fits, jnp.floor(jax.random.uniform(k_top, (n,)) * (size - h + 1)), (size - h) // 2)
  left = jnp.where(any_fits, jnp.floor(jax.random.uniform(k_left, (n,)) * (size - w + 1)), (size - w) // 2)
  return jnp.stack([top, left, h, w], axis=-1).astype(jnp.int32)


def _linear_taps(start, length, size: int):
  """PIL's bilinear taps of an upscale of [start, start + length) to `size` samples: (lo, hi, weight of hi)."""
  x = start[:, None] + (jnp.arange(size, dtype=jnp.float32) + 0.5)[None] * (length[:, None] / size) - 0.5
  x = jnp.clip(x, 0.0, size - 1.0)
  lo = jnp.floor(x)
  return lo.astype(jnp.int32), jnp.minimum(lo + 1, size - 1).astype(jnp.int32), x - lo


def _nearest_taps(start, length, size: int):
  """PIL's nearest source index of each of `size` samples of [start, start + length)."""
  x = start[:, None] + (jnp.arange(size, dtype=jnp.float32) + 0.5)[None] * (length[:, None] / size)
  return jnp.clip(jnp.floor(x), 0, size - 1).astype(jnp.int32)


def _rows(x, idx):
  """x[b, idx[b, i], ...] for every b and i (a gather along axis 1)."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _cols(x, idx):
  """x[b, :, idx[b, j], ...] for every b and j (a gather along axis 2)."""
  return jnp.take_along_axis(x, idx.reshape((idx.shape[0], 1, idx.shape[1]) + (1,) * (x.ndim - 3)), axis=2)


def crop_resize(images, boxes):
  """(B, S, S, C) images (any dtype) -> float32 (B, S, S, C): each `boxes` crop resized back, bilinear (PIL)."""
  size = images.shape[1]
  x = images.astype(jnp.float32)
  box = boxes.astype(jnp.float32)
  lo, hi, w = _linear_taps(box[:, 0], box[:, 2], size)
  x = _rows(x, lo) * (1 - w)[:, :, None, None] + _rows(x, hi) * w[:, :, None, None]
  lo, hi, w = _linear_taps(box[:, 1], box[:, 3], size)
  return _cols(x, lo) * (1 - w)[:, None, :, None] + _cols(x, hi) * w[:, None, :, None]


def crop_resize_nearest(masks, boxes):
  """(B, S, S) masks -> (B, S, S): each `boxes` crop resized back, nearest (PIL)."""
  size = masks.shape[1]
  box = boxes.astype(jnp.float32)
  return _cols(_rows(masks, _nearest_taps(box[:, 0], box[:, 2], size)), _nearest_taps(box[:, 1], box[:, 3], size))


def _flip(x, do, axis: int):
  return jnp.where(do.reshape((-1,) + (1,) * (x.ndim - 1)), jnp.flip(x, axis), x)


def apply(batch: dict, boxes, flip_h, flip_v, mean, std) -> dict:
  """The augmentation of `batch` (uint8 'image' (B, S, S, C), optional 'mask' (B, S, S)) with the given draws:
  boxes (B, 4) (top, left, height, width) or None (no crop), flip_h / flip_v (B,) bools."""
  out = dict(batch)
  image = batch["image"].astype(jnp.float32) if boxes is None else crop_resize(batch["image"], boxes)
  image = _flip(_flip(image, flip_h, 2), flip_v, 1)
  std = jnp.asarray(std, jnp.float32)
  out["image"] = image * (1.0 / (255.0 * std)) - jnp.asarray(mean, jnp.float32) / std
  if "mask" in batch:
    mask = batch["mask"] if boxes is None else crop_resize_nearest(batch["mask"], boxes)
    out["mask"] = _flip(_flip(mask, flip_h, 2), flip_v, 1)
  return out


def make(data_cfg) -> Callable[[dict, jax.Array], dict] | None:
  """``fn(batch, key) -> batch`` for the train step when ``data.augment.on_device`` is set, else None."""
  cfg = config_lib.resolve(data_cfg)
  aug = cfg.augment
  if not aug.on_device:
    return None
  mean, std = np.asarray(cfg.mean, np.float32), np.asarray(cfg.std, np.float32)

  def augment(batch: dict, key) -> dict:
    n, size = batch["image"].shape[0], batch["image"].shape[1]
    k_box, k_h, k_v = jax.random.split(key, 3)
    boxes = None if aug.crop_scale is None else crop_boxes(k_box, n, size, aug.crop_scale, aug.crop_ratio)
    no = jnp.zeros((n,), bool)
    flip_h = jax.random.bernoulli(k_h, 0.5, (n,)) if aug.hflip else no
    flip_v = jax.random.bernoulli(k_v, 0.5, (n,)) if aug.vflip else no
    return apply(batch, boxes, flip_h, flip_v, mean, std)

  return augment
