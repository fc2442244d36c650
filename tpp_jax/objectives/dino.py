"""DINO pretext on the target parameters, with multi-crop and teacher-temperature warm-up.

Student = encoder(params) + DINO head; teacher = the same network with an EMA of the student's
trainable leaves (the frozen backbone is shared: EMA of a constant is the constant).

Views (built by `make_views`, keys of the batch): two global views at the model's image size
(batch['image'], batch['image2']) and, with pretext.local_crops = L > 0, L local views at
pretext.local_crop_size (batch['local'], (B, L, s, s, C); area fractions pretext.local_crop_scale).
The student sees every view, the teacher only the two globals; the loss is the mean over all
(teacher global i, student view j != i) pairs of the cross-entropy between the centred + sharpened
teacher and the student, as in the DINO paper (2 (L + 1) terms).

Local crops go through the same encoder with its position embeddings resized (bicubic, as DINO's
interpolate_pos_encoding) from the model's patch grid to the local grid: a second Linen ViT with
image_size = local_crop_size applied to the same parameters, pos_embed swapped for the resized one.
Gradients reach pos_embed through the resize (where it is trainable).

pretext.dino_batch_norm (default on) standardises the pooled features over the batch before the head (per forward
call: the two globals together, the local crops together, as DINO's BatchNorm head over concatenated crops): the
features of a frozen backbone barely differ between images, and without it the teacher stays uniform (models/heads.py).

Teacher temperature: linear warm-up from pretext.teacher_temp_warmup to pretext.teacher_temp over
pretext.teacher_temp_warmup_steps train steps (0 = none), counted by aux['center_updates'] (one
per train step).

The center is a bias-corrected EMA (as Adam's moments): aux['center'] holds the raw EMA started at
zero and aux['center_updates'] how many batches went into it; the center used is
raw / (1 - m**n), and the first step centres with its own batch mean. DINO's plain EMA from zero
makes the first ~1/(1 - m) steps train against a target that is not centred yet and then keeps
moving while the center fills up: on a fixed batch the loss rose from 2.2 to 3.5 in 30 steps with a
student that did fit its (moving) teacher. With the corrected center the target is centred from
the first step, as the method intends.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from tpp_jax.models.heads import DINOHead
from tpp_jax.models.vit import ViT
from tpp_jax.objectives.base import Objective


def resize_pos_embed(pos, grid: int):
  """(1, 1+g*g, D) position embedding -> (1, 1+grid*grid, D): the patch part resized bicubically."""
  n, d = pos.shape[1] - 1, pos.shape[2]
  g = int(round(math.sqrt(n)))
  if g == grid:
    return pos
  patches = pos[:, 1:].reshape(1, g, g, d).astype(jnp.float32)
  patches = jax.image.resize(patches, (1, grid, grid, d), "bicubic").astype(pos.dtype)
  return jnp.concatenate([pos[:, :1], patches.reshape(1, grid * grid, d)], axis=1)


class DINOObjective(Objective):
  views = 2
  default_metric = "loss"

  def __init__(self, config, encoder):
    super().__init__(config, encoder)
    p = config.pretext
    self.head = DINOHead(p.dino_out_dim, p.dino_hidden_dim, p.dino_bottleneck_dim, bool(p.dino_batch_norm))
    self.teacher_temp, self.student_temp = float(p.teacher_temp), float(p.student_temp)
    self.temp_start = float(p.teacher_temp_warmup)
    self.temp_steps = int(p.teacher_temp_warmup_steps)
    self.center_momentum, self.m0 = float(p.center_momentum), float(p.teacher_momentum)
    self.total_steps = max(int(config.steps), 1)
    self.local_crops = int(p.local_crops)
    self.local_size = int(p.local_crop_size)
    self.local_scale = tuple(float(s) for s in p.local_crop_scale)
    self.local_encoder = None
    if self.local_crops > 0:
      if self.local_size <= 0 or self.local_size % encoder.cfg.patch:
        raise ValueError(f"pretext.local_crop_size={self.local_size} must be a positive multiple of the patch "
                         f"size {encoder.cfg.patch}.")
      if self.local_size != encoder.cfg.image_size:
        self.local_encoder = ViT(dataclasses.replace(encoder.cfg, image_size=self.local_size), encoder.peft)

  def make_views(self, train_fn, data_cfg):
    from tpp_jax.data import transforms
    return transforms.make_views(train_fn, data_cfg, views=2, local_crops=self.local_crops,
                                 local_crop_size=self.local_size, local_crop_scale=self.local_scale)

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

  def teacher_temperature(self, step):
    """Linear warm-up from teacher_temp_warmup to teacher_temp over teacher_temp_warmup_steps."""
    if self.temp_steps <= 0:
      return jnp.float32(self.teacher_temp)
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / self.temp_steps, 0.0, 1.0)
    return self.temp_start + (self.teacher_temp - self.temp_start) * frac

  def _out(self, params, images, train, rng=None, weights=None):
    feats = self.encode(params, images, train, rng)["pooled"]
    return self.head.apply({"params": params["dino_head"]}, feats, weights)

  def _local_out(self, params, images, train, rng=None):
    """Student outputs of local crops (N, s, s, C): the encoder at the local size, pos-emb resized."""
    if self.local_encoder is None:
      return self._out(params, images, train, rng)
    enc = dict(params["encoder"])
    enc["pos_embed"] = resize_pos_embed(enc["pos_embed"], self.local_encoder.cfg.grid)
    rngs = {"dropout": rng} if train else None
    feats = self.local_encoder.apply({"params": enc}, images, train=train, rngs=rngs)["pooled"]
    return self.head.apply({"params": params["dino_head"]}, feats)

  def loss(self, params, aux, batch, rng, train):
    b = batch["image"].shape[0]
    r_glob, r_loc = jax.random.split(rng)
    both = jnp.concatenate([batch["image"], batch["image2"]], axis=0)
    s = self._out(params, both, train, r_glob)
    t = jax.lax.stop_gradient(self._out(aux["teacher"], both, False))
    student = [s[:b], s[b:]]
    if self.local_crops > 0:
      if "local" not in batch:
        raise ValueError("pretext.local_crops > 0 but the batch has no 'local' views: build the training "
                         "transform with objective.make_views(train_fn, config.data).")
      loc = batch["local"]
      n_loc = loc.shape[1]
      s_loc = self._local_out(params, loc.reshape((b * n_loc,) + loc.shape[2:]), train, r_loc)
      s_loc = s_loc.reshape(b, n_loc, -1)
      student += [s_loc[:, j] for j in range(n_loc)]
    t_mean = t.mean(0)
    c = self.center(aux, t_mean)
    temp = self.teacher_temperature(aux["center_updates"])
    teach = [jax.nn.softmax((tt - c) / temp, axis=-1) for tt in (t[:b], t[b:])]
    logp = [jax.nn.log_softmax(sv / self.student_temp, axis=-1) for sv in student]
    terms = [-(tp * lp).sum(-1).mean() for i, tp in enumerate(teach) for j, lp in enumerate(logp) if j != i]
    loss = sum(terms) / len(terms)
    raw = aux["center"] * self.center_momentum + (1 - self.center_momentum) * t_mean
    mets = {"loss": loss, "teacher_temp": temp}
    return loss, (mets, {**aux, "center": raw, "center_updates": aux["center_updates"] + 1})

  def momentum(self, step):
    return 1.0 - (1.0 - self.m0) * (jnp.cos(math.pi * step / self.total_steps) + 1) / 2

  def after_step(self, params, aux, step):
    m = self.momentum(step)
    # t + (1 - m) (p - t) rather than m t + (1 - m) p: a leaf the student shares with the teacher
    # (the frozen backbone) stays bitwise the same instead of drifting by rounding every step.
    teacher = jax.tree_util.tree_map(lambda t, p: t + (1 - m) * (p - t), aux["teacher"], params)
    return {**aux, "teacher": teacher}

  def eval_outputs(self, params, aux, batch):
    valid = batch["valid"].astype(jnp.float32)
    s = self._out(params, batch["image"], False, weights=valid)
    t = self._out(aux["teacher"], batch["image"], False, weights=valid)
    t_mean = (t * valid[:, None]).sum(0) / jnp.maximum(valid.sum(), 1.0)
    temp = self.teacher_temperature(aux["center_updates"])
    tp = jax.nn.softmax((t - self.center(aux, t_mean)) / temp, axis=-1)
    per = -(tp * jax.nn.log_softmax(s / self.student_temp, axis=-1)).sum(-1)
    return {"loss_sum": (per * valid).sum(), "count": valid.sum()}
