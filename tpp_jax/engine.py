"""The one training engine for every stage.

init -> partition -> optimizer -> sharded jit step -> eval over whole splits -> checkpoint -> log.
Stages differ only by their entry in stages.STAGES: the partition rules, the objective and what is loaded at init
(config.init, config.target_init). A Trainer is made in four steps:
  build(config)          encoder, objective, abstract state (jax.eval_shape), labels, optimizer, shardings, jitted
                         steps; reads no file (checkpoints.restore.load_run uses the same build code)
  build_data(config)     sources and transforms (only where training / evaluation needs them)
  Trainer.load()         random init, then checkpoints.load.load_init: backbone of init.path, target_init / adapter
  Trainer.run()          the loop, under the workdir contract (workdir.py): one live process, same config, exact
                         resume; nothing non-finite is ever saved; SIGTERM / SIGINT checkpoint and stop
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import pathlib
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tpp_jax import config as config_lib
from tpp_jax import partition
from tpp_jax import stages as stages_lib
from tpp_jax import tree as tree_lib
from tpp_jax import workdir as workdir_lib
from tpp_jax.checkpoints import load as load_lib
from tpp_jax.checkpoints import store as store_lib
from tpp_jax.data import device_augment
from tpp_jax.data import pipeline as data_pipeline
from tpp_jax.data import transforms as data_transforms
from tpp_jax.logging_utils import MetricsLogger, progress
from tpp_jax.models.peft import PeftConfig
from tpp_jax.models.vit import ViT, ViTConfig
from tpp_jax.objectives import make_objective
from tpp_jax.objectives.base import LOWER_IS_BETTER

ConfigError = config_lib.ConfigError


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. the loss became NaN); saved checkpoints are kept."""


class Interrupted(TrainingError):
  """SIGTERM / SIGINT stopped the run after checkpointing; `exit_code` is 128 + the signal number."""

  def __init__(self, msg: str, signum: int):
    super().__init__(msg)
    self.exit_code = 128 + int(signum)


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


def make_tx(config, labels):
  """AdamW (warmup-cosine lr) on the trainable labels, set_to_zero on frozen ones; returns (tx, schedule).

  optim.layer_decay < 1: layer-wise lr decay (BEiT / MAE fine-tuning) with L encoder blocks: updates of
  encoder/blocks_i/* are scaled by decay^(L-i), encoder/{patch_embed,cls,pos_embed,reg} by decay^(L+1); the
  rest (encoder/norm, VPT prompts, heads, decoders) keeps the full lr. 1.0 = off (the optimizer state is unchanged).
  """
  o = config.optim
  warmup = min(int(o.warmup_steps), max(int(config.steps) - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, o.lr, warmup, max(int(config.steps), warmup + 1), end_value=o.lr * o.min_lr_ratio)
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
  state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
           "opt_state": jax.eval_shape(tx.init, params), "aux": aux}
  sharding = state_shardings(state, mesh, bool(config.fsdp))
  train_step, eval_step = compile_steps(objective, tx, schedule, mesh, sharding, labels,
                                        device_augment.make(config.data))
  return Built(config=config, stage=stage, mesh=mesh, encoder=encoder, objective=objective, init_fn=init_fn,
               params=params, aux=aux, labels=labels, counts=partition.param_counts(params, labels), tx=tx,
               schedule=schedule, state=state, state_sharding=sharding, train_step=train_step, eval_step=eval_step)


FINITE = "all_finite"  # the train step's flag: loss, gradients, updated params and aux hold no NaN / Inf


def all_finite(tree) -> jax.Array:
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def split_trainable(params, labels) -> tuple[dict, dict]:
  """(trainable, frozen) flat {path: leaf} dicts of params by partition label."""
  flat, lab = tree_lib.flatten(params), tree_lib.flatten(labels)
  trainable = {k: v for k, v in flat.items() if lab[k] != "frozen"}
  return trainable, {k: v for k, v in flat.items() if lab[k] == "frozen"}


AUGMENT_STREAM = 0x61756721  # fold_in constant of the step key's stream for data.augment.on_device


