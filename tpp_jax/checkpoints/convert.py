"""Pre-trained checkpoint import: timm / MAE / DINO / HF ViT, ViTMAE, Dinov2 / big_vision -> our ViT tree.

  sd = load_state_dict("mae_pretrain_vit_base.pth")     # flat {name: float32 array}
  encoder, decoder = convert(sd, ViTConfig.from_variant("B/16"))
  encoder, decoder = load_pretrained(path, cfg, want_decoder=True)   # the two in one call

Supported key layouts (`detect_format` tells them apart by key names):
  timm        timm / MAE official (`mae_pretrain_*`, `mae_visualize_*` with decoder) / DINO / DINOv2
              official: `patch_embed.proj`, `blocks.N.attn.qkv` (fused), `blocks.N.ls1.gamma`, `norm`.
  hf_vit      HF ViTModel (transformers 4 `encoder.layer.N.attention.attention.query` and
              transformers 5 `layers.N.attention.q_proj` names both work).
  hf_vit_mae  HF ViTMAEForPreTraining (ViT encoder names + `decoder.decoder_*`).
  hf_dinov2   HF Dinov2Model (`norm1`, `layer_scale1.lambda1`, ...).
  big_vision  big_vision / AugReg `.npz` (`Transformer/encoderblock_N/...`, also scanned
              `Transformer/encoderblock/...` with a leading depth axis).

Layer-norm eps and the number of heads are not stored in the weights: set `model.ln_eps`
(HF ViT/ViTMAE: 1e-12, timm/MAE/DINO/Dinov2/big_vision: 1e-6) and `model.heads` to the
checkpoint's values. When the checkpoint's patch grid differs from `vit_cfg.grid`, the patch part
of the position embedding is resampled with torch's `F.interpolate(mode='bicubic',
align_corners=False, antialias=False)` kernel, which is what HF ViT / ViTMAE / Dinov2 and the MAE
fine-tuning code do (timm's own resampling uses antialias=True and differs slightly when shrinking).
An MAE decoder's position embedding is resampled the same 2D way (HF's decoder instead stretches the
flattened sequence in 1D, so decoder outputs at a new resolution differ from HF's by design).
Not supported (reported as unexpected keys): register tokens, qk-norm, SwiGLU MLPs, BEiT biases.
"""
from __future__ import annotations

import functools
import math
import pathlib
import re
from typing import Any, Iterable, Mapping

import numpy as np

from tpp_jax import tree as tree_lib
from tpp_jax.checkpoints.state_dict import _PREFIXES, REDOWNLOAD, _clean, load_state_dict
from tpp_jax.checkpoints.state_dict import TORCH_INSTALL as TORCH_INSTALL  # `X as X`: re-exported for callers
from tpp_jax.checkpoints.state_dict import read_safetensors as read_safetensors
from tpp_jax.checkpoints.state_dict import safetensors_keys as safetensors_keys
from tpp_jax.models.vit import VARIANTS, ViTConfig

FORMATS = ("timm", "hf_vit", "hf_vit_mae", "hf_dinov2", "big_vision")


# ----------------------------------------------------------------------------------------------
# Format detection and per-format name tables
# ----------------------------------------------------------------------------------------------

def detect_format(state_dict: Mapping[str, Any]) -> str:
  """Returns one of FORMATS from the key names (a ViTMAE encoder alone reads as 'hf_vit')."""
  keys = [_PREFIXES.sub("", k) for k in state_dict]
  if any(k.startswith(("Transformer/", "embedding/")) for k in keys):
    return "big_vision"
  if any(k.startswith(("blocks.", "patch_embed.")) for k in keys):
    return "timm"
  if any("embeddings.patch_embeddings." in k for k in keys):
    if any(".layer_scale1." in k or re.search(r"layer\.\d+\.norm1\.", k) for k in keys):
      return "hf_dinov2"
    if any(k.startswith("decoder.decoder_") for k in keys):
      return "hf_vit_mae"
    return "hf_vit"
  raise ValueError(f"Cannot tell the checkpoint format from its keys (first: {keys[:5]}); set init.format to "
                   f"one of {FORMATS}.")


