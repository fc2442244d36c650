"""The Python API: train a run and use a finished one from a notebook or a script.

  import tpp_jax
  summary = tpp_jax.train(config, "runs/x")        # what `python -m tpp_jax.main --config ... --workdir` does
  run = tpp_jax.load_run("runs/x")                 # a finetune / linear / full run (or a pipeline arm)
  probs = run.predict(["a.dcm", uint16_array])     # (N, classes) probabilities; segmentation: a list of masks

Images are file paths (any format the data sources read) or arrays of any size and dtype: uint8 as it is, others
(uint16, int16, float) mapped to 0..255 by the run's data.window rule (tpp_jax.data.medical), exactly as
`python -m tpp_jax.predict` prepares the same files.
"""
from __future__ import annotations

import pathlib
from typing import Sequence

import numpy as np


class Run:
  """A finished run ready to predict: `config`, `task`, `class_names`, `step`, `checkpoint`, `predict(images)`."""

  def __init__(self, run_dir, checkpoint: str = "best", batch_size: int | None = None):
    from tpp_jax import predict as predict_cli
    from tpp_jax.data import config as data_config
    from tpp_jax.predictor import Predictor
    self._model = Predictor(run_dir, checkpoint, batch_size)
    self.run_dir = self._model.run_dir
    self.config, self.task = self._model.config, self._model.task
    self.class_names = predict_cli.class_names(self.config)
    self.step, self.checkpoint = self._model.run.step, self._model.run.checkpoint
    self._window = data_config.resolve(self.config.data).window

  def __repr__(self) -> str:
    return (f"Run({str(self.run_dir)!r}, stage={self.config.stage!r}, task={self.task!r}, "
            f"classes={self.class_names}, step={self.step}, checkpoint={self.checkpoint!r})")

  def images(self, images: Sequence) -> list[np.ndarray]:
    """The uint8 (H, W, 1|3) images the model sees before its resize + normalisation."""
    from tpp_jax.data.decode import as_image
    if isinstance(images, (str, pathlib.Path, np.ndarray)):
      images = [images]
    return [as_image(x, self._window, where=f"images[{i}]") for i, x in enumerate(images)]

  def predict(self, images: Sequence) -> np.ndarray | list[np.ndarray]:
    """Classification: float32 (N, classes) probabilities. Segmentation: N uint8 masks of class ids, each at its
    image's own size."""
    results = self._model.predict(self.images(images))
    if self.task == "segmentation":
      return results
    return np.stack(results).astype(np.float32) if results else np.zeros((0, len(self.class_names)), np.float32)


def load_run(run_dir, checkpoint: str = "best", batch_size: int | None = None) -> Run:
  """A finished finetune / linear / full run (its --workdir, or a pipeline arm such as PIPE/seed_0/tpp_finetune);
  `checkpoint`: 'best' (by validation metric) or 'latest'."""
  return Run(run_dir, checkpoint, batch_size)


def train(config, workdir) -> dict:
  """Run `config` (an ml_collections ConfigDict, e.g. `load_config("configs/default.py:smoke")`)
  in `workdir`, as the CLI does: a single stage or the whole pipeline, resuming what is there; -> its summary."""
  from tpp_jax import main
  return main.run(config, str(workdir))


def load_config(spec: str, **overrides):
  """The config of `configs/NAME.py[:ARG]` (a file, or a name shipped in the package), as `--config` reads it;
  `overrides`: dotted fields as keywords with `__` for dots, e.g. `data__path="x.npz"`, `steps=100`."""
  from tpp_jax.config import load_config_file
  config = load_config_file(spec)
  for key, value in overrides.items():
    *parents, leaf = key.split("__")
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config
