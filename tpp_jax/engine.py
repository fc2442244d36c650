"""The one training engine for every stage (DESIGN.md §1).

init -> partition -> optimizer -> sharded jit step -> eval over whole splits -> checkpoint -> log.
Stages differ only by the partition rules (partition.default_rules), the objective
(objectives.make_objective) and what is loaded at init (config.init, config.target_init).
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tpp_jax import config as config_lib
from tpp_jax import partition
from tpp_jax.checkpoints import load as load_lib
from tpp_jax.checkpoints import store as store_lib
from tpp_jax.checkpoints.load import load_backbone, merge_into as _merge_into  # noqa: F401 (re-exported)
from tpp_jax.data import pipeline as data_pipeline
from tpp_jax.data import transforms as data_transforms
from tpp_jax.models.peft import PeftConfig
from tpp_jax.models.vit import ViT, ViTConfig
from tpp_jax.objectives import make_objective
from tpp_jax.objectives.base import LOWER_IS_BETTER
from tpp_jax.logging_utils import MetricsLogger, progress

ConfigError = config_lib.ConfigError
# Config fields that may change between a run and its resumption in the same workdir.
RESUMABLE_FIELDS = ("steps", "stop_after", "eval_every", "checkpoint_every", "log_every", "progress", "keep_checkpoints",
                    "eval_splits", "eval_batch_size")


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. the loss became NaN); saved checkpoints are kept."""


# ------------------------------------------------------------------------------------------------
# Model and parameters
# ------------------------------------------------------------------------------------------------

def build_encoder(config) -> ViT:
  vit_cfg = ViTConfig.from_config(config.model)
  peft_cfg = dict(config.peft)
  if config.stage in ("pretrain", "linear", "full"):
    peft_cfg["type"] = "none"  # these stages train no PEFT parameters
  return ViT(vit_cfg, PeftConfig.from_config(peft_cfg))


def init_params(config, encoder: ViT, objective, sample_batch, rng):
  """Random init of encoder + objective params, then the backbone (and MAE decoder) from config.init."""
  r_enc, r_obj = jax.random.split(rng)
  images = jnp.asarray(sample_batch["image"][:2])
  enc_params = encoder.init(r_enc, images)["params"]
  enc_params, dec_loaded, source = load_lib.init_encoder(config, encoder, enc_params)
  extra, aux = objective.init(r_obj, enc_params, {k: jnp.asarray(v) for k, v in sample_batch.items()})
  extra, source = load_lib.init_decoder(config, extra, dec_loaded, source)
  params = {"encoder": enc_params, **extra}
  if "teacher" in aux:  # DINO: the teacher starts as a copy of the (loaded) student
    aux = {**aux, "teacher": jax.tree_util.tree_map(jnp.array, params)}
  return params, aux, source


def load_target_init(config, params, labels, aux=None) -> tuple[dict, dict]:
  """Replace the target leaves of `params` by those of config.target_init, or target + task head of init.adapter.

  target_init: the workdir of a `tpp` run, an exported adapter folder (`tpp_jax.export --format adapter`) or a
  Hugging Face peft LoRA folder. init.adapter: an exported adapter folder of a finetune run (its task head and
  head statistics too; the latter come back as info['aux']). Returns (params, info).
  """
  from tpp_jax.checkpoints import adapter as adapter_lib
  adapter = str(config.init.get("adapter", "") or "")
  field = "init.adapter" if adapter else "target_init"
  if adapter and config.target_init:
    raise ConfigError("Both target_init and init.adapter are set; init.adapter already holds the target parameters "
                      "(and the task head): clear one of them.")
  if adapter and config.stage != "finetune":
    raise ConfigError(f"init.adapter is only used by stage 'finetune' (stage is {config.stage!r}); clear it.")
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
      return _merge_into(params, loaded, "params"), info
    loaded, flat, meta = adapter_lib.load_adapter_target(config, params, target, tpp_dir, field)
    info["step"] = int(meta.get("step", 0))
    if adapter:
      loaded["head"], info["aux"] = adapter_lib.load_adapter_head(config, params, aux, flat, meta, tpp_dir)
    return _merge_into(params, loaded, "params"), info
  cfg_file = tpp_dir / "config.json"
  if not cfg_file.exists():
    raise FileNotFoundError(f"target_init={str(tpp_dir)!r} has no config.json; it must be the --workdir of a "
                            "`tpp` run, an exported adapter folder or a peft LoRA folder.")
  tpp_cfg = store_lib.read_json(cfg_file)
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
  return _merge_into(params, loaded, "params"), {"path": str(tpp_dir), "step": int(step)}


