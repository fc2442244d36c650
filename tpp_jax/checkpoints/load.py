"""Backbone (and MAE decoder) weights from config.init into a freshly initialised model.

init.path may be:
  a checkpoint file       .pth/.pt/.bin (timm / MAE / DINO names), .safetensors (HF ViT / ViTMAE / Dinov2),
                          .npz (big_vision); converted by checkpoints/convert.py
  a Hugging Face folder   what `save_pretrained` writes (model.safetensors or pytorch_model.bin, also sharded
                          with an index file; config.json is checked against model.heads / model.ln_eps)
  tpp_jax weights         a flat safetensors file with 'encoder/...' names or a `pretrain` workdir

Only an MAE pretext (stages pretrain / tpp) uses a decoder: a checkpoint's decoder is loaded whole when it fits
pretext.decoder_* (one ConfigError when it does not), skipped with init.load_decoder=False, and a checkpoint
without one gives a new decoder from random init (said in one log line). Other stages never read a decoder.
"""
from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np

from tpp_jax import config as config_lib
from tpp_jax.checkpoints import store as store_lib
from tpp_jax.models.peft import reset_dora_magnitudes

ConfigError = config_lib.ConfigError
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def merge_into(template: dict, loaded: dict, where: str) -> dict:
  """Replace leaves of `template` by `loaded` ones at the same paths (template keeps the rest)."""
  out = dict(template)
  for k, v in loaded.items():
    if k not in template:
      raise ValueError(f"{where}: checkpoint leaf {k!r} has no place in the model.")
    if isinstance(v, dict):
      out[k] = merge_into(template[k], v, f"{where}/{k}")
    else:
      if np.shape(v) != np.shape(template[k]):
        raise ValueError(f"{where}/{k}: checkpoint shape {np.shape(v)} != model shape {np.shape(template[k])}.")
      out[k] = jnp.asarray(v, jnp.asarray(template[k]).dtype)
  return out


def wants_decoder(config) -> bool:
  """Whether this run trains an MAE decoder that a checkpoint's decoder may start."""
  return config.stage in ("pretrain", "tpp") and config.pretext.type == "mae"


def is_flat_tpp_file(p: pathlib.Path) -> bool:
  if p.suffix != ".safetensors":
    return False
  from safetensors import safe_open
  with safe_open(str(p), "np") as f:
    return any(k.startswith("encoder/") for k in f.keys())


def hf_weights_file(folder: pathlib.Path) -> pathlib.Path | None:
  """The weights file of a Hugging Face model folder, or None if `folder` is not one."""
  if (folder / "checkpoints").is_dir():  # a tpp_jax workdir
    return None
  return next((folder / n for n in HF_WEIGHTS if (folder / n).is_file()), None)


def _read_state_dict(p: pathlib.Path) -> dict:
  from tpp_jax.checkpoints import convert
  if not p.name.endswith(".index.json"):
    return convert.load_state_dict(p)
  sd = {}  # sharded HF weights: {"weight_map": {name: shard file}}
  for shard in sorted(set(json.loads(p.read_text())["weight_map"].values())):
    sd.update(convert.load_state_dict(p.parent / shard))
  return sd


def check_hf_config(config, weights: pathlib.Path, use_decoder: bool):
  """Fields the weights do not store (heads, LayerNorm eps) against the config.json beside them."""
  cfg_file = weights.parent / "config.json"
  try:
    hf = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
  except ValueError:
    return
  if not isinstance(hf, dict) or "num_attention_heads" not in hf:
    return  # not a transformers config
  from tpp_jax.models.vit import VARIANTS, ViTConfig
  vit = ViTConfig.from_config(config.model)
  bad, fixes = [], []
  if hf["num_attention_heads"] != vit.heads:
    bad.append(f"num_attention_heads={hf['num_attention_heads']} (model.heads={vit.heads})")
    arch = (hf.get("hidden_size"), hf.get("num_hidden_layers"), hf["num_attention_heads"])
    fits = [n for n, v in VARIANTS.items() if v[:3] == arch]
    fixes.append(f"--config.model.variant={fits[0]}/{hf.get('patch_size', vit.patch)}" if fits else
                 f"a model with {hf['num_attention_heads']} heads")
  if "layer_norm_eps" in hf and hf["layer_norm_eps"] != vit.ln_eps:
    bad.append(f"layer_norm_eps={hf['layer_norm_eps']} (model.ln_eps={vit.ln_eps})")
    fixes.append(f"--config.model.ln_eps={hf['layer_norm_eps']}")
  dec_heads = hf.get("decoder_num_attention_heads")
  if use_decoder and dec_heads is not None and dec_heads != config.pretext.decoder_heads:
    bad.append(f"decoder_num_attention_heads={dec_heads} (pretext.decoder_heads={config.pretext.decoder_heads})")
    fixes.append(f"--config.pretext.decoder_heads={dec_heads}")
  if bad:
    raise ConfigError(f"init.path={str(weights)!r} does not match this run's model: its config.json has "
                      f"{', '.join(bad)}, which the weights do not store. Set {' '.join(fixes)}.")


