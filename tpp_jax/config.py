"""The config schema shared by every file in configs/, argument strings, and validation.

A config file defines `get_config(arg=None)` and usually starts from `base_config()`. The optional
`arg` (``--config configs/x.py:ARG``) is a comma list of preset names and dotted overrides:
``:smoke``, ``:peft.type=dora,peft.rank=4``, ``:smoke,seed=1``.
"""
from __future__ import annotations

import ast
import copy
import difflib
import json
import pathlib
from typing import Any, Callable, Mapping

import ml_collections as mlc

from tpp_jax import stages as stages_lib
from tpp_jax.data import config as data_config
from tpp_jax.data.config import SOURCES
from tpp_jax.errors import ConfigError  # noqa: F401 -- its home for callers of config
from tpp_jax.models.peft import PEFT_TYPES

STAGES = tuple(stages_lib.STAGES)
PRETEXTS = ("mae", "dino", "contrastive")
TASKS = ("classification", "segmentation")
INIT_FORMATS = ("auto", "timm", "hf_vit", "hf_vit_mae", "hf_dinov2", "big_vision", "tpp", "none")


def base_config() -> mlc.ConfigDict:
  c = mlc.ConfigDict()
  c.stage = "finetune"
  c.seed = 0
  c.seeds = mlc.FieldReference(1, field_type=int)  # pipeline: number of seeds (seed, seed+1, ...)

  c.model = mlc.ConfigDict(dict(
      variant="Ti/16", image_size=224, channels=3, pooling="cls", pos_emb="learned",
      ln_eps=1e-6, layer_scale=False, drop_path=0.0, dropout=0.0, dtype="float32",
      attention="auto",  # auto: cuDNN on GPU in bf16, else XLA | xla | cudnn
      remat=False,       # recompute block activations in the backward pass (large models, long sequences)
      frozen_dtype="auto"))  # auto: frozen weight matrices in bf16 when dtype is bf16 (build.storage_dtypes) | float32
  # Backbone weights: path to a .pth / .safetensors / .npz (format auto-detected), or a tpp_jax
  # `pretrain` workdir (format 'tpp'), or '' for random init.
  # adapter: an exported adapter folder (tpp_jax.export --format adapter) whose target params AND task head
  # start a finetune run (target_init loads target params only).
  c.init = mlc.ConfigDict(dict(path="", format="auto", load_decoder=True, adapter=""))
  c.peft = mlc.ConfigDict(dict(
      type="lora", rank=8, alpha=8.0, dropout=0.0, targets="q,v", rslora=False,
      adapter_dim=8, adapter_scale=0.1, num_prompts=10, deep=False, prompt_dropout=0.0))
  c.pretext = mlc.ConfigDict(dict(
      type="mae", mask_ratio=0.75, norm_pix_loss=True,
      head="train",              # tpp: the pretext head (MAE decoder, DINO / projection head) train | frozen | auto
                                 # (frozen when init.path brings it; checkpoints/load.resolve_pretext_head)
      decoder_width=128, decoder_depth=2, decoder_heads=4, decoder_mlp_dim=512,
      # DINO
      dino_out_dim=1024, dino_hidden_dim=512, dino_bottleneck_dim=128, teacher_momentum=0.996,
      teacher_temp=0.04, student_temp=0.1, center_momentum=0.9,
      dino_batch_norm=True,  # DINO: standardise the pooled features over the batch before the head (models/heads.py)
      local_crops=0, local_crop_size=32, local_crop_scale=(0.05, 0.4),  # DINO multi-crop (objectives/dino.py)
      teacher_temp_warmup=0.04, teacher_temp_warmup_steps=0,  # DINO: teacher temp from this to teacher_temp
      # contrastive (objectives/contrastive.py): NT-Xent temperature, projection head proj_head
      contrastive_temp=0.2, proj_hidden_dim=256, proj_dim=128))
  c.task = mlc.ConfigDict(dict(
      type="classification", num_classes=2, label_smoothing=0.0, class_weights=False,
      head="linear",             # linear | bn_linear (linear-probe baseline)
      seg_decoder_dim=64, dice_weight=1.0))
  c.data = mlc.ConfigDict(data_config.defaults())  # the data schema lives in tpp_jax/data/config.py
  c.optim = mlc.ConfigDict(dict(
      lr=1e-3, weight_decay=0.05, b1=0.9, b2=0.999, clip_norm=1.0, warmup_steps=20, min_lr_ratio=0.01,
      layer_decay=1.0,           # layer-wise lr decay in (0, 1] (BEiT/MAE; build.make_tx); 1.0 = off
      max_param_norm=1e4))       # divergence: stop when the trainable params' global L2 norm passes this (0 = off)
  c.steps = 200
  c.epochs = 0                 # > 0: steps = ceil(epochs x train examples / batch_size), from the data (engine)
  c.batch_size = 64
  c.eval_every = 100
  c.eval_batch_size = 128
  c.log_every = 10
  c.checkpoint_every = 100
  c.stop_after = 0             # stop (with a checkpoint) after this step; rerun resumes (0 = off)
  c.patience = 0               # converged: stop when this many evaluations in a row brought no new best (0 = off)
  c.keep_checkpoints = 2
  c.best_metric = ""           # e.g. 'auc' or 'dice'; '' = task default
  c.train_extra = ()           # regexes of backbone leaves to train too (finetune/tpp)
  c.target_init = ""           # a TPP workdir whose target parameters start the fine-tune
  c.eval_splits = ("val", "test")
  c.eval_checkpoint = "latest"  # stage eval: latest | best
  c.progress = True
  c.distributed = False        # multi-host; JAX_{COORDINATOR_ADDRESS,NUM_PROCESSES,PROCESS_ID} env or auto-detect
  c.fsdp = False               # shard large params over the data axis
  # pipeline: sub-configs overrides applied to the tpp / finetune arms.
  # label_fractions: the fine-tune arms run once per labelled fraction of the train split (F < 1 in
  # DIR/seed_S/frac_F/); the TPP arm runs once per seed on all training images.
  # compute_matched: add the arm baseline_matched, the baseline trained tpp_steps + steps steps.
  # brackets: add the arms linear (linear probe: task head only) and full (full fine-tune: backbone + head), same
  # backbone, data, steps, optimizer and seed as the baseline, once per labelled fraction.
  # full_lr: the full fine-tune bracket's optim.lr (0 = the baseline's): a PEFT lr (a few new parameters) is often
  # too high for the whole backbone.
  # controls_from: another pipeline's workdir whose control arms (those that start from no TPP arm: baseline,
  # baseline_matched, linear, full) this one shares instead of training its own copy; the two may differ only in
  # their pretext and pipeline.tpp_* fields (e.g. the DINO row of a table shares the MAE row's baselines).
  c.pipeline = mlc.ConfigDict(dict(tpp_steps=200, tpp_lr=1e-3, tpp_batch_size=64, report=True,
                                   label_fractions=(1.0,), compute_matched=False, brackets=False,
                                   full_lr=0.0, controls_from="",
                                   budget="fixed",  # fixed | converged: labelled arms stop at convergence
                                   patience=3))     # converged: evaluations without a new best before stopping
  return c


