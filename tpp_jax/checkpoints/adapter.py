"""Adapter files: our own framework-neutral format and Hugging Face peft's LoRA format, read and write.

tpp_jax adapter folder (`python -m tpp_jax.export RUN OUT --format adapter`):
  adapter.safetensors   float32 leaves named by their '/'-joined path in the run's parameter tree:
                          encoder/...   the target (PEFT) leaves, e.g. encoder/blocks_0/attn/q/lora_a
                          head/...      the task head (finetune runs), e.g. head/fc/kernel
                          aux/...       the head's non-gradient state (BatchNorm statistics), if any
  adapter_config.json   {"format": "tpp_jax.adapter", "format_version", "stage", "step", "checkpoint",
                         "peft", "model", "task", "init", "target"/"head"/"aux" (leaf names),
                         "backbone_sha256" (the frozen encoder leaves), "config" (the run's whole config)}
  Loaded by `target_init=OUT` (target leaves) and `init.adapter=OUT` (target leaves + task head).

peft folder (`--format peft`, LoRA / DoRA / rsLoRA on a Hugging Face ViT): adapter_model.safetensors with
`base_model.model.layers.N.attention.q_proj.lora_A.weight` = lora_a.T, `lora_B.weight` = lora_b.T,
`lora_magnitude_vector` = dora_m, and a LoraConfig adapter_config.json (alpha, r, use_rslora, use_dora).
A peft LoRA folder is also accepted as `target_init` (its LoRA leaves only; transformers 4 names too).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import re
from typing import Any, Mapping

import numpy as np

from tpp_jax import config as config_lib
from tpp_jax.checkpoints import hub
from tpp_jax.checkpoints.hf_export import flatten
from tpp_jax.jsonio import read_json, write_atomic
from tpp_jax.tree import unflatten

ConfigError = config_lib.ConfigError
ADAPTER_FORMAT, ADAPTER_VERSION = "tpp_jax.adapter", 1
ADAPTER_WEIGHTS, CONFIG_FILE = "adapter.safetensors", "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# our LoRA site -> the transformers 5 module inside a ViT layer (peft keys and target_modules)
PEFT_MODULES = {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj",
                "o": "attention.o_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
# module names in peft files -> our site (transformers 5 and 4 layouts)
_PEFT_SITES = {**{m: s for s, m in PEFT_MODULES.items()},
               "attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
               "attention.output.dense": "o", "intermediate.dense": "fc1", "output.dense": "fc2"}
_PEFT_KEY = re.compile(r"base_model\.model\.(?:[a-z_]+\.)?(?:encoder\.layer|layers)\.(\d+)\.(.+)\."
                       r"(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)")
_PEFT_LEAF = {"lora_A.weight": "lora_a", "lora_B.weight": "lora_b", "lora_magnitude_vector": "dora_m",
              "lora_magnitude_vector.weight": "dora_m"}
_OUR_SITE_PATH = {"q": "attn/q", "k": "attn/k", "v": "attn/v", "o": "attn/o", "fc1": "mlp/fc1", "fc2": "mlp/fc2"}
# config fields that may differ between the run that trained the leaves and the run that loads them
_FREE_PEFT = ("dropout", "prompt_dropout")
_FREE_MODEL = ("dropout", "drop_path", "dtype", "pooling")  # pooling: checked only where the head is loaded


def folder_kind(path) -> str | None:
  """'adapter' (ours), 'peft' (Hugging Face peft) or None for a folder without adapter_config.json."""
  cfg = pathlib.Path(path) / CONFIG_FILE
  if not cfg.is_file():
    return None
  meta = read_json(cfg, require_object=True)
  if meta.get("format") == ADAPTER_FORMAT:
    return "adapter"
  return "peft" if "peft_type" in meta else None


def backbone_fingerprint(encoder_params: Mapping[str, Any], exclude=()) -> str:
  """sha256 over the encoder leaves not in `exclude` ('encoder/...' names): the frozen backbone's identity."""
  h = hashlib.sha256()
  skip = set(exclude)
  for name, x in sorted(flatten(encoder_params, "encoder/").items()):
    if name in skip:
      continue
    x = np.ascontiguousarray(np.asarray(x, np.float32) + np.float32(0.0))  # -0.0 and 0.0 hash alike
    h.update(f"{name}{x.shape}".encode())
    h.update(x.tobytes())
  return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------

