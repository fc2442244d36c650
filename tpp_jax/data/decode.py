"""Image decoding and checks: PIL / numpy images -> uint8 (H, W, 1|3), masks -> class indices."""
from __future__ import annotations

import pathlib
import struct

import numpy as np
from PIL import Image


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