def make_tx(config, labels):
  o = config.optim
  warmup = min(int(o.warmup_steps), max(int(config.steps) - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, o.lr, warmup, max(int(config.steps), warmup + 1), end_value=o.lr * o.min_lr_ratio)
  decay_mask = lambda p: jax.tree_util.tree_map(lambda x: x.ndim >= 2, p)
  inner = optax.chain(
      optax.clip_by_global_norm(o.clip_norm) if o.clip_norm else optax.identity(),
      optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask))
  return partition.make_optimizer(labels, inner), schedule


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
# The run
# ------------------------------------------------------------------------------------------------

class _Subset:
  """A fixed random subset (seed 0, same for every run) of a source: quick runs keep class balance."""

  def __init__(self, source, n):
    self.source, self.n = source, min(n, len(source))
    self.index = np.sort(np.random.default_rng(0).permutation(len(source))[:self.n])
    for a in ("num_classes", "class_names", "task"):
      if hasattr(source, a):
        setattr(self, a, getattr(source, a))
    if getattr(source, "labels", None) is not None:
      self.labels = np.asarray(source.labels)[self.index]

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if not 0 <= i < self.n:
      raise IndexError(i)
    return self.source[int(self.index[i])]


def _two_views(fn):
  def apply(record, rng):
    a = fn(record, rng)
    b = fn(record, rng)
    return {**a, "image2": b["image"]}
  return apply


def check_workdir(config, workdir: pathlib.Path):
  """Refuse to mix a different config into a workdir that holds a run (nothing saved is overwritten)."""
  cfg_file = workdir / "config.json"
  if not cfg_file.exists():
    return
  # a run saved before a config field existed ran with that field's default
  old = _with_defaults(store_lib.read_json(cfg_file), json.loads(config_lib.to_json(config_lib.base_config())))
  new = json.loads(config_lib.to_json(config))
  diff = sorted(k for k in set(old) | set(new) if k not in RESUMABLE_FIELDS and old.get(k) != new.get(k))
  if diff:
    raise ConfigError(f"--workdir {workdir} already holds a run with a different config (fields {diff}). "
                      "Use a new --workdir, or the same config to resume it.")


def _with_defaults(saved: dict, defaults: dict) -> dict:
  """`saved` with the fields it lacks filled in from `defaults` (nested dicts merged)."""
  out = dict(saved)
  for k, v in defaults.items():
    if k not in out:
      out[k] = v
    elif isinstance(v, dict) and isinstance(out[k], dict):
      out[k] = _with_defaults(out[k], v)
  return out