def compile_steps(obj, tx, schedule, mesh: Mesh, state_sharding, labels, augment=None):
  """The jitted (train_step, eval_step) of an objective and optimizer over `mesh` (traced at the first call).

  The train step differentiates the trainable leaves only (frozen ones are closed over), so no gradient of a frozen
  backbone weight is ever computed, as with requires_grad=False in PyTorch. `augment` (data.device_augment.make):
  fn(batch, key) applied to each training batch first, with a key of the step's own.
  """
  repl = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P("data"))

  def train_step(state, batch, base_rng):
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
    finite = finite_grads & all_finite((loss, split_trainable(params, labels)[0], aux))
    mets = {**mets, "update_norm": optax.tree.norm(updates), "lr": schedule(step), FINITE: finite}
    return {"step": step + 1, "params": params, "opt_state": opt_state, "aux": aux}, mets

  def eval_step(params, aux, batch):
    return obj.eval_outputs(params, aux, batch)

  return (jax.jit(train_step, in_shardings=(state_sharding, data, repl), out_shardings=(state_sharding, repl),
                  donate_argnums=0),
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


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

class Trainer:
  """Builds everything for one stage from a config; .run() trains (or resumes) and evaluates."""

  def __init__(self, config: mlc.ConfigDict, workdir: str | os.PathLike, devices=None, sources: dict | None = None):
    config = config_lib.validate(config)
    sources = build_sources(config) if sources is None else sources
    self.config = config = steps_from_epochs(config, sources)  # config.epochs > 0: steps from the train split
    self.workdir = pathlib.Path(workdir).absolute()
    built = build(config, devices)  # (a) nothing read but the config
    self.built, self.stage, self.mesh = built, built.stage, built.mesh
    self.encoder, self.objective, self.labels, self.counts = built.encoder, built.objective, built.labels, built.counts
    self.tx, self.schedule, self.state_sharding = built.tx, built.schedule, built.state_sharding
    self.train_step, self.eval_step = built.train_step, built.eval_step
    n_proc = jax.process_count()
    self.local_batch = int(config.batch_size) // n_proc
    self.local_eval_batch = int(config.eval_batch_size) // n_proc
    self.sources, self.train_fn, self.eval_fn = build_data(config, self.objective, sources)  # (c)
    for line in data_pipeline.check_eval_splits(self.sources, config.eval_splits, f"data.path={config.data.path}",
                                                needs_eval=self.stage.needs_labels):
      print(line, file=sys.stderr)
    self.load()  # (b)

  def load(self):
    """(b) The load step: random init (seed), backbone of init.path, target_init / init.adapter -> self.state."""
    config = self.config
    rng = jax.random.key(int(config.seed))
    self.base_rng = jax.random.fold_in(rng, 1)
    params, aux = self.built.init_fn(rng)
    params, aux, self.init_source, self.target_init = load_lib.load_init(config, self.encoder, params, aux,
                                                                          self.labels)
    params, aux = storage_dtypes(config, params, aux, self.labels)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params), "aux": aux}
    self.state = jax.device_put(state, self.state_sharding)

  # -- data ---------------------------------------------------------------------------------------
  def train_iterator(self):
    c = self.config
    return data_pipeline.train_iter(self.sources["train"], self.train_fn, self.local_batch, int(c.seed),
                                    shard_index=jax.process_index(), shard_count=jax.process_count(),
                                    balance=bool(c.data.balance), prefetch=int(c.data.prefetch),
                                    num_workers=data_pipeline.resolve_workers(c.data.get("workers", "0")))

  def evaluate(self, split: str, params=None, aux=None) -> dict:
    if split not in self.sources:
      raise ConfigError(f"eval split {split!r} is not in the data ({sorted(self.sources)}); fix eval_splits.")
    params = self.state["params"] if params is None else params
    aux = self.state["aux"] if aux is None else aux
    acc = self.objective.accumulator()
    batches = data_pipeline.eval_batches(self.sources[split], self.eval_fn, self.local_eval_batch,
                                         shard_index=jax.process_index(), shard_count=jax.process_count())
    for batch in batches:
      out = self.eval_step(params, aux, global_batch(batch, self.mesh))
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        out = multihost_utils.process_allgather(out, tiled=True)
      acc.add(jax.device_get(out))
    return acc.compute()

  # -- the loop -----------------------------------------------------------------------------------
  def run(self) -> dict:
    """Train (or resume) and evaluate under the workdir contract: lock, same config, then the loop."""
    is_main = jax.process_index() == 0
    with workdir_lib.lock(self.workdir, enabled=is_main), workdir_lib.stop_signals():
      workdir_lib.check_config(self.config, self.workdir)
      return self._loop()

  def _loop(self) -> dict:
    c, wd = self.config, self.workdir
    is_main = jax.process_index() == 0
    if is_main:  # whole or not at all: the other hosts of a multi-host run may be reading it (check_config)
      (wd / "config.json.tmp").write_text(config_lib.to_json(c))
      (wd / "config.json.tmp").replace(wd / "config.json")
    store = store_lib.CheckpointStore(wd, keep=int(c.keep_checkpoints), best_mode=self.best_mode)
    it = self.train_iterator()
    start = 0
    if store.latest_step() is not None:
      self.state, meta = store.restore(self.state)
      it.set_state(meta["data_iter"])
      start = int(self.state["step"])
      print(f"Resumed {wd} at step {start}.")
    if is_main:
      workdir_lib.trim_metrics(wd, start)  # rows an interrupted run logged past its checkpoint are logged again
    logger = MetricsLogger(wd, c.stage, enabled=is_main, purge_step=start + 1 if start else None)
    print(f"[{c.stage}] {self.init_source}; {partition.format_counts(self.counts)}")

    steps, log_every = int(c.steps), int(c.log_every)
    # Throughput without a host sync per step (the host reads the next batch while the device runs this one):
    # images/s over windows that start once the first (compiling) step has finished, or after an eval / checkpoint,
    # and end at a logged step (whose metrics are read back anyway); input waits count, evals do not.
    t_start, timed_steps, t_timed, window = time.time(), 0, 0.0, None
    best = store.best_meta()  # a resumed run keeps comparing against the best it already kept
    stop = min(steps, int(c.stop_after)) if c.stop_after else steps
    bar = progress(range(start, stop), desc=c.stage, enabled=bool(c.progress) and is_main, initial=start,
                   total=steps)
    self._unchecked = []  # (step, all_finite flag) not read back yet: checked before anything is saved
    done = start
    for step in bar:
      batch = next(it)
      self.state, mets = self.train_step(self.state, global_batch(batch, self.mesh), self.base_rng)
      done = step + 1
      self._unchecked.append((done, mets.pop(FINITE)))
      fault_point(wd, "step", done)
      logged = done % log_every == 0 or done == stop
      if logged:
        mets = jax.device_get(mets)  # waits for this step
      if window is None:
        if not logged:
          jax.block_until_ready(self.state["step"])  # the compiling step: the clock starts once it has run
        window = (done, time.time())
      elif logged:
        timed_steps, t_timed = timed_steps + done - window[0], t_timed + time.time() - window[1]
        window = (done, time.time())
      if logged:
        self._check_finite(store)
        ips = self.config.batch_size * timed_steps / t_timed if t_timed else float("nan")
        logger.log(done, "train", {k: float(v) for k, v in mets.items()}, images_per_sec=ips)
        bar.set_postfix(loss=f"{float(mets['loss']):.4f}", img_s=f"{ips:.0f}")
      if c.eval_every and done % int(c.eval_every) == 0 and done != steps:
        self._check_finite(store)
        best = self._eval_and_keep_best(done, logger, store, best)
        fault_point(wd, "eval", done)
        window = None
      if c.checkpoint_every and done % int(c.checkpoint_every) == 0 and done != steps:
        self._save(store, done, it)
        fault_point(wd, "checkpoint", done)
        window = None
      if (signum := workdir_lib.stop_requested()) is not None and done < stop:
        self._save(store, done, it, force=True)
        store.close()
        logger.close()
        name = signal.Signals(signum).name
        raise Interrupted(f"{name}: stopped at step {done} of {steps} after saving checkpoint step {done} in "
                          f"{wd / 'checkpoints'}; rerun the same command to resume.", signum)
    if stop < steps:  # a deliberate stop (stop_after): checkpoint and leave; rerun to resume
      self._save(store, stop, it, force=True)
      store.close()
      logger.close()
      print(f"Stopped at step {stop} of {steps} (stop_after); rerun the same command to resume.")
      return {"stage": c.stage, "stopped_at": stop}
    if done > start:
      self._save(store, steps, it, force=True)
      fault_point(wd, "final_checkpoint", steps)
    final = {}
    for split in c.eval_splits:
      if split in self.sources:
        final[split] = self.evaluate(split)
        logger.log(steps, split, final[split])
    if final:
      logger.log_images(steps, self, "val" if "val" in final else next(iter(final)))
    if "val" in final:
      best = self._keep_best(steps, final["val"], store, best)
    best_final = self._best_final(store, best, final, steps)
    store.close()
    images_per_sec = float(c.batch_size) * timed_steps / t_timed if t_timed else None
    summary = {
        "stage": c.stage, "config": c.to_dict(), "steps": steps,
        "params": {k: self.counts[k] for k in ("total", "trainable", "target", "head", "backbone")},
        "init": self.init_source, "target_init": self.target_init,
        "final": final, "best": best, "best_final": best_final,
        "images_per_sec": images_per_sec, "wall_time_s": time.time() - t_start,
        "data": {"train_examples": len(self.sources["train"])},  # after max_train_examples / label_fraction
        "devices": jax.device_count(), "platform": jax.devices()[0].platform,
    }
    if is_main:
      tmp = wd / "summary.json.tmp"  # written whole or not at all: a kill never leaves half a summary
      tmp.write_text(json.dumps(summary, indent=2, default=_json_default))
      tmp.replace(wd / "summary.json")
    logger.close()
    return summary

  @property
  def best_metric(self) -> str:
    return self.config.best_metric or self.objective.default_metric

  @property
  def best_mode(self) -> str:
    return "min" if self.best_metric in LOWER_IS_BETTER else "max"

  def _save(self, store, step: int, it, force: bool = False):
    """A periodic / final checkpoint, after checking every step since the last check was finite."""
    self._check_finite(store)
    store.save(step, self.state, {"data_iter": it.get_state()}, force=force)

  def _eval_and_keep_best(self, step, logger, store, best):
    if "val" not in self.sources:
      return best
    res = self.evaluate("val")
    logger.log(step, "val", res)
    logger.log_images(step, self, "val")  # MAE reconstructions / segmentation overlays as TensorBoard images
    return self._keep_best(step, res, store, best)

  def _keep_best(self, step, res, store, best):
    if not self.stage.keeps_best or self.best_metric not in res or not math.isfinite(res[self.best_metric]):
      return best
    v = float(res[self.best_metric])
    better = best is None or (v < best["value"] if self.best_mode == "min" else v > best["value"])
    if better:
      store.save_best(step, {"params": self.state["params"], "aux": self.state["aux"]}, v,
                      {"metric": self.best_metric, "value": v, "step": step})
      best = {"step": step, "metric": self.best_metric, "value": v}
    return best

  def _best_final(self, store, best, final: dict, steps: int) -> dict | None:
    """{split: metrics} of the kept best checkpoint on the final eval splits (`final` itself when the best is the
    last step; None when no best was kept). Restored through the store (checksums verified); nothing is logged."""
    if best is None or not final:
      return None
    if int(best["step"]) == steps:
      return final
    state, _ = store.restore_best({"params": self.state["params"], "aux": self.state["aux"]})
    return {split: self.evaluate(split, state["params"], state["aux"]) for split in final}

  def _check_finite(self, store):
    """Read the all-finite flags of the steps run since the last check; stop at the first non-finite one."""
    if not self._unchecked:
      return
    steps = [s for s, _ in self._unchecked]
    flags = np.asarray(jax.device_get(jnp.stack([f for _, f in self._unchecked])))
    self._unchecked = []
    if flags.all():
      return
    bad = steps[int(np.argmin(flags))]
    store.wait()
    last = store.latest_step()
    kept = (f"Nothing non-finite was saved: the last checkpoint, step {last} in {self.workdir / 'checkpoints'}, is "
            "finite, and rerunning with a lower --config.optim.lr resumes from it." if last is not None else
            "No checkpoint was written.")
    raise TrainingError(
        f"Non-finite values (NaN / Inf) in the loss, gradients or parameters at step {bad}; training stopped. Lower "
        f"optim.lr (now {self.config.optim.lr}), keep optim.clip_norm > 0, or check the data normalisation "
        f"(data.mean/std). {kept}")