def load_backbone(config, encoder) -> tuple[dict | None, dict | None, str]:
  """(encoder leaves, decoder leaves or None, description) from config.init, or (None, None, 'random init').

  The decoder is read only when the run trains an MAE decoder and init.load_decoder is set.
  """
  path, fmt = str(config.init.path or ""), config.init.format
  if not path or fmt == "none":
    return None, None, "random init"
  p = pathlib.Path(path).expanduser()
  if not p.exists():
    raise FileNotFoundError(f"init.path={path!r} does not exist; point it at a .pth/.safetensors/.npz checkpoint, "
                            "a Hugging Face model folder or a tpp_jax `pretrain` workdir, or set "
                            "--config.init.path='' for random init.")
  want = wants_decoder(config) and bool(config.init.load_decoder)
  weights = hf_weights_file(p) if p.is_dir() and fmt != "tpp" else None
  if p.is_dir() and weights is None and fmt != "tpp" and not (p / "checkpoints").is_dir():
    raise FileNotFoundError(f"init.path={path!r} is a folder with neither Hugging Face weights "
                            f"({', '.join(HF_WEIGHTS)}) nor a tpp_jax run (checkpoints/); point it at the "
                            "checkpoint file instead.")
  if weights is None and (p.is_dir() or fmt == "tpp" or is_flat_tpp_file(p)):
    enc, dec = store_lib.load_backbone_tpp(p)
    return enc, (dec if want else None), f"tpp_jax weights {p}"
  weights = weights or p
  from tpp_jax.checkpoints import convert
  if weights.suffix in (".safetensors", ".json") or weights.name == "pytorch_model.bin":
    check_hf_config(config, weights, want)
  sd = _read_state_dict(weights)
  fmt = convert.detect_format(sd) if fmt == "auto" else fmt
  enc, dec = convert.convert(sd, encoder.cfg, fmt, want_decoder=None if want else False)
  return enc, dec, f"{fmt} checkpoint {weights}"


def load_decoder(config, template: dict, loaded: dict) -> dict:
  """The checkpoint's MAE decoder, all of it, or one error: a half-loaded decoder is never used silently."""
  from tpp_jax.partition import flat_paths
  missing = sorted(set(flat_paths(template)) - set(flat_paths(loaded)))
  p = config.pretext
  fix = (f"Set pretext.decoder_width/decoder_depth/decoder_heads/decoder_mlp_dim to the checkpoint's decoder "
         f"(now {p.decoder_width}/{p.decoder_depth}/{p.decoder_heads}/{p.decoder_mlp_dim}), or "
         "--config.init.load_decoder=False to train a new decoder from random init.")
  if missing:
    have = flat_paths(loaded)
    blocks = len({k.split("/")[0] for k in have if k.startswith("blocks_")})
    width = np.shape(loaded.get("embed", {}).get("kernel", ()))[-1:] or ("?",)
    raise ConfigError(f"The MAE decoder in init.path={config.init.path!r} does not fit the configured one: the "
                      f"checkpoint's has {blocks} block(s) of width {width[0]}; missing from it: "
                      f"{', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}. {fix}")
  try:
    return merge_into(template, loaded, "decoder")
  except ValueError as e:
    raise ConfigError(f"The MAE decoder in init.path={config.init.path!r} does not fit the configured one: {e} "
                      f"{fix}") from None


def init_encoder(config, encoder, enc_params: dict) -> tuple[dict, dict | None, str]:
  """Randomly initialised encoder params -> (with the backbone of config.init, decoder leaves or None, source)."""
  enc_loaded, dec_loaded, source = load_backbone(config, encoder)
  if enc_loaded is not None:
    enc_params = merge_into(enc_params, enc_loaded, "encoder")
    enc_params = reset_dora_magnitudes(enc_params, encoder.peft)
  return enc_params, dec_loaded, source


def init_decoder(config, extra: dict, dec_loaded: dict | None, source: str) -> tuple[dict, str]:
  """Objective params -> (with the checkpoint's MAE decoder where there is one, source)."""
  if "decoder" not in extra or not wants_decoder(config) or source == "random init":
    return extra, source
  if dec_loaded is not None:
    return {**extra, "decoder": load_decoder(config, extra["decoder"], dec_loaded)}, source + " (+ MAE decoder)"
  if config.init.load_decoder:
    print(f"init: {source.split(' ')[0]} checkpoint has no MAE decoder; training a new one from random init",
          flush=True)
  return extra, source
