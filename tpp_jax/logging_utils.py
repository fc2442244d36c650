"""metrics.jsonl, TensorBoard event files (tensorboardX, no TensorFlow) and progress bars."""
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

  def log_images(self, step: int, split: str, draw):
    """Images `SPLIT/KIND` beside the scalars: `draw()` -> {kind: (H, W, 3) uint8} (figures.eval_images of the
    trainer), called only where TensorBoard is on. A figure that fails warns and never stops training;
    single-process runs only (the figures are host-local)."""
    if self.tb is None:
      return
    import jax
    if jax.process_count() > 1:
      return
    try:
      images = draw()
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
