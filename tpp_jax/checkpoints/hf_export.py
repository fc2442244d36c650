"""Our plain ViT tree -> a Hugging Face `ViTModel` (the inverse of convert.py's hf_vit mapping).

  sd = vit_state_dict(merge(encoder_params, peft))    # {HF name: torch-layout float32 array}
  cfg = vit_config_json(vit_cfg)                      # config.json for ViTModel.from_pretrained

Names are the ones `ViTModel.save_pretrained` writes (transformers 5 still stores the transformers 4
names `encoder.layer.N.attention.attention.query`, and renames them to `layers.N.attention.q_proj` on
load). Torch Linear weights are (out, in) = kernel.T; the patch conv is OIHW. A tree with leaves ViTModel
has no place for (Dinov2 LayerScale, register tokens, VPT prompts, adapters, unmerged LoRA/SSF) is an
error naming them.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from tpp_jax import tree as tree_lib

# our module inside a block -> HF module (kind: dense | norm)
_BLOCK = {
    "attn/q": ("attention.attention.query", "dense"), "attn/k": ("attention.attention.key", "dense"),
    "attn/v": ("attention.attention.value", "dense"), "attn/o": ("attention.output.dense", "dense"),
    "mlp/fc1": ("intermediate.dense", "dense"), "mlp/fc2": ("output.dense", "dense"),
    "norm1": ("layernorm_before", "norm"), "norm2": ("layernorm_after", "norm"),
}
_LEAF = {"dense": {"kernel": "weight", "bias": "bias"}, "norm": {"scale": "weight", "bias": "bias"}}


class NotAViTModel(ValueError):
  """The encoder tree holds parts a Hugging Face ViTModel cannot express."""


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  """tree.flatten with float32 leaves."""
  return {k: np.asarray(v, np.float32) for k, v in tree_lib.flatten(tree, prefix).items()}


def vit_state_dict(encoder_params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Plain ViT encoder tree -> HF ViTModel state dict (no pooler; float32, contiguous)."""
  flat = flatten(encoder_params)
  out, left = {}, []
  for path, x in flat.items():
    name = None
    if path == "cls":
      name = "embeddings.cls_token"
    elif path == "pos_embed":
      name = "embeddings.position_embeddings"
    elif path == "patch_embed/kernel":
      name, x = "embeddings.patch_embeddings.projection.weight", x.transpose(3, 2, 0, 1)
    elif path == "patch_embed/bias":
      name = "embeddings.patch_embeddings.projection.bias"
    elif path in ("norm/scale", "norm/bias"):
      name = "layernorm." + _LEAF["norm"][path.split("/")[1]]
    else:
      m = re.fullmatch(r"blocks_(\d+)/(.+)/(\w+)", path)
      if m and m.group(2) in _BLOCK and m.group(3) in _LEAF[_BLOCK[m.group(2)][1]]:
        module, kind = _BLOCK[m.group(2)]
        name = f"encoder.layer.{int(m.group(1))}.{module}.{_LEAF[kind][m.group(3)]}"
        if kind == "dense" and m.group(3) == "kernel":
          x = x.T
    if name is None:
      left.append(path)
    else:
      out[name] = np.ascontiguousarray(x, np.float32)
  if left:
    raise NotAViTModel(f"a Hugging Face ViTModel has no place for {', '.join(left[:6])}"
                       f"{' ...' if len(left) > 6 else ''}")
  return out


def vit_config_json(vit_cfg, base: Mapping[str, Any] | None = None) -> dict:
  """config.json of a ViTModel with exactly our architecture (fields of a `vit` base config are kept)."""
  d = dict(base) if base and base.get("model_type") == "vit" else {}
  d.update(architectures=["ViTModel"], model_type="vit", hidden_size=vit_cfg.width,
           num_hidden_layers=vit_cfg.depth, num_attention_heads=vit_cfg.heads, intermediate_size=vit_cfg.mlp_dim,
           hidden_act="gelu", layer_norm_eps=float(vit_cfg.ln_eps), image_size=vit_cfg.image_size,
           patch_size=vit_cfg.patch, num_channels=vit_cfg.channels, qkv_bias=True, hidden_dropout_prob=0.0,
           attention_probs_dropout_prob=0.0, dtype="float32")
  d.pop("torch_dtype", None)
  return d
