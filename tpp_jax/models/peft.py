"""PEFT building blocks: LoRA / DoRA / SSF dense layers, SSF norms, adapters, VPT prompts, merge().

Every new ("target") parameter has a recognisable leaf name so partition rules can find it:
  lora_a, lora_b            LoRA low-rank factors (kernel += scale * lora_a @ lora_b)
  dora_m                    DoRA magnitude (one per output feature)
  ssf_scale, ssf_shift      SSF scale and shift after a linear layer or a norm
  adapter_*/...             Houlsby serial adapters and AdaptFormer parallel adapters
  prompts                   VPT prompt tokens
BitFit adds no modules: it is a partition rule that makes backbone biases trainable.

All additions are initialised so that a freshly added method leaves the backbone's output unchanged
(LoRA B = 0, DoRA m = ||W||, SSF scale = 1 / shift = 0, adapter up-projection = 0). VPT is the
exception by nature: prompt tokens attend with the image tokens.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tpp_jax.models.linear import Dense, token_matmul

PEFT_TYPES = ("none", "lora", "dora", "adapter", "adaptformer", "vpt", "ssf", "bitfit")
LORA_SITES = ("q", "k", "v", "o", "fc1", "fc2")


@dataclasses.dataclass(frozen=True)
class PeftConfig:
  """What PEFT method to add to the ViT (hashable, so it can be a Linen attribute)."""
  type: str = "none"
  # LoRA / DoRA
  rank: int = 8
  alpha: float = 8.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ("q", "v")
  rslora: bool = False
  # adapters (Houlsby serial / AdaptFormer parallel)
  adapter_dim: int = 8
  adapter_scale: float = 0.1
  # VPT
  num_prompts: int = 10
  deep: bool = False
  prompt_dropout: float = 0.0

  def __post_init__(self):
    if self.type not in PEFT_TYPES:
      raise ValueError(f"peft.type={self.type!r} is not one of {PEFT_TYPES}; set --config.peft.type.")
    bad = [t for t in self.targets if t not in LORA_SITES]
    if bad:
      raise ValueError(f"peft.targets has {bad}; valid LoRA/DoRA sites are {LORA_SITES}.")
    if self.type in ("lora", "dora") and self.rank <= 0:
      raise ValueError(f"peft.rank must be positive for {self.type}, got {self.rank}.")

  @property
  def lora_scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  def lora_on(self, site: str) -> bool:
    return self.type in ("lora", "dora") and site in self.targets

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any] | None) -> "PeftConfig":
    if cfg is None:
      return cls()
    d = dict(cfg)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"Unknown peft option(s) {unknown}; valid: {sorted(known)}.")
    if "targets" in d:
      t = d["targets"]
      d["targets"] = tuple(t.split(",")) if isinstance(t, str) else tuple(t)
    return cls(**d)


def _lora_a_init(key, shape, dtype=jnp.float32):
  """peft's kaiming_uniform_(a=sqrt(5)) on a (r, in) weight == U(-1/sqrt(in), 1/sqrt(in))."""
  bound = 1.0 / math.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class PeftDense(nn.Module):
  """Dense layer (kernel (in, out), bias) with optional LoRA / DoRA / SSF on top.

  `site` names the layer (q, k, v, o, fc1, fc2) so the PEFT config decides what applies.
  """
  features: int
  site: str
  peft: PeftConfig = PeftConfig()
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, x, *, deterministic: bool = True):
    cfg = self.peft
    d_in = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (d_in, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32) if self.use_bias else None
    x = x.astype(self.dtype)
    if cfg.lora_on(self.site):
      a = self.param("lora_a", _lora_a_init, (d_in, cfg.rank), jnp.float32)
      b = self.param("lora_b", nn.initializers.zeros, (cfg.rank, self.features), jnp.float32)
      xd = nn.Dropout(cfg.dropout)(x, deterministic=deterministic) if cfg.dropout > 0 else x
      if cfg.type == "dora":
        m = self.param("dora_m", lambda k, s: jnp.linalg.norm(kernel, axis=0), (self.features,))
        w = kernel + cfg.lora_scale * a @ b
        # DoRA (as in HF peft): the column norm is treated as a constant in the backward pass.
        norm = jax.lax.stop_gradient(jnp.linalg.norm(w, axis=0))
        y = (m / norm).astype(self.dtype) * token_matmul(xd, w.astype(self.dtype))
        if cfg.dropout > 0:  # peft: base path sees undropped x, DoRA delta sees dropped x
          y = y + token_matmul(x, kernel.astype(self.dtype)) - token_matmul(xd, kernel.astype(self.dtype))
      else:
        lora = token_matmul(token_matmul(xd, a.astype(self.dtype)), b.astype(self.dtype))
        y = token_matmul(x, kernel.astype(self.dtype)) + cfg.lora_scale * lora
    else:
      y = token_matmul(x, kernel.astype(self.dtype))
    if bias is not None:
      y = y + bias.astype(self.dtype)
    if cfg.type == "ssf":
      y = y * self.param("ssf_scale", nn.initializers.ones, (self.features,)).astype(self.dtype)
      y = y + self.param("ssf_shift", nn.initializers.zeros, (self.features,)).astype(self.dtype)
    return y


