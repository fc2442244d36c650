"""JSON files of a run (config.json, summary.json, metrics.jsonl, adapter_config.json): reading them."""
from __future__ import annotations

import json
import pathlib

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
