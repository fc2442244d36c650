"""Checkpoint files -> a flat {name: float32 array} state dict: torch .pth/.pt/.bin, .safetensors, big_vision .npz.

Errors name the file and the fix (a truncated / corrupt file, torch missing, a .pth whose pickle asks to run
code: refused, never loaded).
"""
from __future__ import annotations

import pathlib
import re
import zipfile
from typing import Any, Mapping

import numpy as np

_PREFIXES = re.compile(r"^(?:(?:module|backbone|_orig_mod)\.|params/)+")  # DDP, DINO, torch.compile, big_vision
_WRAPPERS = ("model", "state_dict", "teacher")
REDOWNLOAD = "download it again"  # the fix for a truncated / corrupt checkpoint file
TORCH_INSTALL = "pip install torch --index-url https://download.pytorch.org/whl/cpu (the CPU wheel is enough)"


def load_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Reads a checkpoint file into a flat {name: float32 array} dict.

  Args:
    path: `.pth/.pt/.bin` (torch, read with weights_only=True; a top-level 'model', 'state_dict'
      or 'teacher' dict is unwrapped), `.safetensors` or `.npz` (big_vision).

  Returns:
    Flat dict with 'module.' / 'backbone.' (and '_orig_mod.', 'params/') prefixes stripped.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"Checkpoint {str(path)!r} not found; set init.path to an existing file "
                            "(.pth/.pt/.bin, .safetensors or .npz).")
  suffix = path.suffix.lower()
  if suffix in (".pth", ".pt", ".bin"):
    raw = _load_torch(path)
  elif suffix == ".safetensors":
    raw = read_safetensors(path)
  elif suffix == ".npz":
    from tpp_jax.data import sources  # pylint: disable=import-outside-toplevel
    with sources.open_npz(path, "init.path", REDOWNLOAD) as z:
      raw = {k: sources.read_npz_member(z, k, path, "init.path", REDOWNLOAD) for k in z.files}
  else:
    raise ValueError(f"init.path={str(path)!r}: unknown checkpoint extension {suffix!r}; "
                     "expected .pth/.pt/.bin, .safetensors or .npz.")
  return _clean(raw)


def safetensors_keys(path: str | pathlib.Path) -> list[str]:
  """Tensor names of a .safetensors file (header only); a file that is not one -> ValueError naming it."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  try:
    with safe_open(str(path), "np") as f:
      return list(f.keys())
  except Exception as e:  # noqa: BLE001 - SafetensorError (truncated / corrupt header) or OSError
    raise _not_safetensors(path, e) from None


def read_safetensors(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """safetensors.numpy.load_file; a truncated or corrupt file -> one ValueError naming it and the fix."""
  import safetensors.numpy  # pylint: disable=import-outside-toplevel
  try:
    return safetensors.numpy.load_file(str(path))
  except Exception as e:  # noqa: BLE001 - SafetensorError is not an exception class to import by a stable name
    raise _not_safetensors(path, e) from None


def _not_safetensors(path, e: Exception) -> ValueError:
  reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  return ValueError(f"init.path {path} is not a readable safetensors file (truncated or corrupt: {reason}); "
                    f"{REDOWNLOAD}.")


def _load_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=import-outside-toplevel  (only .pth needs torch)
  except ImportError:
    raise ValueError(f"init.path {path} is a PyTorch checkpoint and torch, which reads it, is not installed: "
                     f"{TORCH_INSTALL}; or convert it to .safetensors where torch is installed "
                     "(safetensors.torch.save_file(state_dict, 'X.safetensors')) and set init.path to that "
                     "file.") from None
  with open(path, "rb") as f:
    zipped = f.read(4) == b"PK\x03\x04"  # torch >= 1.6 writes a zip archive
  if zipped and not zipfile.is_zipfile(path):
    raise ValueError(f"init.path {path} is not a readable PyTorch checkpoint (truncated: a zip archive cut short); "
                     f"{REDOWNLOAD}.")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except (FileNotFoundError, MemoryError):
    raise
  except Exception as e:  # noqa: BLE001 - RuntimeError / UnpicklingError / OSError: torch names no common base
    text = str(e).strip()
    refused = _refused_global(text)
    if refused:  # never repeat torch's hint to load it with weights_only=False: that runs the file's code
      raise ValueError(f"init.path {path} refused: the file asks to run code (pickle global {refused}); only plain "
                       "tensors are loaded. Save just the state dict (torch.save(model.state_dict(), ...)) or "
                       "convert it to .safetensors.") from None
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)  # garbage where the pickle should be
    reason = (detail.group(1) if detail else text.splitlines()[0] if text else type(e).__name__).strip()
    if "weights_only" in reason:  # torch's advice to turn the safe loader off: not ours to give
      reason = type(e).__name__
    raise ValueError(f"init.path {path} is not a readable PyTorch checkpoint (truncated or corrupt: {reason}); "
                     f"{REDOWNLOAD}.") from None
  while isinstance(obj, Mapping):
    inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
    if inner is None:
      break
    obj = inner
  if not isinstance(obj, Mapping):
    raise ValueError(f"init.path={str(path)!r} holds a {type(obj).__name__}, not a state dict.")
  return {k: v.detach().float().cpu().numpy() for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _refused_global(text: str) -> str | None:
  """The pickle global (module.name) that torch's WeightsUnpickler refused, from its error text, or None.

  torch says 'Unsupported global: GLOBAL X was not an allowed global' (a 'builtins.' prefix stripped), 'Trying to
  load unsupported GLOBAL X whose module M is blocked' (os / posix / nt / sys) or 'Trying to call reduce for
  unrecognized function F'.
  """
  found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
  if found:
    name = found.group(1)
    return name if "." in name else f"builtins.{name}"
  found = (re.search(r"unsupported GLOBAL (\S+) whose module", text) or
           re.search(r"call reduce for unrecognized function (.+?)(?: which belongs to|$)", text, re.M))
  return found.group(1).strip() if found else None


def _clean(sd: Mapping[str, Any]) -> dict[str, np.ndarray]:
  out = {}
  for k, v in sd.items():
    k = _PREFIXES.sub("", k)
    if hasattr(v, "detach"):  # a torch tensor (e.g. model.state_dict() passed directly)
      v = v.detach().float().cpu().numpy()
    out[k] = np.asarray(v).astype(np.float32, copy=False)
  return out
