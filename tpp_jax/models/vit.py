"""Flax Linen Vision Transformer with PEFT hooks, visible-token (MAE) input and intermediates.

Parameter tree (what checkpoints/convert.py produces):
  patch_embed/{kernel (P,P,C,D), bias}   cls (1,1,D)   pos_embed (1,1+N,D)   [reg (1,R,D)]
  blocks_{i}/norm1/{scale,bias}  blocks_{i}/attn/{q,k,v,o}/{kernel,bias}  [blocks_{i}/ls1]
  blocks_{i}/norm2/{scale,bias}  blocks_{i}/mlp/{fc1,fc2}/{kernel,bias}   [blocks_{i}/ls2]
  norm/{scale,bias}
plus the PEFT leaves of models/peft.py.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tpp_jax.models.attention import attention
from tpp_jax.models.peft import Adapter, Norm, PeftConfig, PeftDense

# name -> (width, depth, heads, mlp_dim)
VARIANTS = {
    "Mu": (64, 4, 2, 256),       # test-sized
    "Ti6": (192, 6, 3, 768),     # the house backbone: ViT-Ti with 6 blocks
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "M": (512, 12, 8, 2048),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Architecture of the backbone; hashable so it can be a Linen attribute."""
  width: int = 192
  depth: int = 12
  heads: int = 3
  mlp_dim: int = 768
  patch: int = 16
  image_size: int = 224
  channels: int = 3
  pooling: str = "cls"          # cls | gap
  pos_emb: str = "learned"      # learned | sincos (fixed 2D sin-cos, as in MAE)
  ln_eps: float = 1e-6
  layer_scale: bool = False     # DINOv2-style LayerScale (ls1, ls2)
  drop_path: float = 0.0
  dropout: float = 0.0
  dtype: str = "float32"        # compute dtype: float32 | bfloat16
  attention: str = "auto"       # auto (cuDNN on GPU in bf16, else XLA) | xla | cudnn
  remat: bool = False           # recompute each block's activations in the backward pass (memory for compute)

  def __post_init__(self):
    if self.image_size % self.patch:
      raise ValueError(f"model.image_size={self.image_size} is not a multiple of the patch size {self.patch}.")
    if self.width % self.heads:
      raise ValueError(f"model width {self.width} is not divisible by heads {self.heads}.")
    if self.pooling not in ("cls", "gap"):
      raise ValueError(f"model.pooling={self.pooling!r}; valid: 'cls', 'gap'.")
    if self.pos_emb not in ("learned", "sincos"):
      raise ValueError(f"model.pos_emb={self.pos_emb!r}; valid: 'learned', 'sincos'.")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"model.dtype={self.dtype!r}; valid: 'float32', 'bfloat16'.")
    if self.attention not in ("auto", "xla", "cudnn"):
      raise ValueError(f"model.attention={self.attention!r}; valid: 'auto', 'xla', 'cudnn'.")

  @property
  def grid(self) -> int:
    return self.image_size // self.patch

  @property
  def num_patches(self) -> int:
    return self.grid ** 2

  @property
  def jnp_dtype(self):
    return jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32

  @classmethod
  def from_variant(cls, variant: str, **overrides) -> "ViTConfig":
    """'B/16' -> ViT-B with 16 px patches; keyword overrides win (width=..., depth=..., ...)."""
    m = re.fullmatch(r"([A-Za-z]+\d*)/(\d+)", variant)
    if not m or m.group(1) not in VARIANTS:
      raise ValueError(f"model.variant={variant!r}; expected NAME/PATCH with NAME in {sorted(VARIANTS)} "
                       "(e.g. 'Ti/16').")
    w, d, h, mlp = VARIANTS[m.group(1)]
    base = dict(width=w, depth=d, heads=h, mlp_dim=mlp, patch=int(m.group(2)))
    base.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**base)

  @classmethod
  def from_config(cls, model_cfg: Mapping[str, Any]) -> "ViTConfig":
    d = dict(model_cfg)
    d.pop("frozen_dtype", None)  # how the engine stores frozen weights (build.storage_dtypes), not architecture
    variant = d.pop("variant", "Ti/16")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"Unknown model option(s) {unknown}; valid: {sorted(known | {'variant'})}.")
    return cls.from_variant(variant, **d)


