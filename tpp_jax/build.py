"""Building a stage from its config, reading no file: the encoder and objective, the abstract state
(jax.eval_shape), the partition labels, the optimizer (optax.multi_transform over frozen / trainable groups), the
mesh and shardings, the jit-compiled train / eval steps; and the data sources and transforms.

The training loop (engine.py), checkpoints.restore.load_run, predict, evaluate and export all build through here.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tpp_jax import partition
from tpp_jax import stages as stages_lib
from tpp_jax import tree as tree_lib
from tpp_jax.checkpoints import load as load_lib
from tpp_jax.data import device_augment
from tpp_jax.data import pipeline as data_pipeline
from tpp_jax.data import transforms as data_transforms
from tpp_jax.errors import ConfigError
from tpp_jax.models.peft import PeftConfig
from tpp_jax.models.vit import ViT, ViTConfig
from tpp_jax.objectives import make_objective

# ------------------------------------------------------------------------------------------------
# Model and parameters
# ------------------------------------------------------------------------------------------------

def build_encoder(config) -> ViT:
  """The ViT of a config; stages without PEFT parameters (stages.STAGES[stage].peft) get peft.type='none'."""
  vit_cfg = ViTConfig.from_config(config.model)
  peft_cfg = dict(config.peft)
  peft_cfg["type"] = stages_lib.get(config.stage).peft_type(config)
  return ViT(vit_cfg, PeftConfig.from_config(peft_cfg))


def dummy_batch(config, n: int = 2) -> dict:
  """Zeros shaped like a training batch of the config (what model / objective init needs: shapes only)."""
  s, c = int(config.model.image_size), int(config.model.channels)
  return {"image": jnp.zeros((n, s, s, c), jnp.float32), "image2": jnp.zeros((n, s, s, c), jnp.float32),
          "label": jnp.zeros((n,), jnp.int32), "mask": jnp.zeros((n, s, s), jnp.int32),
          "valid": jnp.ones((n,), bool)}


def param_init_fn(encoder: ViT, objective, batch: dict):
  """rng -> random (params, aux) of encoder + objective. Values depend on the batch's shapes only."""
  batch = {k: jnp.asarray(v) for k, v in batch.items()}

  def init(rng):
    r_enc, r_obj = jax.random.split(rng)
    enc = encoder.init(r_enc, batch["image"][:2])["params"]
    extra, aux = objective.init(r_obj, enc, batch)
    params = {"encoder": enc, **extra}
    if "teacher" in aux:  # DINO: the teacher mirrors the student (a copy of the loaded one: load.init_from_files)
      aux = {**aux, "teacher": params}
    return params, aux

  return init


