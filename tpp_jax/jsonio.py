"""A run's files: reading its JSON (config.json, summary.json, metrics.jsonl, adapter_config.json) and writing any
file whole or not at all (`write_atomic`)."""
from __future__ import annotations

import json
import os
import pathlib
import re
import tempfile

from tpp_jax.errors import ConfigError


def read_json(path, require_object: bool = False):
  """The JSON value in `path` (config.json, summary.json, adapter_config.json, ...).

  Invalid JSON (or, with require_object, anything but a JSON object) raises ConfigError naming the file.
  """
  path = pathlib.Path(path)
  try:
    out = json.loads(path.read_text())
  except ValueError as e:
    raise ConfigError(f"{path} is not valid JSON ({e}).") from None
  if require_object and not isinstance(out, dict):
    raise ConfigError(f"{path} does not hold a JSON object.")
  return out


def read_jsonl(path) -> list[dict]:
  """Rows of a .jsonl file (metrics.jsonl); a missing file is [] and a torn line (interrupted run) is skipped."""
  path = pathlib.Path(path)
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    if line.strip():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return rows


def written_name(name: str) -> str:
  """The file a temporary file of `write_atomic` (`.NAME.XXXX.tmp`) or a `NAME.tmp` stands for; `name` otherwise."""
  m = re.fullmatch(r"\.(.+)\.[^.]+\.tmp", name)
  return m.group(1) if m else name[:-len(".tmp")] if name.endswith(".tmp") else name


def write_atomic(path, data: str | bytes) -> pathlib.Path:
  """Write `data` to `path` through a temporary file in the same folder and a rename: a reader (or a killed run)
  sees the old file or the new one, never a torn one."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return path
