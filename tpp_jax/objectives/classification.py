"""Classification: pooled ViT features -> linear (or BN + linear) head, cross-entropy."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from tpp_jax import metrics
from tpp_jax.models.heads import ClassifierHead
from tpp_jax.objectives.base import Objective


class ClassificationObjective(Objective):
  needs_labels = True
  default_metric = metrics.MAIN_METRIC["classification"]

  def __init__(self, config, encoder):
    super().__init__(config, encoder)
    t = config.task
    self.num_classes = int(t.num_classes)
    self.label_smoothing = float(t.label_smoothing)
    self.head = ClassifierHead(self.num_classes, t.head)
    self.class_weights = None  # set by the engine from the training labels when task.class_weights

  def init(self, rng, encoder_params, batch):
    feats = self.encode({"encoder": encoder_params}, batch["image"][:2], False, None)["pooled"]
    v = self.head.init(rng, feats, train=False)
    return {"head": v["params"]}, ({"batch_stats": v["batch_stats"]} if "batch_stats" in v else {})

  def logits(self, params, aux, images, train, rng=None):
    feats = self.encode(params, images, train, rng)["pooled"]
    variables = {"params": params["head"], **aux}
    if train and aux:
      logits, new = self.head.apply(variables, feats, train=True, mutable=["batch_stats"])
      return logits, {**aux, **new}
    return self.head.apply(variables, feats, train=train), aux

  def loss(self, params, aux, batch, rng, train):
    logits, aux = self.logits(params, aux, batch["image"], train, rng)
    labels = batch["label"]
    onehot = optax.smooth_labels(jax.nn.one_hot(labels, self.num_classes), self.label_smoothing)
    per_example = optax.softmax_cross_entropy(logits, onehot)
    if self.class_weights is not None:
      w = jnp.asarray(self.class_weights, jnp.float32)[labels]
      loss = (per_example * w).sum() / w.sum()
    else:
      loss = per_example.mean()
    acc = (logits.argmax(-1) == labels).mean()
    return loss, ({"loss": loss, "accuracy": acc}, aux)

  def eval_outputs(self, params, aux, batch):
    logits, _ = self.logits(params, aux, batch["image"], False)
    return {"probs": jax.nn.softmax(logits.astype(jnp.float32)), "label": batch["label"], "valid": batch["valid"],
            "loss": optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])}

  def accumulator(self):
    return metrics.ClassificationAccumulator()