def write_adapter(out: pathlib.Path, leaves: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> list[str]:
  """OUT/adapter.safetensors (fp32 `leaves`, '/'-joined names) + OUT/adapter_config.json (`meta` + format)."""
  from safetensors.numpy import save_file
  tensors = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in sorted(leaves.items())}
  save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": ADAPTER_FORMAT})
  meta = {"format": ADAPTER_FORMAT, "format_version": ADAPTER_VERSION, **meta}
  write_atomic(out / CONFIG_FILE, json.dumps(meta, indent=2, default=str) + "\n")
  return [ADAPTER_WEIGHTS, CONFIG_FILE]


def peft_state_dict(encoder_target: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Our LoRA/DoRA leaves (an encoder subtree) -> peft adapter_model.safetensors tensors."""
  out, left = {}, []
  for path, x in flatten(encoder_target).items():
    m = re.fullmatch(r"blocks_(\d+)/(attn/[qkvo]|mlp/fc[12])/(lora_a|lora_b|dora_m)", path)
    if not m:
      left.append(path)
      continue
    site = m.group(2).split("/")[1]
    prefix = f"base_model.model.layers.{int(m.group(1))}.{PEFT_MODULES[site]}."
    leaf = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight", "dora_m": "lora_magnitude_vector"}[m.group(3)]
    out[prefix + leaf] = np.ascontiguousarray((x.T if x.ndim == 2 else x).astype(np.float32))
  if left:
    raise ValueError(f"peft's LoRA format has no place for {', '.join(left[:5])}")
  return out


def peft_config_json(peft_cfg, base_model: str, base_class: str = "ViTModel") -> dict:
  """A peft LoraConfig (adapter_config.json) equivalent to our PeftConfig (type lora | dora)."""
  module = "vit_mae" if base_class == "ViTMAEModel" else "vit"
  return {
      "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model, "revision": None,
      "auto_mapping": {"base_model_class": base_class,
                       "parent_library": f"transformers.models.{module}.modeling_{module}"},
      "r": int(peft_cfg.rank), "lora_alpha": float(peft_cfg.alpha), "lora_dropout": float(peft_cfg.dropout),
      "target_modules": sorted(PEFT_MODULES[s].split(".")[-1] for s in peft_cfg.targets),
      "use_rslora": bool(peft_cfg.rslora), "use_dora": peft_cfg.type == "dora", "bias": "none",
      "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
      "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
  }


# ------------------------------------------------------------------------------------------------
# Where a backbone came from
# ------------------------------------------------------------------------------------------------

def hf_weights(init_path: str) -> pathlib.Path | None:
  """The weights file of init.path when it is a Hugging Face file, model folder or Hub id (else None)."""
  try:
    p = hub.local_path(str(init_path))
  except (FileNotFoundError, ValueError):  # a Hub id not reachable now: like a local file deleted since
    return None
  if p.is_dir():
    return next((p / n for n in HF_WEIGHTS if (p / n).is_file()), None)
  return p if p.is_file() else None


def weight_names(weights: pathlib.Path) -> list[str]:
  if weights.name.endswith(".index.json"):
    return list(read_json(weights, require_object=True).get("weight_map", {}))
  from tpp_jax.checkpoints import convert
  if weights.suffix == ".safetensors":
    return convert.safetensors_keys(weights)
  return list(convert.load_state_dict(weights))


def hf_format(init_path: str, init_format: str = "auto") -> tuple[str | None, pathlib.Path | None]:
  """(convert.detect_format name or None, weights file) of a run's backbone init.path."""
  if not init_path or init_format in ("none", "tpp"):
    return None, None
  weights = hf_weights(init_path)
  if weights is None or weights.suffix == ".npz":
    return None, weights
  try:
    names = weight_names(weights)
  except Exception:  # noqa: BLE001 - unreadable or not a checkpoint: not a Hugging Face backbone
    return None, weights
  if any(k.startswith("encoder/") for k in names):  # tpp_jax's own flat file
    return None, weights
  from tpp_jax.checkpoints import convert
  try:
    fmt = convert.detect_format(dict.fromkeys(names))
  except ValueError:
    return None, weights
  return fmt, weights


def hf_folder(init_path: str) -> pathlib.Path:
  """The folder `from_pretrained` takes for a Hugging Face init.path (the file's folder for a file)."""
  p = hub.local_path(str(init_path)).absolute()
  return p if p.is_dir() else p.parent


# ------------------------------------------------------------------------------------------------
# Loading (checkpoints/load.load_target_init)
# ------------------------------------------------------------------------------------------------

def _peft_fields(peft: Mapping[str, Any]) -> dict:
  from tpp_jax.models.peft import PeftConfig
  d = dataclasses.asdict(PeftConfig.from_config(dict(peft)))
  return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items() if k not in _FREE_PEFT}


def _model_fields(model: Mapping[str, Any]) -> dict:
  from tpp_jax.models.vit import ViTConfig
  d = dataclasses.asdict(ViTConfig.from_config(dict(model)))
  return {k: v for k, v in d.items() if k not in _FREE_MODEL}