class Trainer:
  """Builds everything for one stage from a config; .run() trains (or resumes) and evaluates."""

  def __init__(self, config: mlc.ConfigDict, workdir: str | os.PathLike, devices=None):
    self.config = config = config_lib.validate(config)
    if config.stage in ("eval", "pipeline"):
      raise ConfigError(f"stage {config.stage!r} is not a training stage; use main.py / pipeline.py.")
    self.workdir = pathlib.Path(workdir).absolute()
    self.mesh = make_mesh(devices)
    n_dev, n_proc = self.mesh.devices.size, jax.process_count()
    for f in ("batch_size", "eval_batch_size"):
      if int(config[f]) % n_dev:
        raise ConfigError(f"{f}={config[f]} must be a multiple of the device count ({n_dev}).")
    self.local_batch = int(config.batch_size) // n_proc
    self.local_eval_batch = int(config.eval_batch_size) // n_proc

    # data
    num_classes = int(config.task.num_classes) if config.stage not in ("pretrain", "tpp") else None
    self.sources = data_pipeline.build_sources(config.data, num_classes=num_classes)
    if "train" not in self.sources:
      raise ConfigError(f"data source {config.data.source!r} at {config.data.path!r} has no 'train' split.")
    if config.data.max_train_examples:
      self.sources["train"] = _Subset(self.sources["train"], int(config.data.max_train_examples))
    if config.data.max_eval_examples:
      for s in list(self.sources):
        if s != "train":
          self.sources[s] = _Subset(self.sources[s], int(config.data.max_eval_examples))

    # model, objective, params
    self.encoder = build_encoder(config)
    self.objective = make_objective(config, self.encoder)
    if self.objective.needs_labels and config.data.source == "jpeg_npz":
      raise ConfigError("data.source='jpeg_npz' has no labels; use it for stage 'pretrain' or 'tpp'.")
    self.train_fn = data_transforms.make_transform(config.data, train=True)
    if self.objective.views == 2:
      self.train_fn = _two_views(self.train_fn)
    self.eval_fn = data_transforms.make_transform(config.data, train=False)
    if config.task.class_weights and hasattr(self.objective, "class_weights"):
      self.objective.class_weights = np.asarray(data_pipeline.class_weights(self.sources["train"]), np.float32)

    sample = self.train_fn(self.sources["train"][0], np.random.default_rng(0))
    sample = {k: np.stack([v, v]) for k, v in sample.items()}
    rng = jax.random.key(int(config.seed))
    self.base_rng = jax.random.fold_in(rng, 1)
    params, aux, self.init_source = init_params(config, self.encoder, self.objective, sample, rng)
    rules = partition.default_rules(config.stage, config.peft.type if config.stage in ("tpp", "finetune") else "none",
                                    fixed_pos_emb=config.model.pos_emb == "sincos",
                                    train_extra=tuple(config.train_extra))
    self.labels = partition.label_tree(params, rules)
    self.target_init = None
    if config.target_init or config.init.get("adapter"):
      params, self.target_init = load_target_init(config, params, self.labels, aux)
      aux = self.target_init.pop("aux", aux)
    self.counts = partition.param_counts(params, self.labels)
    self.tx, self.schedule = make_tx(config, self.labels)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params), "aux": aux}
    self.state_sharding = state_shardings(state, self.mesh, bool(config.fsdp))
    self.state = jax.device_put(state, self.state_sharding)
    self._compile()

  # -- compiled steps ---------------------------------------------------------------------------
  def _compile(self):
    obj, tx, schedule = self.objective, self.tx, self.schedule
    repl = NamedSharding(self.mesh, P())
    data = NamedSharding(self.mesh, P("data"))

    def train_step(state, batch, base_rng):
      step = state["step"]
      rng = jax.random.fold_in(base_rng, step)
      def loss_fn(params):
        return obj.loss(params, state["aux"], batch, rng, True)
      (loss, (mets, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
      aux = obj.after_step(params, aux, step)
      mets = {**mets, "update_norm": optax.tree.norm(updates), "lr": schedule(step)}
      return {"step": step + 1, "params": params, "opt_state": opt_state, "aux": aux}, mets

    def eval_step(params, aux, batch):
      return obj.eval_outputs(params, aux, batch)

    self.train_step = jax.jit(train_step, in_shardings=(self.state_sharding, data, repl),
                              out_shardings=(self.state_sharding, repl), donate_argnums=0)
    self.eval_step = jax.jit(eval_step, in_shardings=(self.state_sharding["params"], self.state_sharding["aux"], data))

  # -- data ---------------------------------------------------------------------------------------
  def train_iterator(self):
    c = self.config
    return data_pipeline.train_iter(self.sources["train"], self.train_fn, self.local_batch, int(c.seed),
                                    shard_index=jax.process_index(), shard_count=jax.process_count(),
                                    balance=bool(c.data.balance),
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
    c, wd = self.config, self.workdir
    is_main = jax.process_index() == 0
    wd.mkdir(parents=True, exist_ok=True)
    check_workdir(c, wd)
    if is_main:
      (wd / "config.json").write_text(config_lib.to_json(c))
    store = store_lib.CheckpointStore(wd, keep=int(c.keep_checkpoints), best_mode=self.best_mode)
    it = self.train_iterator()
    start = 0
    if store.latest_step() is not None:
      self.state, meta = store.restore(self.state)
      it.set_state(meta["data_iter"])
      start = int(self.state["step"])
      print(f"Resumed {wd} at step {start}.")
    logger = MetricsLogger(wd, c.stage, enabled=is_main)
    print(f"[{c.stage}] {self.init_source}; {partition.format_counts(self.counts)}")

    steps, log_every = int(c.steps), int(c.log_every)
    t_start, timed_steps, t_timed = time.time(), 0, 0.0
    best = None
    stop = min(steps, int(c.stop_after)) if c.stop_after else steps
    bar = progress(range(start, stop), desc=c.stage, enabled=bool(c.progress) and is_main, initial=start,
                   total=steps)
    mets = None
    for step in bar:
      batch = next(it)
      t0 = time.time()
      self.state, mets = self.train_step(self.state, global_batch(batch, self.mesh), self.base_rng)
      done = step + 1
      if done % log_every == 0 or done == stop:
        mets = jax.device_get(mets)
        dt = time.time() - t0
        if step > start:  # the first step includes compilation
          timed_steps += 1
          t_timed += dt
        self._check_finite(mets, done, store)
        ips = self.config.batch_size * timed_steps / t_timed if t_timed else float("nan")
        logger.log(done, "train", {k: float(v) for k, v in mets.items()}, images_per_sec=ips)
        bar.set_postfix(loss=f"{float(mets['loss']):.4f}", img_s=f"{ips:.0f}")
      elif step > start:
        jax.block_until_ready(self.state["step"])
        timed_steps += 1
        t_timed += time.time() - t0
      if c.eval_every and done % int(c.eval_every) == 0 and done != steps:
        best = self._eval_and_keep_best(done, logger, store, best)
      if c.checkpoint_every and done % int(c.checkpoint_every) == 0 and done != steps:
        self._check_finite(jax.device_get(mets), done, store)  # never checkpoint NaN parameters
        store.save(done, self.state, {"data_iter": it.get_state()})
    if stop < steps:  # a deliberate stop (stop_after): checkpoint and leave; rerun to resume
      if mets is not None:
        self._check_finite(jax.device_get(mets), stop, store)
      store.save(stop, self.state, {"data_iter": it.get_state()}, force=True)
      store.close()
      logger.close()
      print(f"Stopped at step {stop} of {steps} (stop_after); rerun the same command to resume.")
      return {"stage": c.stage, "stopped_at": stop}
    if mets is not None and jax.device_get(self.state["step"]) == steps:
      self._check_finite(jax.device_get(mets), steps, store)
      store.save(steps, self.state, {"data_iter": it.get_state()}, force=True)
    final = {}
    for split in c.eval_splits:
      if split in self.sources:
        final[split] = self.evaluate(split)
        logger.log(steps, split, final[split])
    if final:
      logger.log_images(steps, self, "val" if "val" in final else next(iter(final)))
    if "val" in final:
      best = self._keep_best(steps, final["val"], store, best)
    store.close()
    images_per_sec = float(c.batch_size) * timed_steps / t_timed if t_timed else None
    summary = {
        "stage": c.stage, "config": c.to_dict(), "steps": steps,
        "params": {k: self.counts[k] for k in ("total", "trainable", "target", "head", "backbone")},
        "init": self.init_source, "target_init": self.target_init,
        "final": final, "best": best,
        "images_per_sec": images_per_sec, "wall_time_s": time.time() - t_start,
        "devices": jax.device_count(), "platform": jax.devices()[0].platform,
    }
    if is_main:
      (wd / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    logger.close()
    return summary

  @property
  def best_metric(self) -> str:
    return self.config.best_metric or self.objective.default_metric

  @property
  def best_mode(self) -> str:
    return "min" if self.best_metric in LOWER_IS_BETTER else "max"

  def _eval_and_keep_best(self, step, logger, store, best):
    if "val" not in self.sources:
      return best
    res = self.evaluate("val")
    logger.log(step, "val", res)
    logger.log_images(step, self, "val")  # MAE reconstructions / segmentation overlays as TensorBoard images
    return self._keep_best(step, res, store, best)

  def _keep_best(self, step, res, store, best):
    if self.best_metric not in res or not math.isfinite(res[self.best_metric]):
      return best
    v = float(res[self.best_metric])
    better = best is None or (v < best["value"] if self.best_mode == "min" else v > best["value"])
    if better:
      store.save_best(step, {"params": self.state["params"], "aux": self.state["aux"]}, v,
                      {"metric": self.best_metric, "value": v, "step": step})
      best = {"step": step, "metric": self.best_metric, "value": v}
    return best

  def _check_finite(self, mets, step, store):
    loss = float(mets["loss"])
    if not math.isfinite(loss):
      store.wait()
      last = store.latest_step()
      raise TrainingError(
          f"The training loss became {loss} at step {step}. Lower optim.lr (now {self.config.optim.lr}), keep "
          f"optim.clip_norm > 0, or check the data normalisation (data.mean/std). "
          f"{'Checkpoint step %d in %s is kept; rerunning the same command resumes from it.' % (last, self.workdir / 'checkpoints') if last is not None else 'No checkpoint was written.'}")


def _json_default(o):
  if isinstance(o, (np.floating, np.integer)):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)


def train(config, workdir) -> dict:
  """Train (or resume) one stage in `workdir` and return its summary."""
  return Trainer(config, workdir).run()
