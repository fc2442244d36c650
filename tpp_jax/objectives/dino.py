"""DINO pretext on the target parameters.

Student = encoder(params) + DINO head; teacher = the same network with an EMA of the student's
trainable leaves (the frozen backbone is shared: EMA of a constant is the constant). Two augmented
global views per image (batch['image'], batch['image2']); cross-view cross-entropy between the
centred + sharpened teacher and the student; the center is an EMA of teacher outputs.
Multi-crop (local views) is not implemented: two global views only.

The center is a bias-corrected EMA (as Adam's moments): aux['center'] holds the raw EMA started at
zero and aux['center_updates'] how many batches went into it; the center used is
raw / (1 - m**n), and the first step centres with its own batch mean. DINO's plain EMA from zero
makes the first ~1/(1 - m) steps train against a target that is not centred yet and then keeps
moving while the center fills up: on a fixed batch the loss rose from 2.2 to 3.5 in 30 steps with a
student that did fit its (moving) teacher. With the corrected center the target is centred from
the first step, as the method intends.
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
    return params, {"teacher": teacher, "center": jnp.zeros((self.head.out_dim,), jnp.float32),
                    "center_updates": jnp.zeros((), jnp.float32)}

  def center(self, aux, fallback):
    """The bias-corrected center; `fallback` (the current batch's teacher mean) before any update."""
    n = aux["center_updates"]
    corrected = aux["center"] / jnp.maximum(1.0 - self.center_momentum ** n, 1e-12)
    return jnp.where(n > 0, corrected, fallback)

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
    t_mean = t.mean(0)
    c = self.center(aux, t_mean)
    loss = 0.5 * (self._cross_entropy(t1, s2, c) + self._cross_entropy(t2, s1, c))
    raw = aux["center"] * self.center_momentum + (1 - self.center_momentum) * t_mean
    return loss, ({"loss": loss}, {**aux, "center": raw, "center_updates": aux["center_updates"] + 1})

  def momentum(self, step):
    return 1.0 - (1.0 - self.m0) * (jnp.cos(math.pi * step / self.total_steps) + 1) / 2

  def after_step(self, params, aux, step):
    m = self.momentum(step)
    # t + (1 - m) (p - t) rather than m t + (1 - m) p: a leaf the student shares with the teacher
    # (the frozen backbone) stays bitwise the same instead of drifting by rounding every step.
    teacher = jax.tree_util.tree_map(lambda t, p: t + (1 - m) * (p - t), aux["teacher"], params)
    return {**aux, "teacher": teacher}

  def eval_outputs(self, params, aux, batch):
    s = self._out(params, batch["image"], False)
    t = self._out(aux["teacher"], batch["image"], False)
    valid = batch["valid"].astype(jnp.float32)
    t_mean = (t * valid[:, None]).sum(0) / jnp.maximum(valid.sum(), 1.0)
    tp = jax.nn.softmax((t - self.center(aux, t_mean)) / self.teacher_temp, axis=-1)
    per = -(tp * jax.nn.log_softmax(s / self.student_temp, axis=-1)).sum(-1)
    return {"loss_sum": (per * valid).sum(), "count": valid.sum()}
