"""The load step: a randomly initialised model's params filled from files (the build step reads none).

  load_init(config, encoder, params, aux, labels) -> (params, aux, source, target_info)
    backbone (and MAE decoder) from config.init, then target params from target_init / init.adapter.

init.path may be:
  a checkpoint file       .pth/.pt/.bin (timm / MAE / DINO names), .safetensors (HF ViT / ViTMAE / Dinov2),
                          .npz (big_vision); converted by checkpoints/convert.py
  a Hugging Face folder   what `save_pretrained` writes (model.safetensors or pytorch_model.bin, also sharded
                          with an index file; config.json is checked against model.heads / model.ln_eps)
  a Hub id                hf://ORG/NAME[@REVISION] or timm://NAME: that repo's folder in the Hugging Face
                          cache (checkpoints/hub.py), then read as a folder (timm repos: timm names)
  tpp_jax weights         a flat safetensors file with 'encoder/...' names or a `pretrain` workdir

Only an MAE pretext of a stage whose stages.STAGES entry has loads_decoder (pretrain / tpp) uses a decoder: a
checkpoint's decoder is loaded whole when it fits pretext.decoder_* (one ConfigError when it does not), skipped with
init.load_decoder=False, and a checkpoint without one gives a new decoder from random init (said in one log line).
Other stages never read a decoder.
"""
from __future__ import annotations

import copy
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from tpp_jax import config as config_lib
from tpp_jax import stages as stages_lib
from tpp_jax import tree as tree_lib
from tpp_jax.checkpoints import hub
from tpp_jax.checkpoints import store as store_lib
from tpp_jax.jsonio import read_json
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
  stage = stages_lib.STAGES.get(config.stage)
  return stage is not None and stage.loads_decoder and config.pretext.type == "mae"


def is_flat_tpp_file(p: pathlib.Path) -> bool:
  if p.suffix != ".safetensors":
    return False
  from tpp_jax.checkpoints import convert
  return any(k.startswith("encoder/") for k in convert.safetensors_keys(p))


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
  for shard in sorted(set(read_json(p, require_object=True)["weight_map"].values())):
    sd.update(convert.load_state_dict(p.parent / shard))
  return sd


def check_hf_config(config, weights: pathlib.Path, use_decoder: bool):
  """Fields the weights do not store (heads, LayerNorm eps) against the config.json beside them."""
  cfg_file = weights.parent / "config.json"
  try:
    hf = read_json(cfg_file) if cfg_file.is_file() else {}
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


_LOADED: dict = {}  # the last load_backbone result by its inputs: resolve_pretext_head reads it, Trainer.load too


def load_backbone(config, encoder) -> tuple[dict | None, dict | None, str]:
  """(encoder leaves, decoder leaves or None, description) from config.init, or (None, None, 'random init').

  The decoder is read only when the run trains an MAE decoder and init.load_decoder is set.
  """
  path = str(config.init.path or "")
  p = hub.local_path(path) if path and config.init.format != "none" else None
  key = (path, config.init.format, wants_decoder(config) and bool(config.init.load_decoder), repr(encoder.cfg),
         p.stat().st_mtime_ns if p is not None and p.exists() else None)
  if key not in _LOADED:
    _LOADED.clear()
    _LOADED[key] = _load_backbone(config, encoder)
  return _LOADED[key]


def forget_loaded():
  """Drop the kept load_backbone result (its arrays are in the train state by then)."""
  _LOADED.clear()


def resolve_pretext_head(config, encoder):
  """config with pretext.head 'auto' resolved for a `tpp` run: 'frozen' when init.path brings the pretext head (an
  MAE decoder; no loader reads a DINO / projection head from a checkpoint), else 'train'. 'frozen' without a head to
  keep is one ConfigError. Other stages: config as it is."""
  stage = stages_lib.STAGES.get(config.stage)
  mode = config.pretext.get("head", "train")
  if stage is None or not (stage.peft and stage.objective == "pretext") or mode == "train":
    return config
  has_head = (wants_decoder(config) and bool(config.init.load_decoder) and bool(str(config.init.path or ""))
              and config.init.format != "none" and load_backbone(config, encoder)[1] is not None)
  if mode == "frozen" and not has_head:
    why = ("pretext.type={!r} has no head a checkpoint brings".format(config.pretext.type)
           if config.pretext.type != "mae" else "init.path is empty" if not str(config.init.path or "")
           else "init.load_decoder=False" if not config.init.load_decoder
           else f"init.path={str(config.init.path)!r} holds no MAE decoder")
    raise ConfigError(f"pretext.head=frozen keeps a pre-trained pretext head frozen, but {why}: there is nothing to "
                      "keep. Use pretext.head=train (a new head trains with the target parameters) or auto.")
  resolved = "frozen" if has_head else "train"
  config = copy.deepcopy(config)
  with config.unlocked():
    config.pretext.head = resolved
  return config


