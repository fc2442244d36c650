"""metrics.jsonl, TensorBoard event files (tensorboardX, no TensorFlow), progress bars and the JSON file readers."""
from __future__ import annotations

import json
import math
import pathlib
import sys

from tqdm.auto import tqdm


def summary_writer_class():
  """tensorboardX.SummaryWriter, imported without torch: tensorboardX's writer imports torch whenever it is installed,
  only to accept torch tensors (4-6 s of every run's start here); the numbers logged here are floats. Where torch is
  already imported, nothing is hidden."""
  if "torch" in sys.modules or "tensorboardX" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError while tensorboardX loads
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricsLogger:
  """Appends `{"step", "stage", "split", ...}` lines to metrics.jsonl and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: pathlib.Path, stage: str, enabled: bool = True, purge_step: int | None = None):
    """purge_step: a resumed run's first step; TensorBoard drops the events an interrupted run wrote from it on."""
    self.stage, self.enabled = stage, enabled
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self.tb = None
    if enabled:
      try:
        SummaryWriter = summary_writer_class()
        self.tb = SummaryWriter(str(pathlib.Path(workdir) / "tb"), purge_step=purge_step)
      except ImportError:  # optional
        self.tb = None

  def log(self, step: int, split: str, values: dict, **extra):
    if not self.enabled:
      return
    row = {"step": int(step), "stage": self.stage, "split": split}
    for k, v in {**values, **extra}.items():
      if isinstance(v, (int, float)):
        row[k] = float(v) if math.isfinite(float(v)) else None
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self.tb is not None:
      for k, v in row.items():
        if k not in ("step", "stage", "split") and v is not None:
          self.tb.add_scalar(f"{split}/{k}", v, step)

  def log_images(self, step: int, trainer, split: str | None = None):
    """The report's figures of the trainer's stage as TensorBoard images `SPLIT/KIND` (beside the scalars).

    KIND: `mae_reconstructions` (pretrain / tpp with MAE), `segmentation_overlays` (segmentation task stages).
    A figure that fails warns and never stops training; single-process runs only (the figures are host-local).
    """
    if self.tb is None:
      return
    import jax
    if jax.process_count() > 1:
      return
    from tpp_jax import pipeline
    split = split or next((s for s in ("val", "test", "train") if s in trainer.sources), "train")
    try:
      images = pipeline.eval_images(trainer, split)
    except Exception as e:  # noqa: BLE001 - a figure is not worth a training run
      print(f"warning: TensorBoard images skipped at step {step}: {type(e).__name__}: {e}", file=sys.stderr)
      return
    for kind, image in images.items():
      self.tb.add_image(f"{split}/{kind}", image, int(step), dataformats="HWC")
    self.tb.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()


def progress(iterable, desc: str, enabled: bool = True, **kw):
  """A tqdm bar (step, loss, images/s, ETA) on stderr; a plain iterator when disabled."""
  return tqdm(iterable, desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True, mininterval=1.0, **kw)


def read_json(path, require_object: bool = False):
  """The JSON value in `path` (config.json, summary.json, adapter_config.json, ...).

  Invalid JSON (or, with require_object, anything but a JSON object) raises ConfigError naming the file.
  """
  path = pathlib.Path(path)
  try:
    out = json.loads(path.read_text())
  except ValueError as e:
    from tpp_jax.config import ConfigError
    raise ConfigError(f"{path} is not valid JSON ({e}).") from None
  if require_object and not isinstance(out, dict):
    from tpp_jax.config import ConfigError
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