def fault_point(workdir: pathlib.Path, event: str, step: int):
  """Test hook for the interruption tests: TPP_FAULT='<workdir name>:<event>:<step>[:<signal>]' sends this process
  SIGKILL (or the named signal, e.g. TERM / INT) at that point. Events: step, eval, checkpoint, final_checkpoint."""
  spec = os.environ.get("TPP_FAULT")
  if not spec:
    return
  name, ev, at, *sig = spec.split(":")
  if name == workdir.name and ev == event and int(at) == step:
    os.kill(os.getpid(), getattr(signal, "SIG" + sig[0]) if sig else signal.SIGKILL)


def _json_default(o):
  if isinstance(o, (np.floating, np.integer)):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)


def train(config, workdir) -> dict:
  """Train (or resume) one stage in `workdir` and return its summary; a finished run is not trained again."""
  config = config_lib.validate(config)
  wd = pathlib.Path(workdir).absolute()
  is_main = jax.process_index() == 0
  with workdir_lib.lock(wd, enabled=is_main), workdir_lib.stop_signals():
    sources = None
    if int(config.get("epochs", 0)):  # steps come from the train split's size: known once the data is built
      sources = build_sources(config)
      config = steps_from_epochs(config, sources)
    workdir_lib.check_config(config, wd)
    done = workdir_lib.finished_summary(config, wd)
    if done is not None:
      print(f"{wd} holds this run, finished ({done['steps']} steps); nothing to do (summary.json kept).")
      return done
    return Trainer(config, wd, sources=sources)._loop()