def _load_backbone(config, encoder) -> tuple[dict | None, dict | None, str]:
  path, fmt = str(config.init.path or ""), config.init.format
  if not path or fmt == "none":
    return None, None, "random init"
  p = hub.local_path(path)
  if not p.exists():
    raise FileNotFoundError(f"init.path={path!r} does not exist; point it at a .pth/.safetensors/.npz checkpoint, "
                            "a Hugging Face model folder, a Hub id (hf://ORG/NAME, timm://NAME) or a tpp_jax "
                            "`pretrain` workdir, or set --config.init.path='' for random init.")
  want = wants_decoder(config) and bool(config.init.load_decoder)
  weights = hf_weights_file(p) if p.is_dir() and fmt != "tpp" else None
  if p.is_dir() and weights is None and fmt != "tpp" and not (p / "checkpoints").is_dir():
    raise FileNotFoundError(f"init.path={path!r} is a folder with neither Hugging Face weights "
                            f"({', '.join(HF_WEIGHTS)}) nor a tpp_jax run (checkpoints/); point it at the "
                            "checkpoint file instead.")
  from tpp_jax.checkpoints import convert
  if weights is None and (p.is_dir() or fmt == "tpp" or is_flat_tpp_file(p)):
    enc, dec = store_lib.load_backbone_tpp(p)
    dec = dec if want else None
    trees = {"encoder": enc, **({"decoder": dec} if dec is not None else {})}
    convert.check_finite(tree_lib.flatten(trees).items(), f"init.path {p}")
    return enc, dec, f"tpp_jax weights {p}"
  weights = weights or p
  if weights.suffix in (".safetensors", ".json") or weights.name == "pytorch_model.bin":
    check_hf_config(config, weights, want)
  sd = _read_state_dict(weights)
  fmt = convert.detect_format(sd) if fmt == "auto" else fmt
  enc, dec = convert.convert(sd, encoder.cfg, fmt, want_decoder=None if want else False,
                             source=f"init.path {weights}")
  return enc, dec, f"{fmt} checkpoint {weights}" + (f" ({path})" if hub.is_hub_id(path) else "")


def load_decoder(config, template: dict, loaded: dict) -> dict:
  """The checkpoint's MAE decoder, all of it, or one error: a half-loaded decoder is never used silently."""
  from tpp_jax.tree import leaf_paths
  missing = sorted(set(leaf_paths(template)) - set(leaf_paths(loaded)))
  p = config.pretext
  fix = (f"Set pretext.decoder_width/decoder_depth/decoder_heads/decoder_mlp_dim to the checkpoint's decoder "
         f"(now {p.decoder_width}/{p.decoder_depth}/{p.decoder_heads}/{p.decoder_mlp_dim}), or "
         "--config.init.load_decoder=False to train a new decoder from random init.")
  if missing:
    have = leaf_paths(loaded)
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


def init_from_files(config, encoder, params: dict, aux: dict) -> tuple[dict, dict, str]:
  """Random (params, aux) -> (with the backbone and MAE decoder of config.init, aux, source)."""
  enc, dec_loaded, source = init_encoder(config, encoder, params["encoder"])
  extra, source = init_decoder(config, {k: v for k, v in params.items() if k != "encoder"}, dec_loaded, source)
  params = {"encoder": enc, **extra}
  if "teacher" in aux:  # DINO: the teacher starts as a copy of the (loaded) student
    aux = {**aux, "teacher": jax.tree_util.tree_map(jnp.array, params)}
  return params, aux, source


def load_init(config, encoder, params: dict, aux: dict, labels) -> tuple[dict, dict, str, dict | None]:
  """The load step: random (params, aux) -> (params, aux, init source, target_init info or None).

  Backbone (+ MAE decoder) from config.init, then the target params (and, for init.adapter, the task head and its
  statistics) from config.target_init / config.init.adapter.
  """
  params, aux, source = init_from_files(config, encoder, params, aux)
  target = None
  if config.target_init or config.init.get("adapter"):
    params, target = load_target_init(config, params, labels, aux)
    aux = target.pop("aux", aux)
  return params, aux, source, target


