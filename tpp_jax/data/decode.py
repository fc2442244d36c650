"""Image decoding and checks: image files (PNG / JPEG / BMP / TIFF of any depth, DICOM) -> uint8 (H, W, 1|3), masks
-> class indices. `read_image` is the one function training, evaluation, predict and the Python API read files with
(high-depth and DICOM values are mapped to 0..255 by tpp_jax.data.medical's window rule)."""
from __future__ import annotations

import pathlib
import struct

import numpy as np
from PIL import Image

from tpp_jax.data import medical

# The image files the folder sources and predict read (besides extensionless DICOM files, found by their preamble).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff") + medical.DICOM_EXTENSIONS


def is_image_file(path: pathlib.Path) -> bool:
  """A file `read_image` reads: a known extension, or no extension and the DICOM preamble."""
  path = pathlib.Path(path)
  return path.is_file() and (path.suffix.lower() in IMAGE_EXTENSIONS or (not path.suffix and medical.is_dicom(path)))


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


def _pil_to_array(img: Image.Image, where: str, window=None) -> np.ndarray:
  """Decoded PIL image -> uint8 (H, W, 1|3); a 16-bit / 32-bit integer / float image is read at full depth and
  windowed (medical.window_to_uint8)."""
  if img.mode in medical.HIGH_DEPTH_MODES:
    return medical.window_to_uint8(np.asarray(img), window)[..., None]
  if img.mode in ("L", "RGB"):
    pass
  elif img.mode in ("LA", "1"):
    img = img.convert("L")
  elif img.mode in ("RGBA", "P", "CMYK", "YCbCr", "LAB", "HSV", "PA", "RGBX"):
    img = img.convert("RGB")
  else:
    raise ValueError(
        f"{where}: unsupported image mode {img.mode!r}. "
        "Save the image as grey (8 / 16-bit, float) or 8-bit RGB.")
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


def read_image(path: pathlib.Path, window=None, fix: str = "replace it or delete it") -> np.ndarray:
  """An image file -> uint8 (H, W, 1|3): DICOM through pydicom, everything else through PIL; `window` =
  data.window ((center, width) or None)."""
  path = pathlib.Path(path)
  if medical.is_dicom(path):
    return medical.read_dicom(path, window)
  with _open_image(path, fix=fix) as img:
    return _pil_to_array(img, str(path), window)


def as_image(x, window=None, where: str = "image") -> np.ndarray:
  """An image array of any size and dtype (H, W) / (H, W, 1|3), or a file path -> uint8 (H, W, 1|3): uint8 as it
  is, any other dtype (uint16, int16, float, ...) through the window rule of high-depth files; a path through
  `read_image`."""
  if isinstance(x, (str, pathlib.Path)):
    return read_image(pathlib.Path(x), window)
  x = np.asarray(x)
  if x.ndim == 2:
    x = x[..., None]
  if x.ndim != 3 or x.shape[-1] not in (1, 3) or not x.size:
    raise ValueError(f"{where}: expected a grey (H, W) / (H, W, 1) or RGB (H, W, 3) image, got shape {x.shape}.")
  if x.dtype == np.uint8:
    return x
  if x.dtype == np.bool_:
    return x.astype(np.uint8) * 255
  if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
    raise ValueError(f"{where}: dtype {x.dtype} is not an image dtype; give uint8, uint16, int16 or float values.")
  return medical.window_to_uint8(x, window)


def image_size(path: pathlib.Path, fix: str = "replace it or delete it") -> tuple[int, int]:
  """(width, height) of an image file from its header."""
  if medical.is_dicom(path):
    return medical.dicom_size(path)
  with _open_image(path, fix=fix, load=False) as img:
    return img.size


def _binarise_or_keep(mask: np.ndarray) -> np.ndarray:
  """{0, 255} masks -> {0, 1}; anything else is kept as class indices."""
  if mask.size and mask.max() > 1:
    values = np.unique(mask)
    if np.all((values == 0) | (values == 255)):
      return (mask > 127).astype(np.uint8)
  return mask.astype(np.uint8)