# Block internals of every torch layout -> (our module path, kind).
_TORCH_BLOCK = {
    "norm1": ("norm1", "norm"), "layernorm_before": ("norm1", "norm"),
    "norm2": ("norm2", "norm"), "layernorm_after": ("norm2", "norm"),
    "attn.qkv": ("attn", "qkv"), "attn.proj": ("attn/o", "dense"),
    "attention.q_proj": ("attn/q", "dense"), "attention.attention.query": ("attn/q", "dense"),
    "attention.k_proj": ("attn/k", "dense"), "attention.attention.key": ("attn/k", "dense"),
    "attention.v_proj": ("attn/v", "dense"), "attention.attention.value": ("attn/v", "dense"),
    "attention.o_proj": ("attn/o", "dense"), "attention.output.dense": ("attn/o", "dense"),
    "mlp.fc1": ("mlp/fc1", "dense"), "intermediate.dense": ("mlp/fc1", "dense"),
    "mlp.fc2": ("mlp/fc2", "dense"), "output.dense": ("mlp/fc2", "dense"),
    "ls1": ("ls1", "scale"), "layer_scale1": ("ls1", "scale"),
    "ls2": ("ls2", "scale"), "layer_scale2": ("ls2", "scale"),
}

# Per layout: bare parameters, top-level modules, block prefixes, ignorable keys.
_TORCH_LAYOUTS = {
    "timm": dict(
        params={"cls_token": ("enc", "cls"), "pos_embed": ("enc", "pos_embed"),
                "mask_token": ("dec", "mask_token"), "decoder_pos_embed": ("dec", "pos_embed")},
        modules={"patch_embed.proj": ("enc", "patch_embed", "conv"), "norm": ("enc", "norm", "norm"),
                 "fc_norm": ("enc", "norm", "norm"), "decoder_embed": ("dec", "embed", "dense"),
                 "decoder_norm": ("dec", "norm", "norm"), "decoder_pred": ("dec", "pred", "dense")},
        blocks={"enc": r"blocks\.(?:\d+\.)?(\d+)\.(.+)", "dec": r"decoder_blocks\.(\d+)\.(.+)"},
        ignore=r"(head|head_drop)(\..*)?",
        decoder=r"(decoder_.*|mask_token)"),
    "hf": dict(
        params={"embeddings.cls_token": ("enc", "cls"), "embeddings.position_embeddings": ("enc", "pos_embed"),
                "decoder.mask_token": ("dec", "mask_token"), "decoder.decoder_pos_embed": ("dec", "pos_embed")},
        modules={"embeddings.patch_embeddings.projection": ("enc", "patch_embed", "conv"),
                 "layernorm": ("enc", "norm", "norm"), "decoder.decoder_embed": ("dec", "embed", "dense"),
                 "decoder.decoder_norm": ("dec", "norm", "norm"), "decoder.decoder_pred": ("dec", "pred", "dense")},
        blocks={"enc": r"(?:encoder\.layer|layers)\.(\d+)\.(.+)",
                "dec": r"decoder\.(?:decoder_layers|decoder_encoder\.layer)\.(\d+)\.(.+)"},
        ignore=r"(pooler|classifier)\..*|embeddings\.mask_token|.*position_ids",
        decoder=r"decoder\..*"),
}

_BV_PARAMS = {
    "cls": "cls", "pos_embedding": "pos_embed", "Transformer/posembed_input/pos_embedding": "pos_embed",
    "embedding/kernel": "patch_embed/kernel", "embedding/bias": "patch_embed/bias",
    "Transformer/encoder_norm/scale": "norm/scale", "Transformer/encoder_norm/bias": "norm/bias",
}
_BV_BLOCK = [  # (regex on the in-block name, our path template, reshape)
    (r"LayerNorm_0/(scale|bias)", r"norm1/\1", None),
    (r"LayerNorm_[12]/(scale|bias)", r"norm2/\1", None),
    (r"MultiHeadDotProductAttention_\d+/query/(kernel|bias)", r"attn/q/\1", "in"),
    (r"MultiHeadDotProductAttention_\d+/key/(kernel|bias)", r"attn/k/\1", "in"),
    (r"MultiHeadDotProductAttention_\d+/value/(kernel|bias)", r"attn/v/\1", "in"),
    (r"MultiHeadDotProductAttention_\d+/out/(kernel|bias)", r"attn/o/\1", "out"),
    (r"MlpBlock_\d+/Dense_0/(kernel|bias)", r"mlp/fc1/\1", None),
    (r"MlpBlock_\d+/Dense_1/(kernel|bias)", r"mlp/fc2/\1", None),
]
_BV_IGNORE = r"(head|pre_logits)/.*"


