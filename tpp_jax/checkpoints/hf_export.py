"""Our plain ViT tree -> a Hugging Face `ViTModel` (the inverse of convert.py's hf_vit mapping).

  sd = vit_state_dict(merge(encoder_params, peft))    # {HF name: torch-layout float32 array}
  cfg = vit_config_json(vit_cfg)                      # config.json for ViTModel.from_pretrained
  sd |= classifier_state_dict(head, aux, kind)        # + classifier.*: a ViTForImageClassification
  cfg = classifier_config_json(vit_cfg, names)        # its config.json; image_processor_json: its preprocessing

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


# ------------------------------------------------------------------------------------------------
# transformers.ViTForImageClassification (+ its ViTImageProcessor) of a classification run
# ------------------------------------------------------------------------------------------------

BN_EPS = 1e-6  # the epsilon of models/heads.py ClassifierHead's BatchNorm (bn_linear)
LUMA_601 = np.asarray([0.299, 0.587, 0.114], np.float64)  # data/transforms.py: RGB -> grey


def classifier_state_dict(head: Mapping[str, Any], aux: Mapping[str, Any] | None = None,
                          kind: str = "linear") -> dict[str, np.ndarray]:
  """Our ClassifierHead -> ViTForImageClassification's `classifier` Linear; a bn_linear head's eval-mode BatchNorm
  (no affine: an affine map of the features) is folded into it."""
  k = np.asarray(head["fc"]["kernel"], np.float64)
  b = np.asarray(head["fc"]["bias"], np.float64)
  if kind == "bn_linear":
    stats = dict(aux or {}).get("batch_stats", {}).get("bn", {})
    if "mean" not in stats or "var" not in stats:
      raise NotAViTModel("the bn_linear head has no BatchNorm statistics (aux batch_stats/bn)")
    inv = 1.0 / np.sqrt(np.asarray(stats["var"], np.float64) + BN_EPS)
    b = b - (np.asarray(stats["mean"], np.float64) * inv) @ k
    k = k * inv[:, None]
  elif kind != "linear":
    raise NotAViTModel(f"task.head={kind!r} has no ViTForImageClassification classifier")
  return {"classifier.weight": np.ascontiguousarray(k.T, np.float32),
          "classifier.bias": np.ascontiguousarray(b, np.float32)}


def grey_to_rgb_patch_embed(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A 1-channel model as a 3-channel one: transformers' pipelines feed RGB, and our eval transform makes grey by
  luma, so the patch kernel becomes luma x grey kernel (exact on grey images, whose R = G = B; on colour images it
  skips our rounding of the grey value to uint8)."""
  name = "embeddings.patch_embeddings.projection.weight"
  w = sd[name]
  if w.shape[1] != 1:
    return sd
  return {**sd, name: np.ascontiguousarray(w * LUMA_601[None, :, None, None].astype(np.float32))}


def classifier_config_json(vit_cfg, class_names, base: Mapping[str, Any] | None = None) -> dict:
  """config.json of a ViTForImageClassification: our architecture (RGB input) and the class names as labels."""
  d = vit_config_json(vit_cfg, base)
  for k in ("pooler_act", "pooler_output_size"):  # ViTForImageClassification has no pooler
    d.pop(k, None)
  d.update(architectures=["ViTForImageClassification"], num_channels=3, problem_type="single_label_classification",
           id2label={str(i): str(n) for i, n in enumerate(class_names)},
           label2id={str(n): i for i, n in enumerate(class_names)})
  return d


def image_processor_json(data_cfg, channels: int = 3) -> dict:
  """preprocessor_config.json of a ViTImageProcessor doing our eval transform (data/transforms.make_transform):
  RGB, PIL bilinear resize to data.image_size (a no-op at that size), x / 255, (x - data.mean) / data.std. A model
  taking 1 channel (a grey base model under peft) gets grey images as they are (grey PIL images in)."""
  from tpp_jax.data import config as data_config
  d = data_config.resolve(data_cfg)
  rgb = channels == 3
  per_channel = lambda v: [float(x) for x in v] * (3 if rgb and len(v) == 1 else 1)  # a grey run's one value x3
  return {"image_processor_type": "ViTImageProcessor", "do_convert_rgb": rgb, "do_resize": True,
          "size": {"height": int(d.image_size), "width": int(d.image_size)}, "resample": 2,  # PIL BILINEAR
          "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
          "image_mean": per_channel(d.mean), "image_std": per_channel(d.std)}
