"""Medical and high-depth images -> the uint8 (H, W, 1|3) every source returns: DICOM (pydicom), 16-bit / float PNG
and TIFF (PIL), NIfTI volumes cut into 2-D slices (nibabel).

One rule maps raw values to 0..255 everywhere (training, evaluation, predict, the Python API): `window_to_uint8`.
  - DICOM: the modality LUT first (RescaleSlope / RescaleIntercept, e.g. CT to Hounsfield units), then the window:
    `data.window=(center, width)` if set, else the file's own first WindowCenter / WindowWidth, else the image's
    min..max; MONOCHROME1 (white = low) is inverted after windowing.
  - 16-bit / 32-bit float PNG / TIFF: `data.window` if set, else the image's min..max.
  - NIfTI: `data.window` if set, else the VOLUME's min..max (every slice of a volume on one scale).
The windowed values are rounded to 8 bits (256 grey levels inside the window), so the image store, the transforms
and the normalisation by data.mean / data.std stay what they are for PNG / JPEG.
"""
from __future__ import annotations

import pathlib
import re
from typing import Sequence

import numpy as np

DICOM_EXTENSIONS = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # PIL modes read at full depth


def window_to_uint8(pixels: np.ndarray, window: Sequence[float] | None = None,
                    value_range: tuple[float, float] | None = None) -> np.ndarray:
  """Raw values -> uint8 0..255: linear in [center - width/2, center + width/2] of `window`, clipped outside;
  without a window, in `value_range` (default the array's own min..max; a constant image maps to 0)."""
  x = np.asarray(pixels, np.float64)
  if window is not None:
    center, width = float(window[0]), float(window[1])
    lo, hi = center - width / 2, center + width / 2
  elif value_range is not None:
    lo, hi = (float(v) for v in value_range)
  else:
    finite = x[np.isfinite(x)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
  if hi <= lo:
    return np.zeros(x.shape, np.uint8)
  x = np.nan_to_num(x, nan=lo, posinf=hi, neginf=lo)
  return np.round(np.clip((x - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)


def check_window(window) -> tuple[float, float] | None:
  """data.window: None or (center, width) with width > 0."""
  if window is None or window == () or window == "":
    return None
  try:
    center, width = (float(v) for v in window)
  except (TypeError, ValueError):
    raise ValueError(f"data.window={window!r} must be (center, width), e.g. --config.data.window='(40, 400)' for a "
                     "CT soft-tissue window, or None for each file's own window / min-max.") from None
  if not width > 0:
    raise ValueError(f"data.window={window!r}: the width must be > 0.")
  return center, width


# ------------------------------------------------------------------------------------------------
# DICOM
# ------------------------------------------------------------------------------------------------

def is_dicom(path: pathlib.Path) -> bool:
  """A .dcm / .dicom file, or a file without an extension whose bytes 128..131 are 'DICM' (the DICOM preamble)."""
  path = pathlib.Path(path)
  if path.suffix.lower() in DICOM_EXTENSIONS:
    return True
  if path.suffix:
    return False
  try:
    with open(path, "rb") as f:
      f.seek(128)
      return f.read(4) == b"DICM"
  except OSError:
    return False


def _pydicom():
  try:
    import pydicom
  except ImportError:  # a dependency; only a broken install lacks it
    raise ValueError("reading DICOM needs pydicom: pip install pydicom") from None
  return pydicom


def _missing_decoder(path, ds, e: Exception) -> ValueError:
  """pydicom's 'all plugins are missing dependencies' -> one line naming the plugins to install."""
  syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
  name = getattr(syntax, "name", str(syntax))
  options = [re.sub(r"\s+", " ", m.strip()) for m in re.findall(r"requires ([^\n]+)", str(e))]
  how = " or ".join(f"[{o}]" for o in options) if options else "pylibjpeg with its plugins, or python-gdcm"
  return ValueError(f"DICOM {path}: its pixel data is compressed as '{name}', and no installed decoder can read it; "
                    f"install one of {how} (e.g. pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg), "
                    "then rerun.")


def read_dicom(path: pathlib.Path, window: Sequence[float] | None = None) -> np.ndarray:
  """A single-frame DICOM image -> uint8 (H, W, 1) (grey, after modality LUT + window) or (H, W, 3) (colour)."""
  pydicom = _pydicom()
  from pydicom.pixels import apply_modality_lut
  try:
    ds = pydicom.dcmread(path)
  except FileNotFoundError:
    raise
  except Exception as e:  # noqa: BLE001 - pydicom raises many kinds for a damaged file
    raise ValueError(f"DICOM {path} cannot be read ({type(e).__name__}: {e}); replace it or delete it.") from None
  if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
    modality = ds.get("Modality", "unknown")
    raise ValueError(f"DICOM {path} holds no image (no pixel data; modality {modality}, e.g. a structured report or "
                     "an RT plan); remove it from the image folder.")
  try:
    pixels = ds.pixel_array
  except RuntimeError as e:
    if "missing dependencies" in str(e) or "plugin" in str(e):
      raise _missing_decoder(path, ds, e) from None
    raise ValueError(f"DICOM {path}: its pixel data cannot be decoded ({e}); replace it or delete it.") from None
  except Exception as e:  # noqa: BLE001
    raise ValueError(f"DICOM {path}: its pixel data cannot be decoded ({type(e).__name__}: {e}); replace it or "
                     "delete it.") from None
  frames = int(ds.get("NumberOfFrames", 1) or 1)
  if frames > 1:
    raise ValueError(f"DICOM {path} holds {frames} frames (a multi-frame image); this reader takes single-frame "
                     "images: save the frames as separate files (or as a NIfTI volume for seg_folder).")
  photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
  if pixels.ndim == 3 and pixels.shape[-1] == 3:  # RGB (pydicom converts YBR to RGB)
    return pixels if pixels.dtype == np.uint8 else window_to_uint8(pixels, window)[..., :3]
  if pixels.ndim != 2:
    raise ValueError(f"DICOM {path}: pixel array of shape {pixels.shape} is neither a grey nor an RGB image.")
  values = apply_modality_lut(pixels, ds)
  if window is None and "WindowCenter" in ds and "WindowWidth" in ds:
    window = (_first(ds.WindowCenter), _first(ds.WindowWidth))
    if not window[1] > 0:
      window = None
  out = window_to_uint8(values, window)
  if photometric == "MONOCHROME1":
    out = 255 - out
  return out[..., None]


def dicom_size(path: pathlib.Path) -> tuple[int, int]:
  """(width, height) from the DICOM header (pixel data not read)."""
  pydicom = _pydicom()
  try:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return int(ds.Columns), int(ds.Rows)
  except FileNotFoundError:
    raise
  except Exception as e:  # noqa: BLE001
    raise ValueError(f"DICOM {path} has no readable image size ({type(e).__name__}: {e}); replace it or delete "
                     "it.") from None


def _first(value) -> float:
  """A DICOM multi-valued window element's first value."""
  return float(value[0]) if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else float(value)


# ------------------------------------------------------------------------------------------------
# NIfTI volumes
# ------------------------------------------------------------------------------------------------

def is_nifti(path) -> bool:
  name = str(path).lower()
  return name.endswith(NIFTI_SUFFIXES)


def _nibabel():
  try:
    import nibabel
  except ImportError:
    raise ValueError("reading NIfTI needs nibabel: pip install nibabel") from None
  return nibabel


def load_nifti(path: pathlib.Path, what: str = "NIfTI volume"):
  """nibabel image (header read, data not yet); a bad file -> one ValueError naming it."""
  nib = _nibabel()
  try:
    return nib.load(str(path))
  except FileNotFoundError:
    raise
  except Exception as e:  # noqa: BLE001
    raise ValueError(f"{what} {path} cannot be read ({type(e).__name__}: {e}); replace it or delete it.") from None


def volume_shape(path: pathlib.Path, slice_axis: int, what: str = "NIfTI volume") -> tuple[int, ...]:
  """The 3-D shape of a volume (a trailing axis of size 1 is dropped); a 4-D volume or an axis out of range is
  one error naming the fix."""
  shape = tuple(int(s) for s in load_nifti(path, what).shape)
  while len(shape) > 3 and shape[-1] == 1:
    shape = shape[:-1]
  if len(shape) != 3:
    raise ValueError(f"{what} {path} has shape {shape} ({len(shape)}-D); seg_folder takes 3-D volumes: split a "
                     "4-D series into one volume per time point / channel.")
  if not -3 <= slice_axis < 3:
    raise ValueError(f"data.slice_axis={slice_axis} is out of range for the 3-D volume {path}; use 0, 1 or 2 "
                     "(or -1, the last).")
  return shape


def read_volume(path: pathlib.Path, what: str = "NIfTI volume") -> np.ndarray:
  """The volume's values (float32 for images, as stored scaled by the header's slope / intercept), 3-D."""
  img = load_nifti(path, what)
  try:
    data = np.asanyarray(img.dataobj)
  except Exception as e:  # noqa: BLE001 - a cut-short .nii.gz fails only here
    raise ValueError(f"{what} {path} cannot be read ({type(e).__name__}: {e}); replace it or delete it.") from None
  while data.ndim > 3 and data.shape[-1] == 1:
    data = data[..., 0]
  return data


def volume_slice(volume: np.ndarray, index: int, slice_axis: int) -> np.ndarray:
  """The 2-D slice `index` along `slice_axis`, as (rows, cols) = the volume's remaining axes in order."""
  return np.take(volume, index, axis=slice_axis)


class VolumeReader:
  """2-D slices of NIfTI volumes, each volume read once and kept (the last `keep`) while its slices are read; the
  image volume's min..max (or `window`) maps every one of its slices to uint8. Pickles without the volumes."""

  def __init__(self, window: Sequence[float] | None = None, slice_axis: int = -1, keep: int = 4):
    import threading
    self.window, self.slice_axis, self.keep = window, slice_axis, keep
    self._lock, self._volumes = threading.Lock(), {}

  def __getstate__(self):
    return {"window": self.window, "slice_axis": self.slice_axis, "keep": self.keep}

  def __setstate__(self, state):
    self.__init__(**state)

  def volume(self, path: pathlib.Path, what: str) -> tuple[np.ndarray, tuple[float, float]]:
    """(the 3-D volume, its finite min..max)."""
    key = (str(path), what)
    with self._lock:
      if key in self._volumes:
        self._volumes[key] = self._volumes.pop(key)  # most recently used last
        return self._volumes[key]
      data = read_volume(path, what)
      finite = data[np.isfinite(data)] if np.issubdtype(data.dtype, np.floating) else data
      value_range = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
      self._volumes[key] = (data, value_range)
      while len(self._volumes) > self.keep:
        self._volumes.pop(next(iter(self._volumes)))
      return data, value_range

  def image(self, path: pathlib.Path, index: int) -> np.ndarray:
    """Slice `index` of the image volume -> uint8 (H, W, 1)."""
    data, value_range = self.volume(path, "NIfTI volume")
    return window_to_uint8(volume_slice(data, index, self.slice_axis), self.window, value_range)[..., None]

  def mask(self, path: pathlib.Path, index: int) -> np.ndarray:
    """Slice `index` of the mask volume as integer class ids (H, W); a non-integer value is one error."""
    data, _ = self.volume(path, "NIfTI mask")
    mask = volume_slice(data, index, self.slice_axis)
    if not np.issubdtype(mask.dtype, np.integer):
      if not np.all(np.isfinite(mask)) or np.any(mask != np.round(mask)):
        raise ValueError(f"NIfTI mask {path}: slice {index} holds values that are not whole class ids; store the "
                         "mask volume as integer class indices.")
      mask = np.round(mask).astype(np.int64)
    return mask

  def foreground_slices(self, path: pathlib.Path) -> np.ndarray:
    """The indices of the mask volume's slices with any non-zero class."""
    data, _ = self.volume(path, "NIfTI mask")
    other = tuple(a for a in range(3) if a != self.slice_axis % 3)
    return np.flatnonzero(np.any(data != 0, axis=other))