def _torch_leaves(module: str, kind: str, leaf: str, x: np.ndarray):
  """One torch tensor -> [(our path, array)]; torch Linear (out,in) -> (in,out), conv -> HWIO."""
  if kind == "scale" and leaf in ("gamma", "lambda1"):
    return [(module, x)]
  if kind == "norm" and leaf in ("weight", "bias"):
    return [(f"{module}/{'scale' if leaf == 'weight' else 'bias'}", x)]
  if kind == "conv" and leaf in ("weight", "bias"):
    return [(f"{module}/{'kernel' if leaf == 'weight' else 'bias'}", x.transpose(2, 3, 1, 0) if x.ndim == 4 else x)]
  if kind == "dense" and leaf in ("weight", "bias"):
    return [(f"{module}/{'kernel' if leaf == 'weight' else 'bias'}", x.T if leaf == "weight" else x)]
  if kind == "qkv" and leaf in ("weight", "bias"):  # fused rows [q; k; v]
    parts = np.split(x, 3, axis=0)
    name = "kernel" if leaf == "weight" else "bias"
    return [(f"{module}/{n}/{name}", p.T if leaf == "weight" else p) for n, p in zip("qkv", parts)]
  return None


def _map_torch(sd, layout):
  """-> {('enc'|'dec', our path): (array, ckpt name)}, unmapped ckpt names, ignorable, decoder regex."""
  t = _TORCH_LAYOUTS[layout]
  modules, ignore = dict(t["modules"]), t["ignore"]
  if "norm.weight" in sd:  # fc_norm only stands in for `norm` when there is no `norm`
    modules.pop("fc_norm", None)
    ignore += r"|fc_norm\..*"
  out, left = {}, []
  for key, x in sd.items():
    name = re.sub(r"^(vit|dinov2)\.", "", key) if layout == "hf" else key
    mapped = None
    if name in t["params"]:
      mapped = [(*t["params"][name], x)]
    elif "." in name:
      module, leaf = name.rsplit(".", 1)
      if module in modules:
        sec, path, kind = modules[module]
        mapped = [(sec, p, v) for p, v in _torch_leaves(path, kind, leaf, x) or ()]
      else:
        for sec, pattern in t["blocks"].items():
          m = re.fullmatch(pattern, module)
          if m and m.group(2) in _TORCH_BLOCK:
            path, kind = _TORCH_BLOCK[m.group(2)]
            leaves = _torch_leaves(f"blocks_{int(m.group(1))}/{path}", kind, leaf, x) or ()
            mapped = [(sec, p, v) for p, v in leaves]
            break
    if not mapped:
      left.append(key)
    for sec, path, v in mapped or ():
      out[(sec, path)] = (v, key)
  return out, left, ignore, t["decoder"]


def _map_big_vision(sd):
  sd = dict(sd)
  for key in [k for k in sd if k.startswith("Transformer/encoderblock/")]:  # scanned layers
    x = sd.pop(key)
    for i in range(x.shape[0]):
      sd[key.replace("encoderblock/", f"encoderblock_{i}/")] = x[i]
  out, left = {}, []
  for key, x in sd.items():
    if key in _BV_PARAMS:
      out[("enc", _BV_PARAMS[key])] = (x, key)
      continue
    m = re.fullmatch(r"Transformer/encoderblock_(\d+)/(.+)", key)
    for pattern, target, reshape in _BV_BLOCK if m else ():
      mm = re.fullmatch(pattern, m.group(2))
      if mm:
        kernel = key.endswith("kernel")
        if reshape == "in":  # query/key/value kernel (D, H, hd) -> (D, H*hd); bias (H, hd) -> (H*hd,)
          x = x.reshape(x.shape[0], -1) if kernel else x.reshape(-1)
        elif reshape == "out" and kernel:  # out kernel (H, hd, D) -> (H*hd, D)
          x = x.reshape(-1, x.shape[-1])
        out[("enc", f"blocks_{int(m.group(1))}/" + mm.expand(target))] = (x, key)
        break
    else:
      left.append(key)
  return out, left, _BV_IGNORE, r"$^"


# ----------------------------------------------------------------------------------------------
# Position-embedding resampling (numpy copy of torch's bicubic kernel)
# ----------------------------------------------------------------------------------------------

