"""Data files: config path checks and .npz reading, with errors that name the file and the fix."""
from __future__ import annotations

import os
import pathlib
import struct
import zipfile
import zlib
from typing import Any

import numpy as np


def check_path(path: os.PathLike | str | None, field: str,
                  what: str) -> pathlib.Path:
  """Returns ``path`` as a Path, or raises naming the config field."""
  if path is None or str(path) == "":
    raise ValueError(f"{field} is not set: point it at {what} "
                     f"(e.g. --config.{field}=/path/to/data).")
  p = pathlib.Path(path).expanduser()
  if not p.exists():
    raise FileNotFoundError(
        f"{field}: {p} does not exist. Set --config.{field} to {what}.")
  return p


NPZ_FIX = "download it again or re-create it with np.savez"


def open_npz(path: pathlib.Path, field: str = "data.path",
             fix: str = NPZ_FIX) -> Any:
  """``np.load(path, allow_pickle=False)`` of an .npz file.

  A file that is not a zip archive (random bytes, a cut-short download, an
  .npy / pickle renamed .npz) raises one ValueError naming it and ``fix``
  (np.load would call it 'pickled data').
  """
  path = pathlib.Path(path)
  try:
    is_zip = zipfile.is_zipfile(path)
    with open(path, "rb") as f:
      head = f.read(6)
  except OSError as e:
    raise ValueError(f"{field}: {path} cannot be read ({e}).") from None
  if not is_zip:
    why = ("a zip archive cut short: truncated" if head[:4] == b"PK\x03\x04"
           else "an .npy file, not an .npz" if head == b"\x93NUMPY"
           else "not a zip archive")
    raise ValueError(f"{field}: {path} is not a valid .npz file ({why}); "
                     f"{fix}.")
  try:
    return np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{field}: {path} is not a readable .npz file ({e}); "
                     f"{fix}.") from None


def read_npz_member(npz: Any, key: str, path: pathlib.Path,
                    field: str = "data.path", fix: str = NPZ_FIX
                    ) -> np.ndarray:
  """``npz[key]``; a corrupt member or object data -> ValueError naming it."""
  try:
    return npz[key]
  except ValueError as e:
    if "pickle" in str(e):  # object arrays
      raise ValueError(f"{field}: {path} [{key}] holds Python objects that "
                       f"need pickle ({e}); save it as a plain numeric array."
                       ) from None
    raise ValueError(f"{field}: {path} [{key}] is corrupt ({e}); {fix}."
                     ) from None
  except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise ValueError(f"{field}: {path} [{key}] is corrupt ({e}); {fix}."
                     ) from None


def _stored_npy(path: pathlib.Path, key: str
                ) -> tuple[int, tuple[int, ...], np.dtype] | None:
  """(byte offset, shape, dtype) of an uncompressed C-order ``key`` in an npz.

  None when the member is compressed (np.savez_compressed) or Fortran-order.
  """
  with zipfile.ZipFile(path) as zf:
    info = zf.getinfo(key + ".npy")
  if info.compress_type != zipfile.ZIP_STORED:
    return None
  with open(path, "rb") as f:
    f.seek(info.header_offset)
    local = f.read(30)
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    f.seek(info.header_offset + 30 + name_len + extra_len)
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
      shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if fortran and len(shape) > 1:
      return None
    return f.tell(), tuple(shape), dtype
