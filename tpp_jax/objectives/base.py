"""The objective interface the engine trains with (one per pretext / task).

An objective owns the non-encoder parameters it needs (decoder, head, ...), the loss, what an
eval step returns, and how those outputs become dataset-level metrics on the host.

  init(rng, encoder, encoder_params, batch) -> (params without 'encoder', aux)
      aux: non-gradient state (BatchNorm stats, DINO teacher and center); {} if none.
  loss(params, aux, batch, rng, train) -> (loss, (metrics: dict of scalars, aux))
  after_step(params, aux, step) -> aux        (e.g. EMA teacher update)
  eval_outputs(params, aux, batch) -> dict of arrays (jit-compiled; batch['valid'] marks real rows)
  accumulator() -> object with .add(outputs: dict of np arrays) and .compute() -> dict of floats
  views: number of augmented views of each training image the loss needs (2 for DINO / contrastive)
  make_views(train_fn, data_cfg) -> the training transform with those views ('image2', DINO's 'local');
      the engine builds its training transform with it
  default_metric: metric used for best-checkpoint selection (higher is better unless in LOWER_IS_BETTER)
"""
from __future__ import annotations

from typing import Any

import numpy as np

LOWER_IS_BETTER = ("loss",)


class Objective:
  views: int = 1
  needs_labels: bool = False
  default_metric: str = "loss"

  def __init__(self, config, encoder):
    self.config = config
    self.encoder = encoder

  def init(self, rng, encoder_params, batch):
    raise NotImplementedError

  def loss(self, params, aux, batch, rng, train: bool):
    raise NotImplementedError

  def after_step(self, params, aux, step):
    return aux

  def make_views(self, train_fn, data_cfg):
    """The training transform giving the views this objective's loss reads."""
    from tpp_jax.data import transforms
    return transforms.make_views(train_fn, data_cfg, views=self.views)

  def eval_outputs(self, params, aux, batch):
    raise NotImplementedError

  def accumulator(self):
    return MeanLoss()

  def encode(self, params, images, train, rng, keep_ids=None, encoder_params=None):
    rngs = {"dropout": rng} if train else None
    return self.encoder.apply({"params": encoder_params if encoder_params is not None else params["encoder"]},
                              images, keep_ids=keep_ids, train=train, rngs=rngs)


class MeanLoss:
  """Example-weighted mean of a per-batch `loss_sum` / `count` pair."""

  def __init__(self):
    self.total, self.count = 0.0, 0.0

  def add(self, out: dict[str, Any]):
    self.total += float(np.asarray(out["loss_sum"]))
    self.count += float(np.asarray(out["count"]))

  def compute(self):
    return {"loss": self.total / max(self.count, 1.0)}