def _cubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) weights of torch bicubic, align_corners=False, antialias=False, along one axis."""
  a = -0.75
  src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
  i0 = np.minimum(np.floor(src), in_size - 1).astype(np.int64)
  t = np.clip(src - i0, 0.0, 1.0)
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  w = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
  m = np.zeros((out_size, in_size))
  for k in range(4):
    np.add.at(m, (np.arange(out_size), np.clip(i0 - 1 + k, 0, in_size - 1)), w[:, k])
  return m


def bicubic_resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """(H, W, ...) -> (size[0], size[1], ...), same numbers as torch F.interpolate(mode='bicubic',
  align_corners=False) on the NCHW transpose."""
  mh, mw = _cubic_matrix(x.shape[0], size[0]), _cubic_matrix(x.shape[1], size[1])
  y = np.einsum("oh,hw...->ow...", mh, x.astype(np.float64))
  return np.einsum("pw,ow...->op...", mw, y).astype(np.float32)


def resample_pos_embed(pos: np.ndarray, grid: int) -> np.ndarray:
  """(1, [1+]g*g, D) -> (1, 1+grid*grid, D): patch part resampled, cls row kept (zeros if absent)."""
  t, d = pos.shape[1], pos.shape[2]
  g = math.isqrt(t - 1)
  if g * g == t - 1:
    cls, patches = pos[:, :1], pos[:, 1:]
  elif math.isqrt(t) ** 2 == t:  # no cls position (timm no_embed_class / big_vision gap)
    g, cls, patches = math.isqrt(t), np.zeros((1, 1, d), pos.dtype), pos
  else:
    return pos  # not a square grid: left for the shape check to report
  if g != grid:
    patches = bicubic_resize(patches.reshape(g, g, d), (grid, grid)).reshape(1, grid * grid, d)
  return np.concatenate([cls, patches], axis=1).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Conversion + validation
# ----------------------------------------------------------------------------------------------

def convert(state_dict: Mapping[str, Any], vit_cfg: ViTConfig, fmt: str = "auto",
            want_decoder: bool | None = None, source: str = "the checkpoint") -> tuple[dict, dict | None]:
  """Maps a flat checkpoint onto our ViT (and MAE decoder) parameter trees.

  Args:
    state_dict: flat {name: array} (e.g. from `load_state_dict`).
    vit_cfg: the model to load into; its position grid is the resampling target.
    fmt: one of FORMATS or 'auto' (`detect_format`).
    want_decoder: None: convert an MAE decoder when the checkpoint has one; False: ignore it;
      True: require one.
    source: names the file in errors (e.g. 'init.path /x/model.safetensors').

  Returns:
    (encoder_params, decoder_params or None): nested dicts of float32 numpy arrays, the encoder
    without any PEFT leaves (use them as the backbone of a PEFT model). `fc_norm` of MAE
    fine-tuned (global-pool) checkpoints becomes our final `norm` when there is no `norm`; note
    that MAE applies it after pooling, our ViT before, so with model.pooling='gap' the pooled
    feature differs slightly from MAE's. Classification heads, poolers and Dinov2's mask token
    are dropped.

  Raises:
    ValueError: one message listing every missing / unexpected key and shape mismatch, with a fix; or
      naming the tensors that hold NaN / Inf (a corrupt file).
  """
  sd = _clean(state_dict)
  fmt = detect_format(sd) if fmt == "auto" else fmt
  if fmt not in FORMATS:
    raise ValueError(f"init.format={fmt!r}; valid: 'auto' or one of {FORMATS}.")
  if fmt == "big_vision":
    mapped, left, ignore, dec_pattern = _map_big_vision(sd)
  else:
    mapped, left, ignore, dec_pattern = _map_torch(sd, "timm" if fmt == "timm" else "hf")
  if fmt == "timm" and ("dec", "embed/kernel") not in mapped:  # DINOv2 official: encoder mask token
    mapped.pop(("dec", "mask_token"), None)
  has_dec = any(sec == "dec" for sec, _ in mapped)
  if want_decoder is True and not has_dec:
    raise ValueError(f"init.path: the checkpoint ({fmt}) has no MAE decoder; use a checkpoint with one "
                     "(mae_visualize_*.pth, HF ViTMAEForPreTraining) or train the decoder from scratch.")
  use_dec = has_dec and want_decoder is not False
  ignorable = re.compile(ignore if use_dec else f"{ignore}|{dec_pattern}")
  left = [k for k in left if not ignorable.fullmatch(re.sub(r"^(vit|dinov2)\.", "", k))]

  enc = {p: v for (sec, p), v in mapped.items() if sec == "enc"}
  dec = {p: v for (sec, p), v in mapped.items() if sec == "dec"} if use_dec else {}
  arch = _describe(enc, sd, fmt)
  want_enc = _encoder_shapes(vit_cfg)
  want_dec = _decoder_shapes(vit_cfg, dec) if use_dec else {}
  for tree, want in ((enc, want_enc), (dec, want_dec)):
    if "pos_embed" in tree and tree["pos_embed"][0].ndim == 3 and "pos_embed" in want:
      v, src = tree["pos_embed"]
      if v.shape[-1] == want["pos_embed"][-1]:  # same width: resample the grid to the model's
        tree["pos_embed"] = (resample_pos_embed(v, vit_cfg.grid), src)

  missing, unexpected, mismatched = _check(enc, want_enc, "encoder")
  if use_dec:
    missing, unexpected, mismatched = (a + b for a, b in zip((missing, unexpected, mismatched),
                                                             _check(dec, want_dec, "decoder")))
  unexpected += left
  if missing or unexpected or mismatched:
    raise ValueError(_report(vit_cfg, fmt, arch, missing, unexpected, mismatched))
  check_finite([(src, v) for v, src in [*enc.values(), *dec.values()]], source)
  return _nest(enc), (_nest(dec) if use_dec else None)


def check_finite(named: Iterable[tuple[str, Any]], source: str):
  """Raises one ValueError naming `source` and the first tensors that hold NaN / Inf (flipped bytes: the
  file is corrupt; training from it would end in NaN)."""
  bad = list(dict.fromkeys(name for name, v in named if not np.isfinite(np.asarray(v)).all()))
  if bad:
    shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
    raise ValueError(f"{source} holds NaN/Inf values in {len(bad)} tensor(s) ({shown}): the file is corrupt; "
                     f"{REDOWNLOAD}.")


def _check(flat, expected, what):
  missing = [f"{what} {k}" for k in expected if k not in flat]
  unexpected = [f"{src} (-> {what} {k})" for k, (_, src) in flat.items() if k not in expected]
  mismatched = [f"{src} -> {what} {k}: checkpoint {tuple(v.shape)} vs model {expected[k]}"
                for k, (v, src) in flat.items() if k in expected and tuple(v.shape) != expected[k]]
  return missing, unexpected, mismatched


@functools.lru_cache(maxsize=16)
def _encoder_shapes(cfg: ViTConfig) -> dict[str, tuple]:
  import jax  # pylint: disable=import-outside-toplevel

  from tpp_jax.models.vit import ViT  # pylint: disable=import-outside-toplevel
  images = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.channels), np.float32)
  tree = jax.eval_shape(ViT(cfg).init, jax.random.key(0), images)["params"]
  return _flat_shapes(tree)


def _decoder_shapes(cfg: ViTConfig, dec: dict) -> dict[str, tuple]:
  import jax  # pylint: disable=import-outside-toplevel

  from tpp_jax.models.mae import MAEDecoder  # pylint: disable=import-outside-toplevel
  dcfg = infer_decoder_config({k: v for k, (v, _) in dec.items()}, heads=1)
  tokens = jax.ShapeDtypeStruct((1, 1 + cfg.num_patches, cfg.width), np.float32)
  ids = jax.ShapeDtypeStruct((1, cfg.num_patches), np.int32)
  tree = jax.eval_shape(MAEDecoder(dcfg, cfg).init, jax.random.key(0), tokens, ids)["params"]
  return _flat_shapes(tree)


def infer_decoder_config(decoder_params: Mapping[str, Any], heads: int = 16, ln_eps: float = 1e-6):
  """MAEDecoderConfig matching converted decoder weights (heads and eps are not in the weights:
  MAE official and HF ViTMAE use 16 heads, eps 1e-6 and 1e-12)."""
  from tpp_jax.models.mae import MAEDecoderConfig  # pylint: disable=import-outside-toplevel
  flat = {k: np.shape(v) for k, v in tree_lib.flatten(decoder_params).items()}
  width = flat.get("embed/kernel", (0, 128))[1]
  depth = len({k.split("/")[0] for k in flat if k.startswith("blocks_")})
  mlp = flat.get("blocks_0/mlp/fc1/kernel", (0, 4 * width))[1]
  return MAEDecoderConfig(width=width, depth=depth, heads=heads, mlp_dim=mlp, ln_eps=ln_eps)


def _describe(enc: dict, sd: Mapping[str, np.ndarray], fmt: str) -> dict:
  """Architecture the checkpoint's encoder weights imply (what can be read off the shapes)."""
  shape = lambda k: tuple(enc[k][0].shape) if k in enc else ()
  arch = {}
  if len(shape("patch_embed/kernel")) == 4:
    p, _, c, d = shape("patch_embed/kernel")
    arch.update(patch=p, channels=c, width=d)
  arch["depth"] = len({k.split("/")[0] for k in enc if k.startswith("blocks_")})
  if shape("blocks_0/mlp/fc1/kernel"):
    arch["mlp_dim"] = shape("blocks_0/mlp/fc1/kernel")[1]
  if fmt == "big_vision":  # query kernel (D, H, hd) keeps the head count
    heads = [v.shape[1] for k, v in sd.items() if k.endswith("query/kernel") and v.ndim == 3]
    if heads:
      arch["heads"] = heads[0]
  arch["layer_scale"] = "blocks_0/ls1" in enc
  t = shape("pos_embed")[1] if len(shape("pos_embed")) == 3 else 0
  g = math.isqrt(max(t - 1, 0))
  if t and "patch" in arch:
    arch["image_size"] = (g if g * g == t - 1 else math.isqrt(t)) * arch["patch"]
  return arch