def check_key(config: mlc.ConfigDict, key: str) -> None:
  """Raise ConfigError if the dotted `key` is not a field of `config` (names the close match and valid keys)."""
  node, parts = config, key.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, mlc.ConfigDict) or part not in node:
      where = ".".join(parts[:i]) or "the top level"
      valid = sorted(node.keys()) if isinstance(node, mlc.ConfigDict) else []
      close = difflib.get_close_matches(part, valid, n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise ConfigError(f"Unknown config key {key!r}: {part!r} is not a field of {where}.{hint} "
                        f"Valid keys there: {', '.join(valid)}.")
    node = node[part]


def apply_overrides(config: mlc.ConfigDict, overrides: Mapping[str, Any]) -> mlc.ConfigDict:
  """Dotted-key overrides ('peft.rank': 4); unknown keys raise ConfigError naming valid ones."""
  for key, value in overrides.items():
    check_key(config, key)
    *path, last = key.split(".")
    node = config
    for part in path:
      node = node[part]
    old = node[last]
    if isinstance(old, tuple) and isinstance(value, (int, float, str)) and not isinstance(value, bool):
      value = (value,)  # one value for a tuple field: a 1-tuple (e.g. pipeline.label_fractions=0.2)
    try:
      node[last] = value
    except TypeError:
      raise ConfigError(f"{key}={value!r} has the wrong type: the field holds {type(old).__name__} values "
                        f"(now {old!r}).") from None
  return config


def resolve_config_path(path: str) -> str:
  """A `--config` file; a missing `configs/NAME.py` (or `NAME.py`) is the installed tpp_jax/configs/NAME.py
  (the same file: configs/ is the package tpp_jax.configs).

  So `--config configs/default.py` works outside a checkout, after `pip install`. Raises ConfigError otherwise.
  """
  p = pathlib.Path(path)
  if p.is_file():
    return path
  from tpp_jax import configs
  if p.suffix == ".py" and p.stem in configs.NAMES and (len(p.parts) == 1 or p.parent.name == "configs"):
    return str(configs.DIR / p.name)
  shipped = ", ".join(f"configs/{n}.py" for n in configs.NAMES)
  raise ConfigError(f"--config {path!r} is not a file, nor one of the shipped configs ({shipped}); "
                    f"e.g. --config configs/default.py")


def load_config_file(spec: str) -> mlc.ConfigDict:
  """`configs/NAME.py[:ARG]` -> get_config(ARG), as `--config` loads it."""
  import importlib.util
  path, _, arg = spec.partition(":")
  path = resolve_config_path(path)
  mod_spec = importlib.util.spec_from_file_location("tpp_user_config", path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def parse_value(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def split_arg(arg: str) -> list[str]:
  """Split on commas outside brackets and quotes: 'a=1,b=(1,2),c' -> ['a=1', 'b=(1,2)', 'c']."""
  tokens, depth, quote, cur = [], 0, None, []
  for ch in arg:
    if quote:
      quote = None if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      tokens.append("".join(cur))
      cur = []
      continue
    cur.append(ch)
  tokens.append("".join(cur))
  return [t.strip() for t in tokens if t.strip()]


def apply_arg(config: mlc.ConfigDict, arg: str | None,
              presets: Mapping[str, Callable[[mlc.ConfigDict], None]] | None = None) -> mlc.ConfigDict:
  """Apply a config-string argument: comma list of preset names and key=value overrides."""
  presets = presets or {}
  for token in split_arg(arg or ""):
    if "=" in token:
      k, v = token.split("=", 1)
      apply_overrides(config, {k.strip(): parse_value(v.strip())})
    elif token in presets:
      presets[token](config)
    else:
      raise ConfigError(f"Unknown config argument {token!r}; presets: {sorted(presets)}, or use key=value.")
  return config


def _choice(name: str, value: Any, valid) -> None:
  if value not in valid:
    raise ConfigError(f"{name}={value!r} is not valid; choose one of {list(valid)}.")


PRETEXT_HEADS = ("train", "frozen", "auto")


def validate(c: mlc.ConfigDict) -> mlc.ConfigDict:
  """Checks enums and cross-field consistency; raises ConfigError with the field and the fix."""
  _choice("stage", c.stage, STAGES)
  _choice("peft.type", c.peft.type, PEFT_TYPES)
  _choice("pretext.type", c.pretext.type, PRETEXTS)
  _choice("task.type", c.task.type, TASKS)
  _choice("task.head", c.task.head, ("linear", "bn_linear"))
  _choice("pretext.head", c.pretext.get("head", "train"), PRETEXT_HEADS)
  _choice("data.source", c.data.source, SOURCES)
  _choice("init.format", c.init.format, INIT_FORMATS)
  _choice("model.pooling", c.model.pooling, ("cls", "gap"))
  _choice("model.dtype", c.model.dtype, ("float32", "bfloat16"))
  _choice("model.attention", c.model.attention, ("auto", "xla", "cudnn"))
  _choice("model.frozen_dtype", c.model.frozen_dtype, ("auto", "float32"))
  if c.data.image_size != c.model.image_size:
    raise ConfigError(f"data.image_size={c.data.image_size} differs from model.image_size={c.model.image_size}; "
                      "set both to the same value (images are resized to data.image_size).")
  if c.data.channels != c.model.channels:
    raise ConfigError(f"data.channels={c.data.channels} differs from model.channels={c.model.channels}; "
                      "set both (grey images are repeated to 3 channels when data.channels=3).")
  if not 0.0 < c.pretext.mask_ratio < 1.0:
    raise ConfigError(f"pretext.mask_ratio={c.pretext.mask_ratio} must be in (0, 1).")
  if int(c.epochs) < 0:
    raise ConfigError(f"epochs={c.epochs} must be >= 0 (0: train `steps` steps).")
  if int(c.epochs) and c.stage == "pipeline" and c.pipeline.compute_matched:
    raise ConfigError("pipeline.compute_matched=True needs the fine-tune budget in steps: set --config.steps and "
                      "--config.epochs=0.")
  for f in ("compute_matched", "brackets"):
    if not isinstance(c.pipeline[f], bool):
      raise ConfigError(f"pipeline.{f}={c.pipeline[f]!r} must be True or False.")
  _choice("pipeline.budget", c.pipeline.get("budget", "fixed"), ("fixed", "converged"))
  if int(c.get("patience", 0)) < 0 or int(c.pipeline.get("patience", 3)) < 1:
    raise ConfigError(f"patience={c.get('patience')} must be >= 0 and pipeline.patience="
                      f"{c.pipeline.get('patience')} >= 1 (evaluations without a new best before stopping).")
  if (c.pipeline.get("budget", "fixed") == "converged" and c.pipeline.compute_matched
      and str(c.pipeline.controls_from or "")):
    raise ConfigError("pipeline.budget=converged matches baseline_matched to this pipeline's own TPP fine-tune, so "
                      "it cannot be shared through pipeline.controls_from: set pipeline.compute_matched=False here, "
                      "or drop controls_from.")
  if int(c.get("patience", 0)) and not int(c.eval_every):
    raise ConfigError(f"patience={c.patience} stops after evaluations without a new best, but eval_every=0 never "
                      "evaluates during training: set --config.eval_every (e.g. 50), or patience=0.")
  if float(c.pipeline.full_lr) < 0:
    raise ConfigError(f"pipeline.full_lr={c.pipeline.full_lr} must be >= 0 (0: the full fine-tune uses optim.lr).")
  if not 0.0 < float(c.optim.layer_decay) <= 1.0:
    raise ConfigError(f"optim.layer_decay={c.optim.layer_decay} must be in (0, 1] (e.g. 0.75; 1.0 = off).")
  if c.task.num_classes < 2:
    raise ConfigError(f"task.num_classes={c.task.num_classes} must be >= 2 (binary segmentation: 2).")
  for f in ("steps", "batch_size", "eval_batch_size", "log_every"):
    if int(c[f]) <= 0:
      raise ConfigError(f"{f}={c[f]} must be positive.")
  _check_label_fractions(c)
  if c.stage not in ("pipeline",) and c.target_init and c.stage != "finetune":
    raise ConfigError(f"target_init is only used by stage 'finetune' (stage is {c.stage!r}); clear it.")
  return c


def _check_label_fractions(c: mlc.ConfigDict) -> None:
  """data.label_fraction in (0, 1]; pipeline.label_fractions: fractions in (0, 1], each once."""
  f = c.data.label_fraction
  if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < float(f) <= 1.0:
    raise ConfigError(f"data.label_fraction={f!r} must be a number in (0, 1] (e.g. 0.05 for 5% of the training "
                      "labels; 1.0 = all).")
  fractions = c.pipeline.label_fractions
  if isinstance(fractions, (int, float)) and not isinstance(fractions, bool):
    fractions = (fractions,)
  if (not isinstance(fractions, (tuple, list)) or not fractions
      or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in fractions)):
    raise ConfigError(f"pipeline.label_fractions={fractions!r} must be a non-empty tuple of numbers in (0, 1], "
                      "e.g. --config.pipeline.label_fractions='(0.05,0.2,1.0)'.")
  bad = [x for x in fractions if not 0.0 < float(x) <= 1.0]
  if bad:
    raise ConfigError(f"pipeline.label_fractions={tuple(fractions)}: {bad} not in (0, 1]; each is the fraction of "
                      "the training labels a fine-tune arm sees (1.0 = all).")
  names = [stages_lib.fraction_dir(x) for x in fractions]
  if len(set(names)) != len(names):
    dup = sorted({x for x, n in zip(fractions, names) if names.count(n) > 1})
    raise ConfigError(f"pipeline.label_fractions={tuple(fractions)} lists {dup} more than once (to 6 significant "
                      "digits); give each fraction once.")
  if c.stage == "pipeline" and float(f) != 1.0:
    raise ConfigError(f"data.label_fraction={f} is set per arm by stage 'pipeline'; leave it at 1.0 and set "
                      f"pipeline.label_fractions=({float(f)}, 1.0) instead.")


HISTORY_KEY = "config_history"  # config.json / summary.json: [{step, field, old, new}] of every change on a rerun


def to_json(c: mlc.ConfigDict, history: list | None = None) -> str:
  """A run's config.json text; `history` (the changes of resumable fields on reruns) is stored beside the fields."""
  d = c.to_dict()
  if history:
    d[HISTORY_KEY] = history
  return json.dumps(d, indent=2, sort_keys=True, default=str)


# Fields added with a default that changes what a run does: (field, the value a config.json saved before the field
# existed ran with, (field, value): the runs it applies to; in the others the new field changes nothing).
BEFORE_FIELD_EXISTED = (("pretext.dino_batch_norm", False, ("pretext.type", "dino")),)


def _dotted_get(tree: Mapping[str, Any], dotted: str):
  for part in dotted.split("."):
    tree = tree.get(part) if isinstance(tree, Mapping) else None
  return tree


def with_defaults(saved: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> dict:
  """A saved config.json (dict) with the fields it lacks filled in from base_config (nested dicts merged):
  a run saved before a field existed ran with that field's default, or with BEFORE_FIELD_EXISTED's value. Its
  config_history (HISTORY_KEY) is left out."""
  if defaults is None:
    defaults = json.loads(to_json(base_config()))
    saved = copy.deepcopy(dict(saved))
    saved.pop(HISTORY_KEY, None)  # the run's history of changes, not a field
    for dotted, value, (when_field, when_value) in BEFORE_FIELD_EXISTED:
      *parents, leaf = dotted.split(".")
      node = _dotted_get(saved, ".".join(parents))
      if isinstance(node, dict) and leaf not in node and _dotted_get(saved, when_field) == when_value:
        node[leaf] = value
  out = dict(saved)
  for k, v in defaults.items():
    if k not in out:
      out[k] = v
    elif isinstance(v, Mapping) and isinstance(out[k], Mapping):
      out[k] = with_defaults(out[k], v)
  return out