def load_target_init(config, params, labels, aux=None) -> tuple[dict, dict]:
  """Replace the target leaves of `params` by those of config.target_init, or target + task head of init.adapter.

  target_init: the workdir of a `tpp` run, an exported adapter folder (`tpp_jax.export --format adapter`) or a
  Hugging Face peft LoRA folder. init.adapter: an exported adapter folder of a finetune run (its task head and
  head statistics too; the latter come back as info['aux']). Returns (params, info).
  """
  from tpp_jax import partition
  from tpp_jax.checkpoints import adapter as adapter_lib
  adapter = str(config.init.get("adapter", "") or "")
  field = "init.adapter" if adapter else "target_init"
  if adapter and config.target_init:
    raise ConfigError("Both target_init and init.adapter are set; init.adapter already holds the target parameters "
                      "(and the task head): clear one of them.")
  stage = stages_lib.STAGES.get(config.stage)
  if not (stage and stage.target_init):
    allowed = [n for n, s in stages_lib.STAGES.items() if s.target_init]
    only = f"stage {allowed[0]!r}" if len(allowed) == 1 else f"stages {allowed}"
    raise ConfigError(f"{field} is only used by {only} (stage is {config.stage!r}); clear it.")
  tpp_dir = pathlib.Path(adapter or config.target_init).expanduser()
  kind = adapter_lib.folder_kind(tpp_dir) if tpp_dir.is_dir() else None
  if adapter and kind != "adapter":
    raise FileNotFoundError(f"init.adapter={str(tpp_dir)!r} is not a tpp_jax adapter folder (adapter_config.json + "
                            "adapter.safetensors from `python -m tpp_jax.export RUN OUT --format adapter`).")
  if kind is not None:
    target = partition.subtree(params, labels, "target")
    if not target:
      raise ConfigError(f"{field} is set but this model has no target parameters (peft.type='none'?).")
    info = {"path": str(tpp_dir), "kind": kind}
    if kind == "peft":
      loaded, _ = adapter_lib.read_peft(tpp_dir, config, target)
      return merge_into(params, loaded, "params"), info
    loaded, flat, meta = adapter_lib.load_adapter_target(config, params, target, tpp_dir, field)
    info["step"] = int(meta.get("step", 0))
    if adapter:
      loaded["head"], info["aux"] = adapter_lib.load_adapter_head(config, params, aux, flat, meta, tpp_dir)
    return merge_into(params, loaded, "params"), info
  cfg_file = tpp_dir / "config.json"
  if not cfg_file.exists():
    raise FileNotFoundError(f"target_init={str(tpp_dir)!r} has no config.json; it must be the --workdir of a "
                            "`tpp` run, an exported adapter folder or a peft LoRA folder.")
  tpp_cfg = read_json(cfg_file)
  if tpp_cfg.get("stage") != "tpp":
    raise ConfigError(f"target_init points at a {tpp_cfg.get('stage')!r} run; it must be a `tpp` run's workdir.")
  mine = {k: v for k, v in config.peft.to_dict().items() if k not in ("dropout", "prompt_dropout")}
  theirs = {k: v for k, v in tpp_cfg["peft"].items() if k not in ("dropout", "prompt_dropout")}
  if mine != theirs:
    diff = sorted(k for k in mine if mine.get(k) != theirs.get(k))
    raise ConfigError(f"peft config differs from the TPP run in {str(tpp_dir)!r} at {diff}: "
                      f"{ {k: theirs.get(k) for k in diff} } there vs { {k: mine.get(k) for k in diff} } here.")
  if str(tpp_cfg.get("init", {}).get("path", "")) != str(config.init.path):
    raise ConfigError(f"The TPP run used backbone init.path={tpp_cfg['init']['path']!r} but this run uses "
                      f"{config.init.path!r}; target parameters only make sense on the backbone they were "
                      "trained with.")
  target = partition.subtree(params, labels, "target")
  if not target:
    raise ConfigError("target_init is set but this model has no target parameters (peft.type='none'?).")
  loaded, step = store_lib.load_subtree(tpp_dir, target)
  return merge_into(params, loaded, "params"), {"path": str(tpp_dir), "step": int(step)}