class Norm(nn.Module):
  """LayerNorm (params `scale`, `bias`, statistics in fp32) with optional SSF scale/shift after it.

  The formula of torch's layer_norm and of flax's nn.LayerNorm(use_fast_variance=False), by plain autodiff (forward
  and reverse mode); written here rather than as an nn.LayerNorm submodule so the parameters keep their place in
  saved checkpoints (`.../norm1/scale`, not `.../norm1/LayerNorm_0/scale`)."""
  eps: float = 1e-6
  peft: PeftConfig = PeftConfig()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,))
    bias = self.param("bias", nn.initializers.zeros, (d,))
    x = x.astype(jnp.float32)  # fp32 statistics, whatever the compute dtype
    centred = x - x.mean(-1, keepdims=True)
    y = centred * jax.lax.rsqrt(jnp.square(centred).mean(-1, keepdims=True) + self.eps) * scale + bias
    if self.peft.type == "ssf":
      y = y * self.param("ssf_scale", nn.initializers.ones, (d,)) + self.param("ssf_shift", nn.initializers.zeros, (d,))
    return y.astype(self.dtype)


class Adapter(nn.Module):
  """Bottleneck adapter: up(act(down(x))); up is zero-initialised so it starts as a no-op."""
  dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    h = Dense(self.dim, dtype=self.dtype, name="down", kernel_init=nn.initializers.lecun_normal())(x)
    h = nn.gelu(h, approximate=False)
    return Dense(d, dtype=self.dtype, name="up", kernel_init=nn.initializers.zeros)(h)


# ----------------------------------------------------------------------------------------------
# Merge: fold LoRA / DoRA / SSF into the base weights -> a plain ViT parameter tree.
# ----------------------------------------------------------------------------------------------

def merge(encoder_params: Mapping[str, Any], peft: PeftConfig) -> dict:
  """Returns a plain-ViT encoder tree (no lora_*/dora_m/ssf_* leaves) with identical outputs.

  Adapters and VPT prompts add computation that cannot be folded into the base weights; merging a
  tree that holds them is an error (export them as they are instead).
  """
  if peft.type in ("adapter", "adaptformer", "vpt"):
    raise ValueError(f"peft.type={peft.type!r} adds modules that cannot be merged into the ViT weights.")
  params = jax.tree_util.tree_map(np.asarray, _to_dict(encoder_params))

  def visit(node):
    if not isinstance(node, dict):
      return node
    node = {k: visit(v) for k, v in node.items()}
    if "kernel" in node and ("lora_a" in node or "ssf_scale" in node):
      w = np.asarray(node["kernel"], np.float32)
      b = np.asarray(node.get("bias", np.zeros(w.shape[-1], np.float32)), np.float32)
      if "lora_a" in node:
        w_new = w + peft.lora_scale * node.pop("lora_a") @ node.pop("lora_b")
        if "dora_m" in node:
          w_new = w_new * (node.pop("dora_m") / np.linalg.norm(w_new, axis=0))[None, :]
        w = w_new
      if "ssf_scale" in node:
        s, t = node.pop("ssf_scale"), node.pop("ssf_shift")
        w, b = w * s[None, :], b * s + t
      node["kernel"], node["bias"] = w.astype(np.float32), b.astype(np.float32)
    elif "scale" in node and "ssf_scale" in node:  # SSF after a LayerNorm
      s, t = node.pop("ssf_scale"), node.pop("ssf_shift")
      node["scale"], node["bias"] = node["scale"] * s, node["bias"] * s + t
    return node

  return visit(params)


def _to_dict(tree):
  if isinstance(tree, Mapping):
    return {k: _to_dict(v) for k, v in tree.items()}
  return tree


TARGET_LEAF_PATTERN = re.compile(r"(lora_a|lora_b|dora_m|ssf_scale|ssf_shift|prompts)$|/adapter_[a-z]+/|/adaptformer/")


def is_target_path(path: str) -> bool:
  """True for leaves added by a PEFT method (paths joined with '/')."""
  return bool(TARGET_LEAF_PATTERN.search(path))


def prompt_tokens(module: nn.Module, name: str, shape: Sequence[int]):
  """VPT prompts, initialised like VPT (uniform in +-sqrt(6 / (3*patch_area + D)) approximated by xavier)."""
  return module.param(name, nn.initializers.xavier_uniform(), tuple(shape))


def reset_dora_magnitudes(encoder_params: Mapping[str, Any], peft: PeftConfig) -> dict:
  """Set every dora_m to the column norm of (kernel + scale * lora_a @ lora_b).

  DoRA's magnitude must start at ||W|| of the weights it sits on; call this after loading
  pre-trained backbone weights into a freshly initialised tree (init saw random kernels).
  """
  def visit(node):
    if not isinstance(node, Mapping):
      return node
    node = {k: visit(v) for k, v in node.items()}
    if "dora_m" in node:
      w = jnp.asarray(node["kernel"]) + peft.lora_scale * jnp.asarray(node["lora_a"]) @ jnp.asarray(node["lora_b"])
      node["dora_m"] = jnp.linalg.norm(w, axis=0)
    return node
  return visit(encoder_params)
