"""2D segmentation: 4 ViT levels -> UNETR-lite decoder -> full-resolution logits; Dice + CE."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from tpp_jax import metrics
from tpp_jax.models.heads import SegDecoder, level_indices
from tpp_jax.objectives.base import Objective


def soft_dice_loss(logits, target, num_classes, eps=1.0):
  """1 - mean soft Dice over foreground classes, pooled over the batch."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  onehot = jax.nn.one_hot(target, num_classes)
  inter = (probs * onehot).sum(axis=(0, 1, 2))
  denom = probs.sum(axis=(0, 1, 2)) + onehot.sum(axis=(0, 1, 2))
  dice = (2 * inter + eps) / (denom + eps)
  return 1.0 - dice[1:].mean()


class SegmentationObjective(Objective):
  needs_labels = True
  default_metric = metrics.MAIN_METRIC["segmentation"]

  def __init__(self, config, encoder):
    super().__init__(config, encoder)
    self.num_classes = int(config.task.num_classes)
    self.dice_weight = float(config.task.dice_weight)
    self.levels = level_indices(encoder.cfg.depth)
    self.head = SegDecoder(self.num_classes, int(config.task.seg_decoder_dim), encoder.cfg.patch)

  def _levels(self, params, images, train, rng):
    out = self.encode(params, images, train, rng)
    return [out["blocks"][i] for i in self.levels]

  def init(self, rng, encoder_params, batch):
    images = batch["image"][:1]
    lv = self._levels({"encoder": encoder_params}, images, False, None)
    return {"head": self.head.init(rng, lv, images)["params"]}, {}

  def logits(self, params, images, train, rng=None):
    return self.head.apply({"params": params["head"]}, self._levels(params, images, train, rng), images, train=train)

  def loss(self, params, aux, batch, rng, train):
    logits = self.logits(params, batch["image"], train, rng)
    target = batch["mask"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), target).mean()
    dice = soft_dice_loss(logits, target, self.num_classes)
    loss = ce + self.dice_weight * dice
    return loss, ({"loss": loss, "ce": ce, "soft_dice_loss": dice}, aux)

  def eval_outputs(self, params, aux, batch):
    logits = self.logits(params, batch["image"], False)
    pred = logits.argmax(-1)
    valid = batch["valid"].astype(bool)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["mask"]).mean((1, 2))
    return {"counts": metrics.seg_counts(pred, batch["mask"], self.num_classes, valid),
            "loss_sum": (ce * valid).sum(), "count": valid.sum()}

  def accumulator(self):
    return metrics.SegMetrics(self.num_classes)