def storage_dtypes(config, params, aux, labels=None) -> tuple[dict, dict]:
  """Frozen weight matrices (ndim >= 2) held in bfloat16 when the model computes in bfloat16.

  They never get an update, and the forward casts them to bf16 anyway (Dense / Conv with dtype=bf16), so the step's
  numbers are unchanged while their memory and memory traffic halve; trainable leaves, norms, biases and the
  optimizer state stay float32. model.frozen_dtype='float32' keeps them float32. Works on arrays and on
  ShapeDtypeStruct trees (the abstract state); DINO's teacher copy of the params (aux['teacher']) follows them.
  """
  if config.model.dtype != "bfloat16" or config.model.get("frozen_dtype", "auto") != "auto":
    return params, aux
  labels = labels if labels is not None else partition.label_tree(params, stages_lib.rules_for(config))

  def cast(p, label):
    if label != "frozen" or len(p.shape) < 2 or p.dtype != jnp.float32:
      return p
    if isinstance(p, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(p.shape, jnp.bfloat16, sharding=p.sharding)
    return p.astype(jnp.bfloat16)

  params = jax.tree_util.tree_map(cast, params, labels)
  if isinstance(aux, dict) and "teacher" in aux:
    aux = {**aux, "teacher": jax.tree_util.tree_map(cast, aux["teacher"], labels)}
  return params, aux


def abstract_state(config, encoder: ViT, objective) -> tuple[dict, dict]:
  """ShapeDtypeStruct trees of (params, aux) as the Trainer builds them; reads no file."""
  params, aux = jax.eval_shape(param_init_fn(encoder, objective, dummy_batch(config)), jax.random.key(0))
  return storage_dtypes(config, params, aux)


def init_params(config, encoder: ViT, objective, sample_batch, rng):
  """Random init of encoder + objective params, then the backbone (and MAE decoder) from config.init."""
  params, aux = param_init_fn(encoder, objective, sample_batch)(rng)
  params, aux, source = load_lib.init_from_files(config, encoder, params, aux)
  return (*storage_dtypes(config, params, aux), source)


def lr_hyper(config) -> np.ndarray:
  """The learning-rate schedule's numbers [peak lr, warm-up steps, total steps, final lr] as float32: an argument of
  the train step, not constants in it, so runs that differ only in steps / lr / warm-up (a pipeline's
  compute-matched arm, an lr sweep, an extended run) share one compiled step."""
  o = config.optim
  warmup = min(int(o.warmup_steps), max(int(config.steps) - 1, 0))
  total = max(int(config.steps), warmup + 1)
  return np.asarray([float(o.lr), warmup, total, float(o.lr) * float(o.min_lr_ratio)], np.float32)


def lr_schedule(hyper) -> Callable:
  """count -> lr: linear warm-up from 0 to the peak, then cosine decay to the final lr at `total` steps (optax's
  warmup_cosine_decay_schedule, with its numbers read from `hyper` = lr_hyper(config), concrete or traced)."""
  def schedule(count):
    peak, warmup, total, end = (hyper[i] for i in range(4))
    count = jnp.asarray(count, jnp.float32)
    warm = peak * count / jnp.maximum(warmup, 1.0)
    decay_steps = total - warmup
    frac = jnp.clip(count - warmup, 0.0, decay_steps) / decay_steps
    cosine = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    return jnp.where(count < warmup, warm, cosine)
  return schedule


def make_tx(config, labels, hyper=None):
  """AdamW (warmup-cosine lr) on the trainable labels, set_to_zero on frozen ones; returns (tx, schedule).
  `hyper`: the schedule's numbers (lr_hyper(config) when None; the train step passes its traced argument).

  optim.layer_decay < 1: layer-wise lr decay (BEiT / MAE fine-tuning) with L encoder blocks: updates of
  encoder/blocks_i/* are scaled by decay^(L-i), encoder/{patch_embed,cls,pos_embed,reg} by decay^(L+1); the
  rest (encoder/norm, VPT prompts, heads, decoders) keeps the full lr. 1.0 = off (the optimizer state is unchanged).
  """
  o = config.optim
  schedule = lr_schedule(lr_hyper(config) if hyper is None else hyper)
  decay_mask = lambda p: jax.tree_util.tree_map(lambda x: x.ndim >= 2, p)
  inner = optax.chain(
      optax.clip_by_global_norm(o.clip_norm) if o.clip_norm else optax.identity(),
      optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask))
  tx = partition.make_optimizer(labels, inner)
  decay = float(o.layer_decay)
  if decay == 1.0:
    return tx, schedule
  import re
  keys = lambda path: tree_lib.path_str(path).split("/")
  flat = jax.tree_util.tree_flatten_with_path(labels)[0]
  blocks = {int(m.group(1)) for p, _ in flat for k in [keys(p)]
            if len(k) > 1 and k[0] == "encoder" and (m := re.fullmatch(r"blocks_(\d+)", k[1]))}
  depth = max(blocks) + 1 if blocks else 0

  def scale(path, _):
    k = keys(path)
    if len(k) < 2 or k[0] != "encoder":
      return 1.0
    m = re.fullmatch(r"blocks_(\d+)", k[1])
    if m:
      return decay ** (depth - int(m.group(1)))
    return decay ** (depth + 1) if k[1] in ("patch_embed", "cls", "pos_embed", "reg") else 1.0

  scales = jax.tree_util.tree_map_with_path(scale, labels)
  scaled = optax.stateless(lambda updates, params=None: jax.tree_util.tree_map(lambda u, s: u * s, updates, scales))
  return optax.chain(tx, scaled), schedule


# ------------------------------------------------------------------------------------------------
# Sharding
# ------------------------------------------------------------------------------------------------

