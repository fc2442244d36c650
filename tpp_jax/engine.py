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

import json
import math
import os
import pathlib
import signal
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from tpp_jax import config as config_lib
from tpp_jax import figures, partition
from tpp_jax import workdir as workdir_lib
from tpp_jax.build import (
  FINITE,
  build,
  build_data,
  build_encoder,
  build_sources,
  global_batch,
  steps_from_epochs,
  storage_dtypes,
)
from tpp_jax.checkpoints import load as load_lib
from tpp_jax.checkpoints import store as store_lib
from tpp_jax.data import pipeline as data_pipeline
from tpp_jax.jsonio import write_atomic
from tpp_jax.logging_utils import MetricsLogger, final_line, progress
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
# The run
# ------------------------------------------------------------------------------------------------

class Trainer:
  """Builds everything for one stage from a config; .run() trains (or resumes) and evaluates."""

  def __init__(self, config: mlc.ConfigDict, workdir: str | os.PathLike, devices=None, sources: dict | None = None):
    config = config_lib.validate(config)
    config = load_lib.resolve_pretext_head(config, build_encoder(config))  # pretext.head=auto -> train | frozen
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
    params, aux = jax.jit(self.built.init_fn)(rng)  # one compiled program, not op by op
    params, aux, self.init_source, self.target_init = load_lib.load_init(config, self.encoder, params, aux,
                                                                          self.labels)
    load_lib.forget_loaded()
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
    self.config_history, changes = workdir_lib.config_history(c, wd)
    for line in filter(None, (workdir_lib.describe_change(ch, wd) for ch in changes)):
      print(line)
    if is_main:  # whole or not at all: the other hosts of a multi-host run may be reading it (check_config)
      write_atomic(wd / "config.json", config_lib.to_json(c, self.config_history))
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
    head = "; pretext head frozen" if c.pretext.get("head") == "frozen" and self.stage.objective == "pretext" else ""
    print(f"[{c.stage}] {self.init_source}; {partition.format_counts(self.counts)}{head}")

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
    done, converged, last_val = start, self._converged(start, best), None
    for step in ([] if converged else bar):  # (converged already: an interrupted run stopped at its checkpoint)
      batch = next(it)
      self.state, mets = self.train_step(self.state, global_batch(batch, self.mesh), self.base_rng)
      done = step + 1
      self._unchecked.append((done, mets.pop(FINITE)))
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
        best, last_val = self._eval_and_keep_best(done, logger, store, best)
        window = None
        if self._converged(done, best):
          converged = True
          break
      if c.checkpoint_every and done % int(c.checkpoint_every) == 0 and done != steps:
        self._save(store, done, it)
        window = None
      if (signum := workdir_lib.stop_requested()) is not None and done < stop:
        self._save(store, done, it, force=True)
        store.close()
        logger.close()
        name = signal.Signals(signum).name
        raise Interrupted(f"{name}: stopped at step {done} of {steps} after saving checkpoint step {done} in "
                          f"{wd / 'checkpoints'}; rerun the same command to resume.", signum)
    if stop < steps and not converged:  # a deliberate stop (stop_after): checkpoint and leave; rerun to resume
      self._save(store, stop, it, force=True)
      store.close()
      logger.close()
      print(f"Stopped at step {stop} of {steps} (stop_after); rerun the same command to resume.")
      return {"stage": c.stage, "stopped_at": stop}
    end = done if converged else steps
    if converged:
      print(f"Converged at step {end} of {steps}: {int(c.patience)} evaluations without a new best "
            f"{self.best_metric} (best {best['value']:.4g} at step {best['step']}).", flush=True)
    if done > start:
      self._save(store, end, it, force=True)
    final = {}
    for split in c.eval_splits:
      if split in self.sources:
        if split == "val" and last_val is not None and last_val[0] == end:  # just evaluated and logged
          final[split] = last_val[1]
          continue
        final[split] = self.evaluate(split)
        logger.log(end, split, final[split])
    if final and not converged:
      split = "val" if "val" in final else next(iter(final))
      logger.log_images(end, split, lambda: figures.eval_images(self, split))
    if "val" in final:
      best = self._keep_best(end, final["val"], store, best)
    best_final = self._best_final(store, best, final, end)
    store.close()
    images_per_sec = float(c.batch_size) * timed_steps / t_timed if t_timed else None
    summary = {
        "stage": c.stage, "config": c.to_dict(), config_lib.HISTORY_KEY: self.config_history, "steps": steps,
        "converged_at": end if converged else None,  # patience: the step it stopped at (steps = the cap)
        "params": {k: self.counts[k] for k in ("total", "trainable", "target", "head", "backbone")},
        "init": self.init_source, "target_init": self.target_init,
        "final": final, "best": best, "best_final": best_final,
        "images_per_sec": images_per_sec, "wall_time_s": time.time() - t_start,
        "data": {"train_examples": len(self.sources["train"])},  # after max_train_examples / label_fraction
        "devices": jax.device_count(), "platform": jax.devices()[0].platform,
    }
    if is_main:
      write_atomic(wd / "summary.json", json.dumps(summary, indent=2, default=_json_default))
      if final:
        print(final_line(final), flush=True)
    logger.close(final)  # the hparams' metrics: the final evaluation
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
    """-> (best, (step, val metrics) or None)."""
    if "val" not in self.sources:
      return best, None
    res = self.evaluate("val")
    logger.log(step, "val", res)
    logger.log_images(step, "val", lambda: figures.eval_images(self, "val"))  # MAE reconstructions / overlays
    return self._keep_best(step, res, store, best), (step, res)

  def _converged(self, step: int, best) -> bool:
    """config.patience > 0: `patience` evaluations in a row, up to this one at `step`, kept no new best. Read from
    the best checkpoint's step alone, so a resumed run decides as the uninterrupted one did."""
    patience, every = int(self.config.get("patience", 0)), int(self.config.eval_every)
    if not patience or not every or best is None or not step or step % every:
      return False
    return (step - int(best["step"])) // every >= patience

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
    lower = f"a lower --config.optim.lr (now {float(self.config.optim.lr):g})"
    kept = (f"Nothing from it on was saved: the last checkpoint, step {last} in {self.workdir / 'checkpoints'}, holds "
            f"finite parameters within that norm; rerun the same command with {lower} to resume from it, or use a "
            "new --workdir." if last is not None else
            f"No checkpoint was written; rerun the same command with {lower}, or use a new --workdir.")
    bound = float(self.config.optim.get("max_param_norm", 0.0))
    raise TrainingError(
        f"Training diverged at step {bad}: NaN / Inf in the loss, gradients, update or parameters"
        f"{f', or the trainable parameters norm passed optim.max_param_norm={bound:g}' if bound > 0 else ''}; "
        f"training stopped. {kept} (Also: keep optim.clip_norm > 0; check data.mean/std.)")


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
      _, changes = workdir_lib.config_history(config, wd)
      changed = "; ".join(f"{ch['field']}={ch['new']} (it ran with {ch['old']}) changes nothing in a finished run, "
                          "use a new --workdir to train with it" for ch in changes if ch["field"] == "optim.lr")
      print(f"{wd} holds this run, finished ({done['steps']} steps); nothing to do (summary.json kept)"
            + (f"; {changed}." if changed else "."))
      return done
    return Trainer(config, wd, sources=sources)._loop()
