"""DINO pretext on the target parameters.

Student = encoder(params) + DINO head; teacher = the same network with an EMA of the student's
trainable leaves (the frozen backbone is shared: EMA of a constant is the constant). Two augmented
global views per image (batch['image'], batch['image2']); cross-view cross-entropy between the
centred + sharpened teacher and the student; the center is an EMA of teacher outputs.
Multi-crop (local views) is not implemented: two global views only.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from tpp_jax.models.heads import DINOHead
from tpp_jax.objectives.base import Objective


class DINOObjective(Objective):
  views = 2
  default_metric = "loss"

  def __init__(self, config, encoder):
    super().__init__(config, encoder)
    p = config.pretext
    self.head = DINOHead(p.dino_out_dim, p.dino_hidden_dim, p.dino_bottleneck_dim)
    self.teacher_temp, self.student_temp = float(p.teacher_temp), float(p.student_temp)
    self.center_momentum, self.m0 = float(p.center_momentum), float(p.teacher_momentum)
    self.total_steps = max(int(config.steps), 1)

  def init(self, rng, encoder_params, batch):
    feats = self.encode({"encoder": encoder_params}, batch["image"][:2], False, None)["pooled"]
    params = {"dino_head": self.head.init(rng, feats)["params"]}
    teacher = jax.tree_util.tree_map(jnp.asarray, {"encoder": encoder_params, **params})
    return params, {"teacher": teacher, "center": jnp.zeros((self.head.out_dim,), jnp.float32)}

  def _out(self, params, images, train, rng=None):
    feats = self.encode(params, images, train, rng)["pooled"]
    return self.head.apply({"params": params["dino_head"]}, feats)

  def _cross_entropy(self, teacher_out, student_out, center):
    t = jax.nn.softmax((teacher_out - center) / self.teacher_temp, axis=-1)
    return -(t * jax.nn.log_softmax(student_out / self.student_temp, axis=-1)).sum(-1).mean()

  def loss(self, params, aux, batch, rng, train):
    b = batch["image"].shape[0]
    both = jnp.concatenate([batch["image"], batch["image2"]], axis=0)
    s = self._out(params, both, train, rng)
    t = jax.lax.stop_gradient(self._out(aux["teacher"], both, False))
    s1, s2, t1, t2 = s[:b], s[b:], t[:b], t[b:]
    c = aux["center"]
    loss = 0.5 * (self._cross_entropy(t1, s2, c) + self._cross_entropy(t2, s1, c))
    center = c * self.center_momentum + (1 - self.center_momentum) * t.mean(0)
    return loss, ({"loss": loss}, {**aux, "center": center})

  def momentum(self, step):
    return 1.0 - (1.0 - self.m0) * (jnp.cos(math.pi * step / self.total_steps) + 1) / 2

  def after_step(self, params, aux, step):
    m = self.momentum(step)
    teacher = jax.tree_util.tree_map(lambda t, p: m * t + (1 - m) * p, aux["teacher"], params)
    return {**aux, "teacher": teacher}

  def eval_outputs(self, params, aux, batch):
    s = self._out(params, batch["image"], False)
    t = self._out(aux["teacher"], batch["image"], False)
    tp = jax.nn.softmax((t - aux["center"]) / self.teacher_temp, axis=-1)
    per = -(tp * jax.nn.log_softmax(s / self.student_temp, axis=-1)).sum(-1)
    valid = batch["valid"].astype(jnp.float32)
    return {"loss_sum": (per * valid).sum(), "count": valid.sum()}