def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all devices (or the given ones); the batch is split on its 'data' axis."""
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


def state_shardings(state, mesh: Mesh, fsdp: bool):
  """Replicated, or (fsdp) sharded on the first axis where it divides the device count."""
  n = mesh.devices.size
  def spec(x):
    shape = np.shape(x)
    if fsdp and len(shape) >= 2 and shape[0] % n == 0 and np.prod(shape) >= 2 ** 14:
      return NamedSharding(mesh, P("data"))
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map(spec, state)


def global_batch(batch: dict, mesh: Mesh) -> dict:
  """Host-local numpy batch -> global jax arrays sharded on the data axis."""
  sh = NamedSharding(mesh, P("data"))
  return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------
# (a) The build step: everything but the data and the weights; reads no file
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Built:
  """What build(config) makes; `params` / `aux` / `state` are abstract (jax.ShapeDtypeStruct trees)."""
  config: mlc.ConfigDict
  stage: stages_lib.Stage
  mesh: Mesh
  encoder: ViT
  objective: Any
  init_fn: Any            # rng -> random (params, aux)
  params: dict
  aux: dict
  labels: dict            # partition labels of params
  counts: dict            # partition.param_counts
  tx: optax.GradientTransformation
  schedule: Any
  state: dict             # {'step', 'params', 'opt_state', 'aux'}
  state_sharding: dict
  train_step: Any         # jitted (state, batch, base_rng) -> (state, metrics)
  eval_step: Any          # jitted (params, aux, batch) -> outputs


def build_model(config) -> tuple[ViT, Any]:
  """(encoder, objective) of a validated config."""
  encoder = build_encoder(config)
  return encoder, make_objective(config, encoder)


def build(config, devices=None) -> Built:
  """The build step of a training stage (stages.STAGES[config.stage].trains); reads nothing but the config."""
  stage = stages_lib.STAGES.get(config.stage)
  if stage is None or not stage.trains:
    raise ConfigError(f"stage {config.stage!r} is not a training stage; use main.py / pipeline.py.")
  mesh = make_mesh(devices)
  n_dev = mesh.devices.size
  for f in ("batch_size", "eval_batch_size"):
    if int(config[f]) % n_dev:
      raise ConfigError(f"{f}={config[f]} must be a multiple of the device count ({n_dev}).")
  encoder, objective = build_model(config)
  init_fn = param_init_fn(encoder, objective, dummy_batch(config))
  params, aux = jax.eval_shape(init_fn, jax.random.key(0))
  labels = partition.label_tree(params, stages_lib.rules_for(config))
  params, aux = storage_dtypes(config, params, aux, labels)
  tx, schedule = make_tx(config, labels)
  make_step_tx = functools.partial(make_tx, config, labels)
  state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
           "opt_state": jax.eval_shape(tx.init, params), "aux": aux}
  sharding = state_shardings(state, mesh, bool(config.fsdp))
  train_step, eval_step = compile_steps(objective, make_step_tx, lr_hyper(config), mesh, sharding, labels,
                                        max_param_norm=float(config.optim.get("max_param_norm", 0.0)),
                                        augment=device_augment.make(config.data))
  return Built(config=config, stage=stage, mesh=mesh, encoder=encoder, objective=objective, init_fn=init_fn,
               params=params, aux=aux, labels=labels, counts=partition.param_counts(params, labels), tx=tx,
               schedule=schedule, state=state, state_sharding=sharding, train_step=train_step, eval_step=eval_step)


FINITE = "all_finite"  # the train step's health flag: no NaN / Inf anywhere, and the params' norm within bounds


def all_finite(tree) -> jax.Array:
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def split_trainable(params, labels) -> tuple[dict, dict]:
  """(trainable, frozen) flat {path: leaf} dicts of params by partition label."""
  flat, lab = tree_lib.flatten(params), tree_lib.flatten(labels)
  trainable = {k: v for k, v in flat.items() if lab[k] != "frozen"}
  return trainable, {k: v for k, v in flat.items() if lab[k] == "frozen"}


AUGMENT_STREAM = 0x61756721  # fold_in constant of the step key's stream for data.augment.on_device


def compile_steps(obj, make_step_tx, hyper, mesh: Mesh, state_sharding, labels, augment=None,
                  max_param_norm: float = 0.0):
  """The jitted (train_step, eval_step) of an objective and optimizer over `mesh` (traced at the first call).

  `make_step_tx(hyper) -> (tx, schedule)` builds the optimizer inside the step from the lr schedule's numbers
  `hyper` (lr_hyper), passed in as an argument: train_step(state, batch, base_rng) calls the compiled step with them.

  The train step differentiates the trainable leaves only (frozen ones are closed over), so no gradient of a frozen
  backbone weight is ever computed, as with requires_grad=False in PyTorch. `augment` (data.device_augment.make):
  fn(batch, key) applied to each training batch first, with a key of the step's own. The step's FINITE flag is false
  when the loss, gradients, update, new params or aux hold a NaN / Inf, or when the trainable params' global norm
  passes `max_param_norm` (> 0): a diverging run stops before a huge-but-finite state is ever saved.
  """
  repl = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P("data"))

  def train_step(state, batch, base_rng, hyper):
    tx, schedule = make_step_tx(hyper)
    step = state["step"]
    rng = jax.random.fold_in(base_rng, step)
    if augment is not None:
      batch = augment(batch, jax.random.fold_in(rng, AUGMENT_STREAM))
    trainable, frozen = split_trainable(state["params"], labels)
    def loss_fn(trainable):
      return obj.loss(tree_lib.unflatten({**frozen, **trainable}), state["aux"], batch, rng, True)
    (loss, (mets, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    finite_grads = all_finite(grads)
    grads = tree_lib.unflatten({**{k: jnp.zeros_like(v) for k, v in frozen.items()}, **grads})  # set_to_zero's
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    aux = obj.after_step(params, aux, step)
    # read lazily by the loop: nothing non-finite is ever saved (frozen leaves never change: not checked)
    trained = split_trainable(params, labels)[0]
    update_norm, param_norm = optax.tree.norm(updates), optax.tree.norm(trained)
    finite = finite_grads & all_finite((loss, trained, aux)) & jnp.isfinite(update_norm)
    if max_param_norm > 0:
      finite = finite & (param_norm <= max_param_norm)
    mets = {**mets, "update_norm": update_norm, "param_norm": param_norm, "lr": schedule(step), FINITE: finite}
    return {"step": step + 1, "params": params, "opt_state": opt_state, "aux": aux}, mets

  def eval_step(params, aux, batch):
    return obj.eval_outputs(params, aux, batch)

  compiled = jax.jit(train_step, in_shardings=(state_sharding, data, repl, repl),
                     out_shardings=(state_sharding, repl), donate_argnums=0)
  hyper = jnp.asarray(hyper, jnp.float32)  # as base_rng: an uncommitted array the jit places

  def step_with_schedule(state, batch, base_rng):
    return compiled(state, batch, base_rng, hyper)
  step_with_schedule.compiled = compiled  # the jitted step (hyper as its 4th argument)
  return (step_with_schedule,
          jax.jit(eval_step, in_shardings=(state_sharding["params"], state_sharding["aux"], data)))


# ------------------------------------------------------------------------------------------------
# (c) The data: only where training / evaluation needs it
# ------------------------------------------------------------------------------------------------

def build_sources(config) -> dict:
  """{split: source} of config.data, with the max_train_examples / max_eval_examples subsets; a stage that needs
  labels trains on the stratified data.label_fraction of the train split (seeded by config.seed)."""
  needs_labels = stages_lib.get(config.stage).needs_labels
  num_classes = int(config.task.num_classes) if needs_labels else None
  sources = data_pipeline.build_sources(config.data, num_classes=num_classes)
  if "train" not in sources:
    raise ConfigError(f"data source {config.data.source!r} at {config.data.path!r} has no 'train' split.")
  if config.data.max_train_examples:
    sources["train"] = data_pipeline.random_subset(sources["train"], int(config.data.max_train_examples))
  fraction = float(config.data.get("label_fraction", 1.0))
  if needs_labels and fraction < 1.0:
    sources["train"] = data_pipeline.stratified_subset(sources["train"], fraction, int(config.seed))
  if config.data.max_eval_examples:
    for s in list(sources):
      if s != "train":
        sources[s] = data_pipeline.random_subset(sources[s], int(config.data.max_eval_examples))
  return sources


def steps_from_epochs(config, sources: dict):
  """config with steps = ceil(epochs × len(train) / batch_size) when config.epochs > 0 (else config itself)."""
  if not int(config.get("epochs", 0)):
    return config
  config = copy.deepcopy(config)
  with config.unlocked():
    config.steps = math.ceil(int(config.epochs) * len(sources["train"]) / int(config.batch_size))
  return config


def build_data(config, objective, sources: dict | None = None) -> tuple[dict, Any, Any]:
  """(sources, train transform, eval transform) for training `objective`; sets its class weights if asked."""
  sources = build_sources(config) if sources is None else sources
  if objective.needs_labels and config.data.source == "jpeg_npz":
    raise ConfigError("data.source='jpeg_npz' has no labels; use it for stage 'pretrain' or 'tpp'.")
  train_fn = data_transforms.make_transform(config.data, train=True)
  views_fn = objective.make_views(train_fn, config.data)
  if views_fn is not train_fn and train_fn.augment.on_device:
    raise ConfigError(f"data.augment.on_device=True augments one view per image in the train step; "
                      f"pretext.type={config.pretext.type!r} draws several views on the host. Use "
                      "data.augment.on_device=False with it.")
  train_fn = views_fn
  eval_fn = data_transforms.make_transform(config.data, train=False)
  if config.task.class_weights and hasattr(objective, "class_weights"):
    objective.class_weights = np.asarray(data_pipeline.class_weights(sources["train"]), np.float32)
  return sources, train_fn, eval_fn