def _diff_error(what: str, where: str, mine: dict, theirs: dict, prefix: str):
  diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
  if diff:
    raise ConfigError(f"{what} differs from {where} at {[f'{prefix}.{k}' for k in diff]}: "
                      f"{ {k: theirs.get(k) for k in diff} } there vs { {k: mine.get(k) for k in diff} } here; set "
                      + " ".join(f"--config.{prefix}.{k}={theirs.get(k)!r}" for k in diff) + ".")


def check_peft(config, theirs: Mapping[str, Any], where: str):
  """The peft config (all but dropout) must be the one the leaves were trained with."""
  _diff_error("peft config", where, _peft_fields(config.peft), _peft_fields(theirs), "peft")


def check_backbone(config, meta: Mapping[str, Any], encoder_params, where: str):
  """Same frozen backbone: the fingerprint of its weights when the adapter has one, else the same init.path."""
  theirs = str(meta.get("init", {}).get("path", ""))
  mine = str(config.init.path or "")
  _diff_error("model config", where, _model_fields(config.model), _model_fields(meta.get("model", {})), "model")
  want = meta.get("backbone_sha256")
  if want:
    if backbone_fingerprint(encoder_params, meta.get("target", ())) == want:
      return
    raise ConfigError(f"{where} was trained on the backbone init.path={theirs!r}, but this run's backbone "
                      f"(init.path={mine!r}) has different weights; target parameters only make sense on the "
                      f"backbone they were trained with: set --config.init.path to that backbone.")
  if theirs != mine:
    raise ConfigError(f"{where} was trained on backbone init.path={theirs!r} but this run uses {mine!r}; target "
                      "parameters only make sense on the backbone they were trained with.")


def _select(flat_file: Mapping[str, np.ndarray], template: Mapping[str, Any], prefix: str, where: str, what: str,
            fix: str) -> dict:
  """The leaves of `template` (nested, under `prefix`) from `flat_file`, all of them with equal shapes."""
  want = {k: np.shape(v) for k, v in flatten(template, prefix).items()} if template else {}
  have = {k: v for k, v in flat_file.items() if k.startswith(prefix)}
  missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
  shapes = [f"{k}: {tuple(have[k].shape)} there vs {want[k]} here" for k in sorted(want)
            if k in have and tuple(have[k].shape) != tuple(want[k])]
  if missing or unexpected or shapes:
    parts = [f"missing there {missing[:6]}" if missing else "", f"not in this model {unexpected[:6]}" if unexpected
             else "", f"shapes differ: {'; '.join(shapes[:6])}" if shapes else ""]
    raise ConfigError(f"The {what} in {where} do not fit this run: {', '.join(p for p in parts if p)}. {fix}")
  return unflatten({k[len(prefix):]: np.asarray(v, np.float32) for k, v in have.items()})


def read_adapter(folder) -> tuple[dict, dict[str, np.ndarray]]:
  """(adapter_config.json, flat leaves) of a tpp_jax adapter folder."""
  folder = pathlib.Path(folder)
  meta = read_json(folder / CONFIG_FILE, require_object=True)
  if meta.get("format") != ADAPTER_FORMAT or int(meta.get("format_version", 0)) > ADAPTER_VERSION:
    raise ConfigError(f"{folder} holds a {meta.get('format')!r} v{meta.get('format_version')} adapter; this "
                      f"tpp_jax reads {ADAPTER_FORMAT!r} up to v{ADAPTER_VERSION}.")
  if not (folder / ADAPTER_WEIGHTS).is_file():
    raise FileNotFoundError(f"{folder / ADAPTER_WEIGHTS} is missing; export the run again.")
  from safetensors.numpy import load_file
  return meta, load_file(str(folder / ADAPTER_WEIGHTS))


def load_adapter_target(config, params, target: Mapping[str, Any], folder, field: str) -> tuple[dict, dict, dict]:
  """Target leaves from a tpp_jax adapter folder: (loaded {'encoder': ...} subtree, flat file, its config)."""
  where = f"the adapter {field}={str(folder)!r}"
  meta, flat = read_adapter(folder)
  check_peft(config, meta.get("peft", {}), where)
  check_backbone(config, meta, params["encoder"], where)
  fix = "Does the peft config (type, rank, targets, train_extra) match the exported run's?"
  loaded = {k: v for k, v in flat.items() if not k.startswith(("head/", "aux/"))}
  return _select(loaded, target, "", where, "target parameters", fix), flat, meta


