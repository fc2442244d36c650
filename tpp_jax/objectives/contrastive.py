"""Contrastive pretext (SimCLR-style) on the target parameters.

Two augmented views of each image (batch['image'], batch['image2']) -> encoder (pooled features,
target-adapted) -> projection head `proj_head` (MLP) -> L2-normalised z -> NT-Xent / InfoNCE with
temperature pretext.contrastive_temp over the 2B views: view i's positive is the other view of
its image, the other 2B - 2 views are negatives; the mean over all 2B anchors is symmetric in the
two views. Eval (one deterministic view per image): the second view is its left-right flip.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tpp_jax.models.linear import Dense
from tpp_jax.objectives.base import Objective


class ProjectionHead(nn.Module):
  """SimCLR projection: Dense -> GELU -> Dense."""
  hidden_dim: int = 256
  out_dim: int = 128

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(Dense(self.hidden_dim, name="fc1")(x.astype(jnp.float32)), approximate=False)
    return Dense(self.out_dim, name="fc2")(x)


def nt_xent(z1, z2, temperature: float, valid=None):
  """Per-anchor NT-Xent losses (2B,) of the pairs (z1[i], z2[i]); rows with valid == 0 are no negatives.

  z1, z2: (B, K) projections (normalised here). Anchor i (of 2B) has its other view as positive and
  every other valid view as negative: -log(exp(s_ip / T) / sum_{k != i} exp(s_ik / T)), s = cosine.
  """
  z = jnp.concatenate([z1, z2], axis=0).astype(jnp.float32)
  z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  n = z.shape[0]
  b = n // 2
  logits = (z @ z.T) / temperature
  keep = ~jnp.eye(n, dtype=bool)
  if valid is not None:
    v = jnp.concatenate([valid, valid]).astype(bool)
    keep = keep & v[None, :]
  logits = jnp.where(keep, logits, -jnp.inf)
  pos = jnp.concatenate([jnp.arange(b, n), jnp.arange(0, b)])
  return jax.nn.logsumexp(logits, axis=-1) - logits[jnp.arange(n), pos]


class ContrastiveObjective(Objective):
  views = 2
  default_metric = "loss"

  def __init__(self, config, encoder):
    super().__init__(config, encoder)
    p = config.pretext
    self.temperature = float(p.contrastive_temp)
    self.head = ProjectionHead(int(p.proj_hidden_dim), int(p.proj_dim))

  def init(self, rng, encoder_params, batch):
    feats = self.encode({"encoder": encoder_params}, batch["image"][:2], False, None)["pooled"]
    return {"proj_head": self.head.init(rng, feats)["params"]}, {}

  def project(self, params, images, train, rng=None):
    feats = self.encode(params, images, train, rng)["pooled"]
    return self.head.apply({"params": params["proj_head"]}, feats)

  def _pair_losses(self, params, a, b, train, rng=None, valid=None):
    n = a.shape[0]
    z = self.project(params, jnp.concatenate([a, b], axis=0), train, rng)
    return nt_xent(z[:n], z[n:], self.temperature, valid)

  def loss(self, params, aux, batch, rng, train):
    per = self._pair_losses(params, batch["image"], batch["image2"], train, rng)
    loss = per.mean()
    n = batch["image"].shape[0]
    return loss, ({"loss": loss, "loss_view1": per[:n].mean(), "loss_view2": per[n:].mean()}, aux)

  def eval_outputs(self, params, aux, batch):
    images = batch["image"]
    valid = batch["valid"].astype(jnp.float32)
    per = self._pair_losses(params, images, jnp.flip(images, axis=2), False, valid=valid)
    n = images.shape[0]
    per = jnp.where(valid > 0, 0.5 * (per[:n] + per[n:]), 0.0)  # per image: the mean of its two anchors
    return {"loss_sum": per.sum(), "count": valid.sum()}
