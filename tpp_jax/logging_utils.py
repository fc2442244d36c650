"""metrics.jsonl, TensorBoard event files (tensorboardX, no TensorFlow), the final-metrics line and progress bars.

TensorBoard of a run (workdir/tb): the scalars, the report's images, the run's config.json as text (tag `config`)
and its scalar fields as hparams (session start at the run's start; the final evaluation's tags as the hparams
metrics, and a session end, when it finishes)."""
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


def flat_scalars(tree, prefix: str = "") -> dict:
  """{'a.b': value} of the bool / int / float / str leaves of nested dicts (hparams hold scalars only)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flat_scalars(v, f"{prefix}{k}."))
    elif isinstance(v, (bool, int, float, str)):
      out[f"{prefix}{k}"] = v
  return out


def final_metrics(final: dict) -> dict:
  """{'SPLIT/METRIC': value} of a run's final evaluation ({split: {metric: value}}), numbers only."""
  return {f"{split}/{k}": float(v) for split, res in final.items() for k, v in res.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool)}


def final_line(final: dict) -> str:
  """The one line a run prints at its end: 'Final: val/auc 0.9123, test/accuracy 0.875'."""
  return "Final: " + ", ".join(f"{k} {v:.4g}" for k, v in final_metrics(final).items())


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
    self.hparams = None
    self._log_config(pathlib.Path(workdir) / "config.json", (purge_step or 1) - 1)

  def _log_config(self, cfg_file: pathlib.Path, step: int):
    """The run's config.json (written before the logger starts) as text and as the hparams' session start."""
    if self.tb is None or not cfg_file.is_file():
      return
    text = cfg_file.read_text()
    self.tb.add_text("config", "    " + text.strip().replace("\n", "\n    "), step)  # indented: a markdown code block
    self.hparams = flat_scalars(json.loads(text))  # config_history, a list, is left out
    from tensorboardX.summary import hparams
    _, start, _ = hparams(self.hparams, {})
    self.tb._get_file_writer().add_summary(start, step)  # in this run's event file (add_hparams makes another run)

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

  def close(self, final: dict | None = None):
    """`final`: the run's final evaluation ({split: {metric: value}}), logged before; it ends the hparams session,
    with those tags as its metrics (TensorBoard reads their values from the scalars)."""
    if self.tb is not None:
      if final and self.hparams is not None:
        from tensorboardX.summary import hparams
        experiment, _, end = hparams(self.hparams, final_metrics(final))
        writer = self.tb._get_file_writer()
        writer.add_summary(experiment)
        writer.add_summary(end)
      self.tb.close()


def progress(iterable, desc: str, enabled: bool = True, **kw):
  """A tqdm bar (step, loss, images/s, ETA) on stderr; a plain iterator when disabled."""
  return tqdm(iterable, desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True, mininterval=1.0, **kw)