def load_adapter_head(config, params, aux, flat, meta, folder) -> tuple[dict, dict]:
  """(head subtree, aux) of init.adapter; one ConfigError naming what differs when they do not fit."""
  where = f"the adapter init.adapter={str(folder)!r}"
  if not meta.get("head"):
    raise ConfigError(f"{where} comes from a {meta.get('stage')!r} run and has no task head; use it as "
                      f"--config.target_init={str(folder)!r} (target parameters only) instead.")
  task = {k: meta.get("task", {}).get(k) for k in ("type", "num_classes", "head")}
  mine = {k: config.task.get(k) for k in task}
  _diff_error("task config", where, mine, task, "task")
  pooling = meta.get("model", {}).get("pooling", config.model.pooling)
  _diff_error("model config", where, {"pooling": config.model.pooling}, {"pooling": pooling}, "model")
  fix = "Set task.* and model.* as in the exported run's adapter_config.json."
  head = _select(flat, params.get("head", {}), "head/", where, "task head", fix)
  aux_have = {k: v for k, v in flat.items() if k.startswith("aux/")}
  new_aux = aux
  if aux_have or flatten(aux or {}):
    new_aux = _select(flat, aux or {}, "aux/", where, "head statistics", fix)
  return head, new_aux


def read_peft(folder, config, target: Mapping[str, Any]) -> tuple[dict, dict]:
  """LoRA / DoRA leaves of a Hugging Face peft folder as our {'encoder': ...} subtree, and its config."""
  folder = pathlib.Path(folder)
  where = f"the peft adapter target_init={str(folder)!r}"
  meta = read_json(folder / CONFIG_FILE, require_object=True)
  weights = folder / PEFT_WEIGHTS
  if not weights.is_file():
    raise FileNotFoundError(f"{weights} is missing; a peft folder holds adapter_model.safetensors + "
                            "adapter_config.json (PeftModel.save_pretrained).")
  if meta.get("peft_type") != "LORA":
    raise ConfigError(f"{where} is a peft {meta.get('peft_type')!r} adapter; only LORA (LoRA, DoRA, rsLoRA) loads.")
  plain = {"rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "bias": "none", "lora_bias": False,
           "fan_in_fan_out": False}
  bad = [k for k, v in plain.items() if meta.get(k) not in (None, v)]
  if bad:
    raise ConfigError(f"{where} uses peft options tpp_jax LoRA does not have: "
                      + ", ".join(f"{k}={meta[k]!r}" for k in bad) + ".")
  from safetensors.numpy import load_file
  flat, sites, unknown = {}, set(), []
  for key, x in load_file(str(weights)).items():
    if "lora_" not in key:
      continue  # modules_to_save (e.g. a PyTorch classifier head): not a target parameter
    m = _PEFT_KEY.fullmatch(key)
    if not m or m.group(2) not in _PEFT_SITES:
      unknown.append(key)
      continue
    site = _PEFT_SITES[m.group(2)]
    sites.add(site)
    leaf = _PEFT_LEAF[m.group(3)]
    flat[f"encoder/blocks_{int(m.group(1))}/{_OUR_SITE_PATH[site]}/{leaf}"] = x.T if x.ndim == 2 else x
  if unknown:
    raise ConfigError(f"{where} has LoRA weights on modules tpp_jax's ViT does not have: {unknown[:4]}.")
  theirs = {"type": "dora" if meta.get("use_dora") else "lora", "rank": meta.get("r"), "alpha":
            float(meta.get("lora_alpha", 8)), "rslora": bool(meta.get("use_rslora", False)),
            "targets": [s for s in _OUR_SITE_PATH if s in sites]}
  mine = _peft_fields(config.peft)
  _diff_error("peft config", where, {k: mine[k] for k in theirs}, theirs, "peft")
  _check_hf_base(config, meta.get("base_model_name_or_path"), where)
  fix = "Does the backbone (model.* and init.path) match the peft adapter's base model?"
  return _select(flat, target, "", where, "LoRA weights", fix), meta


def _check_hf_base(config, base: str | None, where: str):
  mine = str(config.init.path or "")
  if not base:
    print(f"note: {where} does not name its base model; assuming init.path={mine!r}.", flush=True)
    return
  p = pathlib.Path(base).expanduser()
  if hub.is_hub_id(mine) and hub.parse(mine)[0] == base:  # peft names a Hub base model by its repo id
    return
  if not p.exists():
    print(f"note: {where} was made for base model {base!r} (not a local path); assuming it is init.path={mine!r}.",
          flush=True)
    return
  if not mine or hf_folder(mine).resolve() != hf_folder(base).resolve():
    raise ConfigError(f"{where} was trained on base model {base!r} but this run's backbone is init.path={mine!r}; "
                      f"set --config.init.path={base!r}.")
