"""Task and pretext heads: classification, 2D segmentation decoder, DINO projection head."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tpp_jax.models.linear import Dense


class ClassifierHead(nn.Module):
  """Linear head on pooled features; `bn_linear` = BatchNorm (no affine) + linear (MAE linear probe)."""
  num_classes: int
  kind: str = "linear"

  @nn.compact
  def __call__(self, feats, train: bool = False):
    x = feats.astype(jnp.float32)
    if self.kind == "bn_linear":
      x = nn.BatchNorm(use_running_average=not train, use_bias=False, use_scale=False, epsilon=1e-6,
                       momentum=0.9, name="bn")(x)
    return Dense(self.num_classes, name="fc", kernel_init=nn.initializers.truncated_normal(0.01))(x)


class SegDecoder(nn.Module):
  """UNETR-lite: fuse 4 ViT levels at the patch grid, upsample x2 until full resolution.

  levels: tuple of (B, g*g, D) patch tokens from 4 depths; images: (B, H, W, C) for a full-res skip.
  Output (B, H, W, num_classes) logits.
  """
  num_classes: int
  dim: int = 64
  patch: int = 16

  @nn.compact
  def __call__(self, levels: Sequence[jax.Array], images: jax.Array, train: bool = False):
    b, h, w, _ = images.shape
    g = h // self.patch
    feats = [Dense(self.dim, name=f"proj_{i}")(lv.astype(jnp.float32)).reshape(b, g, g, self.dim)
             for i, lv in enumerate(levels)]
    x = nn.Conv(self.dim, (1, 1), name="fuse")(jnp.concatenate(feats, axis=-1))
    i, size = 0, g
    while size < h:
      size = min(size * 2, h)
      x = jax.image.resize(x, (b, size, size, x.shape[-1]), "bilinear")
      ch = max(self.dim // (2 ** (i + 1)), 16)
      x = nn.gelu(nn.GroupNorm(num_groups=min(8, ch), name=f"up_norm_{i}")(nn.Conv(ch, (3, 3), name=f"up_conv_{i}")(x)))
      i += 1
    skip = nn.gelu(nn.Conv(16, (3, 3), name="skip_conv")(images.astype(jnp.float32)))
    x = jnp.concatenate([x, skip], axis=-1)
    x = nn.gelu(nn.Conv(16, (3, 3), name="out_conv")(x))
    return nn.Conv(self.num_classes, (1, 1), name="logits")(x)


def level_indices(depth: int, n: int = 4) -> tuple[int, ...]:
  """Blocks whose outputs feed the segmentation decoder: evenly spaced, last block included."""
  return tuple(sorted({max(0, round(depth * (k + 1) / n) - 1) for k in range(n)}))


class DINOHead(nn.Module):
  """DINO projection head: MLP -> L2-normalised bottleneck -> weight-normalised prototypes.

  batch_norm: standardise each input feature over the batch first (mean 0, variance 1 per dim; `weights` marks the
  rows that count, e.g. eval padding), a parameter-free BatchNorm in training mode, as DINO's head has for backbones
  that need it. A frozen backbone gives nearly the same pooled feature for every image (house ViT on the chest
  X-rays: mean cosine similarity 0.985); through the plain head the centred teacher is then uniform (entropy 6.89 of
  log 1024 = 6.93) and DINO has nothing to learn; standardised, the same untrained head gives a teacher entropy of 4.84.
  """
  out_dim: int = 1024
  hidden_dim: int = 512
  bottleneck_dim: int = 128
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x, weights=None):
    x = x.astype(jnp.float32)
    if self.batch_norm:
      w = jnp.ones(x.shape[:1], jnp.float32) if weights is None else weights.astype(jnp.float32)
      w = (w / jnp.maximum(w.sum(), 1.0))[:, None]
      mean = (x * w).sum(0)
      var = (jnp.square(x - mean) * w).sum(0)
      x = (x - mean) * jax.lax.rsqrt(var + 1e-5)
    init = nn.initializers.truncated_normal(0.02)
    x = nn.gelu(Dense(self.hidden_dim, kernel_init=init, name="fc1")(x), approximate=False)
    x = nn.gelu(Dense(self.hidden_dim, kernel_init=init, name="fc2")(x), approximate=False)
    x = Dense(self.bottleneck_dim, kernel_init=init, name="fc3")(x)
    x = x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)
    v = self.param("prototypes", init, (self.bottleneck_dim, self.out_dim))
    return x @ (v / jnp.linalg.norm(v, axis=0, keepdims=True))