def sincos_2d(width: int, grid: int, cls_token: bool = True) -> np.ndarray:
  """Fixed 2D sin-cos position embedding of MAE (get_2d_sincos_pos_embed), shape (1, [1+]N, D)."""
  def one_d(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  gh, gw = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
  # MAE: grid = meshgrid(w, h) -> emb_h uses grid[0] (w coords), emb_w uses grid[1].
  emb = np.concatenate([one_d(width // 2, gh), one_d(width // 2, gw)], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros((1, width)), emb], axis=0)
  return emb[None].astype(np.float32)


class DropPath(nn.Module):
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return x * mask.astype(x.dtype) / keep


class Attention(nn.Module):
  cfg: ViTConfig
  peft: PeftConfig

  @nn.compact
  def __call__(self, x, deterministic: bool):
    c, dt = self.cfg, self.cfg.jnp_dtype
    b, t, _ = x.shape
    hd = c.width // c.heads
    dense = lambda name: PeftDense(c.width, site=name, peft=self.peft, dtype=dt, name=name)
    q, k, v = (dense(n)(x, deterministic=deterministic).reshape(b, t, c.heads, hd) for n in "qkv")
    out = attention(q, k, v, c.attention)
    return dense("o")(out.reshape(b, t, c.width), deterministic=deterministic)


class Block(nn.Module):
  cfg: ViTConfig
  peft: PeftConfig
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic: bool):
    c, p, dt = self.cfg, self.peft, self.cfg.jnp_dtype
    dp = DropPath(self.drop_path)
    h = Attention(c, p, name="attn")(Norm(c.ln_eps, p, dt, name="norm1")(x), deterministic)
    if c.layer_scale:
      h = h * self.param("ls1", nn.initializers.constant(1e-5), (c.width,)).astype(dt)
    if p.type == "adapter":  # Houlsby serial adapter after attention
      h = h + Adapter(p.adapter_dim, dt, name="adapter_attn")(h)
    x = x + dp(h, deterministic)

    y = Norm(c.ln_eps, p, dt, name="norm2")(x)
    h = Mlp(c, p, name="mlp")(y, deterministic)
    if c.layer_scale:
      h = h * self.param("ls2", nn.initializers.constant(1e-5), (c.width,)).astype(dt)
    if p.type == "adapter":  # Houlsby serial adapter after the MLP
      h = h + Adapter(p.adapter_dim, dt, name="adapter_mlp")(h)
    if p.type == "adaptformer":  # AdaptFormer: parallel to the MLP, fed with the block input
      h = h + p.adapter_scale * Adapter(p.adapter_dim, dt, name="adaptformer")(x)
    return x + dp(h, deterministic)


class Mlp(nn.Module):
  cfg: ViTConfig
  peft: PeftConfig

  @nn.compact
  def __call__(self, x, deterministic: bool):
    c, dt = self.cfg, self.cfg.jnp_dtype
    h = PeftDense(c.mlp_dim, site="fc1", peft=self.peft, dtype=dt, name="fc1")(x, deterministic=deterministic)
    h = nn.gelu(h, approximate=False)
    if c.dropout:
      h = nn.Dropout(c.dropout)(h, deterministic=deterministic)
    return PeftDense(c.width, site="fc2", peft=self.peft, dtype=dt, name="fc2")(h, deterministic=deterministic)


class ViT(nn.Module):
  """ViT encoder.

  __call__(images (B,H,W,C), keep_ids=None (B,K) int: indices of the patches to keep (MAE's
  visible-only encoding), train=False) -> dict with
    tokens:  (B, 1+K, D) final-normed [cls, patches] (prompts removed)
    pooled:  (B, D) by cfg.pooling
    blocks:  tuple of (B, K, D) patch tokens after every block (before the final norm)
  """
  cfg: ViTConfig
  peft: PeftConfig = PeftConfig()

  def embed(self, images):
    c = self.cfg
    if images.ndim != 4 or tuple(images.shape[1:]) != (c.image_size, c.image_size, c.channels):
      raise ValueError(f"ViT expects images of shape (B, {c.image_size}, {c.image_size}, {c.channels}); got "
                       f"{tuple(images.shape)}. Set model.image_size / model.channels or data.image_size / "
                       "data.channels.")
    x = nn.Conv(c.width, (c.patch, c.patch), strides=(c.patch, c.patch), padding="VALID",
                dtype=c.jnp_dtype, name="patch_embed")(images.astype(c.jnp_dtype))
    return x.reshape(x.shape[0], -1, c.width)

  @nn.compact
  def __call__(self, images, keep_ids=None, train: bool = False):
    c, p, dt = self.cfg, self.peft, self.cfg.jnp_dtype
    deterministic = not train
    x = self.embed(images)
    b, n, d = x.shape
    if c.pos_emb == "sincos":
      pos_init = lambda *_: jnp.asarray(sincos_2d(d, c.grid))
    else:
      pos_init = nn.initializers.normal(0.02)
    pos = self.param("pos_embed", pos_init, (1, 1 + n, d)).astype(dt)
    cls = self.param("cls", nn.initializers.normal(1e-6), (1, 1, d)).astype(dt)
    x = x + pos[:, 1:]
    if keep_ids is not None:
      x = jnp.take_along_axis(x, keep_ids[:, :, None].astype(jnp.int32), axis=1)
    x = jnp.concatenate([jnp.broadcast_to(cls + pos[:, :1], (b, 1, d)), x], axis=1)
    if c.dropout:
      x = nn.Dropout(c.dropout)(x, deterministic=deterministic)

    n_prompt = p.num_prompts if p.type == "vpt" else 0
    if n_prompt:
      prompts = self.param("prompts", nn.initializers.xavier_uniform(), (c.depth if p.deep else 1, n_prompt, d))
      pr_drop = nn.Dropout(p.prompt_dropout) if p.prompt_dropout else None

      def with_prompts(x, i):
        pr = jnp.broadcast_to(prompts[i].astype(dt)[None], (b, n_prompt, d))
        if pr_drop is not None:
          pr = pr_drop(pr, deterministic=deterministic)
        return jnp.concatenate([x[:, :1], pr, x[:, 1 + (n_prompt if i else 0):]], axis=1)
      x = with_prompts(x, 0)

    dpr = np.linspace(0.0, c.drop_path, c.depth)
    block = nn.remat(Block, static_argnums=(2,)) if c.remat else Block  # (self, x, deterministic): static flag
    inter = []
    for i in range(c.depth):
      if n_prompt and p.deep and i > 0:
        x = with_prompts(x, i)
      x = block(c, p, float(dpr[i]), name=f"blocks_{i}")(x, deterministic)
      inter.append(x[:, 1 + n_prompt:])
    x = Norm(c.ln_eps, p, dt, name="norm")(x)
    tokens = jnp.concatenate([x[:, :1], x[:, 1 + n_prompt:]], axis=1)
    pooled = tokens[:, 0] if c.pooling == "cls" else tokens[:, 1:].mean(axis=1)
    return {"tokens": tokens, "pooled": pooled, "blocks": tuple(inter)}
