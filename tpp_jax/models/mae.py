"""MAE pieces: per-sample random masking (visible-only encoding), the decoder, patchify, the loss.

Masking follows the MAE paper / HF ViTMAE exactly: noise (B, N) -> argsort -> keep the first
K = int(N * (1 - mask_ratio)) patches; `ids_restore` undoes the shuffle for the decoder.

Decoder tree (convert.py maps mae_visualize_* and HF ViTMAEForPreTraining decoders onto it):
  embed/{kernel,bias}  mask_token (1,1,Dd)  pos_embed (1,1+N,Dd; fixed sin-cos)
  blocks_{i}/...  (same block as the encoder)  norm/{scale,bias}  pred/{kernel,bias} (Dd -> P*P*C)
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tpp_jax.models.linear import Dense
from tpp_jax.models.peft import Norm, PeftConfig
from tpp_jax.models.vit import Block, ViTConfig, sincos_2d


@dataclasses.dataclass(frozen=True)
class MAEDecoderConfig:
  width: int = 128
  depth: int = 2
  heads: int = 4
  mlp_dim: int = 512
  ln_eps: float = 1e-6


def random_masking(noise: jax.Array, mask_ratio: float):
  """noise (B, N) -> keep_ids (B, K), mask (B, N) float (1 = masked), ids_restore (B, N)."""
  n = noise.shape[1]
  k = int(n * (1 - mask_ratio))
  if k < 1:
    raise ValueError(f"pretext.mask_ratio={mask_ratio} leaves no visible patch out of {n}.")
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  keep_ids = ids_shuffle[:, :k]
  mask = (ids_restore >= k).astype(jnp.float32)
  return keep_ids, mask, ids_restore


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """(B, H, W, C) -> (B, N, P*P*C) in MAE's (row-in-patch, col-in-patch, channel) order."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: jax.Array, patch: int, channels: int) -> jax.Array:
  """(B, N, P*P*C) -> (B, H, W, C)."""
  b, n, _ = patches.shape
  g = int(round(n ** 0.5))
  x = patches.reshape(b, g, g, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, g * patch, g * patch, channels)


def mae_loss(pred: jax.Array, images: jax.Array, mask: jax.Array, patch: int, norm_pix_loss: bool):
  """Mean squared error on masked patches only (per-patch-normalised targets if norm_pix_loss)."""
  target = patchify(images.astype(jnp.float32), patch)
  if norm_pix_loss:
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True, ddof=1)  # torch .var() is unbiased, as in MAE / HF
    target = (target - mean) / (var + 1e-6) ** 0.5
  per_patch = jnp.square(pred.astype(jnp.float32) - target).mean(-1)
  return (per_patch * mask).sum() / mask.sum()


class MAEDecoder(nn.Module):
  """Light transformer decoder: visible tokens + mask tokens -> pixel predictions per patch (float32).

  Computes in the encoder's dtype (bf16 matmuls and attention when model.dtype=bfloat16, as torch autocast runs HF's
  decoder; LayerNorm statistics in fp32)."""
  cfg: MAEDecoderConfig
  encoder: ViTConfig

  @nn.compact
  def __call__(self, tokens, ids_restore, train: bool = False):
    """tokens (B, 1+K, D_enc) from the encoder, ids_restore (B, N) -> (B, N, P*P*C)."""
    c, e = self.cfg, self.encoder
    n = ids_restore.shape[1]
    dt = e.jnp_dtype  # the encoder's compute dtype (bf16 matmuls / attention when it computes in bf16, as autocast)
    x = Dense(c.width, name="embed", kernel_init=nn.initializers.xavier_uniform(), dtype=dt)(tokens)
    b, t, d = x.shape
    mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, d)).astype(dt)
    x_ = jnp.concatenate([x[:, 1:], jnp.broadcast_to(mask_token, (b, n + 1 - t, d))], axis=1)
    x_ = jnp.take_along_axis(x_, ids_restore[:, :, None].astype(jnp.int32), axis=1)
    x = jnp.concatenate([x[:, :1], x_], axis=1)
    grid = int(round(n ** 0.5))
    pos = self.param("pos_embed", lambda *_: jnp.asarray(sincos_2d(d, grid)), (1, 1 + n, d))
    x = x + pos.astype(dt)
    block_cfg = dataclasses.replace(e, width=c.width, depth=c.depth, heads=c.heads, mlp_dim=c.mlp_dim,
                                    ln_eps=c.ln_eps, layer_scale=False, drop_path=0.0, dropout=0.0,
                                    dtype=e.dtype)
    for i in range(c.depth):
      x = Block(block_cfg, PeftConfig(), name=f"blocks_{i}")(x, not train)
    x = Norm(c.ln_eps, PeftConfig(), dt, name="norm")(x)
    x = Dense(e.patch * e.patch * e.channels, name="pred", kernel_init=nn.initializers.xavier_uniform(), dtype=dt)(x)
    return x[:, 1:].astype(jnp.float32)


def mae_forward(encoder: nn.Module, decoder: nn.Module, params: dict, images, noise, mask_ratio: float,
                norm_pix_loss: bool, train: bool = False, rngs: Any = None):
  """Full MAE forward on a {'encoder', 'decoder'} param dict -> (loss, pred, mask)."""
  keep_ids, mask, ids_restore = random_masking(noise, mask_ratio)
  out = encoder.apply({"params": params["encoder"]}, images, keep_ids=keep_ids, train=train, rngs=rngs)
  pred = decoder.apply({"params": params["decoder"]}, out["tokens"], ids_restore, train=train, rngs=rngs)
  loss = mae_loss(pred, images, mask, encoder.cfg.patch, norm_pix_loss)
  return loss, pred, mask