def _report(cfg: ViTConfig, fmt: str, arch: dict, missing, unexpected, mismatched) -> str:
  def block(title, items):
    if not items:
      return ""
    shown = "\n".join(f"    {x}" for x in items[:25])
    more = f"\n    ... and {len(items) - 25} more" if len(items) > 25 else ""
    return f"\n  {title} ({len(items)}):\n{shown}{more}"

  fix = []
  diff = {k: v for k, v in arch.items() if k in ("width", "depth", "heads", "mlp_dim", "patch", "channels",
                                                  "layer_scale") and getattr(cfg, k) != v}
  if diff:
    def fits(w, d, h, m):
      return (w, d, m) == (arch.get("width"), arch.get("depth"), arch.get("mlp_dim")) and arch.get("heads", h) == h
    variant = next((f"{n}/{arch['patch']}" for n, v in VARIANTS.items() if "patch" in arch and fits(*v)), None)
    by_variant = ("width", "depth", "heads", "mlp_dim", "patch") if variant else ()
    sets = [f"model.variant='{variant}'"] if variant else []
    sets += [f"model.{k}={v}" for k, v in diff.items() if k not in by_variant]
    fix.append("the checkpoint looks like " + ", ".join(f"{k}={v}" for k, v in arch.items() if k != "image_size")
               + (f" (trained at image_size={arch['image_size']})" if "image_size" in arch else "")
               + "; set " + ", ".join(sets)
               + ("" if "heads" in arch else " (model.heads must match too: torch weights do not store it)"))
  if not fix:
    fix.append(f"check init.format (got {fmt!r}; valid {FORMATS}) and that init.path is a ViT checkpoint")
  return (f"Checkpoint ({fmt}) does not fit the model (width={cfg.width}, depth={cfg.depth}, heads={cfg.heads}, "
          f"mlp_dim={cfg.mlp_dim}, patch={cfg.patch}, channels={cfg.channels}, layer_scale={cfg.layer_scale}):"
          + block("missing in the checkpoint", missing) + block("unexpected in the checkpoint", unexpected)
          + block("shape mismatches", mismatched) + "\n  Fix: " + "; ".join(fix) + ".")


def _flat_shapes(tree, prefix=""):
  return {k: tuple(v.shape) for k, v in tree_lib.flatten(tree, prefix).items()}


def _nest(flat: dict) -> dict:
  """{path: (array, checkpoint name)} -> nested float32 tree."""
  return tree_lib.unflatten({k: np.ascontiguousarray(v, dtype=np.float32) for k, (v, _) in flat.items()})


def load_pretrained(path: str | pathlib.Path, vit_cfg: ViTConfig, fmt: str = "auto",
                    want_decoder: bool = False) -> tuple[dict, dict | None]:
  """load_state_dict + convert: -> (encoder_params, decoder_params or None).

  With want_decoder=False a decoder in the file is ignored; with True it must be there.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"Pre-trained checkpoint {str(path)!r} (config field init.path) does not exist; "
                            "fix init.path or set it to '' to start from random weights.")
  return convert(load_state_dict(path), vit_cfg, fmt, want_decoder=want_decoder, source=f"init.path {path}")
