"""Stage `pipeline`: TPP vs plain PEFT, side by side, same seeds and budget.

For each seed s in (seed, seed+1, ..., seed+seeds-1), in DIR/seed_s/:
  tpp/               stage tpp: pretext (MAE / DINO) on the target params, backbone frozen, all training images
  tpp_finetune/      stage finetune starting from tpp/'s target params (target_init)
  baseline/          stage finetune from random target init (the usual PEFT)
  baseline_matched/  pipeline.compute_matched: the baseline trained pipeline.tpp_steps + steps steps
  linear/, full/     pipeline.brackets: linear probe and full fine-tune of the same backbone (the baseline's budget)
  frac_F/{tpp_finetune,baseline,baseline_matched}/   per pipeline.label_fractions entry F < 1: the fine-tune arms
                     on a stratified fraction F of the train split (drawn per (F, seed), the same for every arm)
With pipeline.controls_from=OTHER (another pipeline's workdir), the control arms (those that start from no TPP arm:
baseline, baseline_matched, linear, full) are not trained again: DIR/seed_S/NAME links to OTHER/seed_S/NAME, after
every field but the pretext's and the pipeline's is checked equal. They run after this pipeline's own arms; one
missing in OTHER is trained there (holding OTHER's lock), and while another process runs OTHER, this one waits.
Then DIR/report.md with tables, learning curves, MAE reconstructions / segmentation overlays, and with several
labelled fractions the label-efficiency table and label_efficiency.png.
Every sub-run is an ordinary workdir: an interrupted pipeline resumes where it stopped, a finished arm is not trained
again, and the figures are drawn from the arms' saved checkpoints (the same whether or not the run was interrupted).
"""
from __future__ import annotations

import copy
import json
import os
import pathlib
import signal
import time

import jax
import numpy as np

from tpp_jax import engine, figures, metrics, stages
from tpp_jax import workdir as workdir_lib
from tpp_jax.jsonio import write_atomic


def label_fractions(config) -> list[float]:
  """pipeline.label_fractions, each once, largest first (1.0, the full-label arms, runs first)."""
  fractions = config.pipeline.label_fractions
  fractions = (fractions,) if isinstance(fractions, (int, float)) else fractions
  return sorted({float(f) for f in fractions}, reverse=True)


def _field(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def arm_configs(config, seed: int, workdir: pathlib.Path) -> dict:
  """The configs of one seed, {folder under DIR/seed_S: config}, from the arms of stages.STAGES['pipeline'].

  An arm whose stage needs labels runs once per pipeline.label_fractions entry F, with data.label_fraction=F
  (F = 1: folder NAME, as without fractions; F < 1: frac_F/NAME); the others (the TPP arm) run once, on all
  training images. An arm with `only_if` runs when that field is true; `plus_steps` adds a field to its steps;
  `lr` names a field with its own optim.lr (the `full` bracket: pipeline.full_lr; 0 keeps optim.lr);
  `overrides` sets fields of its config (the `linear` bracket clears train_extra).
  """
  def derive(**kw):
    c = copy.deepcopy(config)
    with c.unlocked():
      c.seed = seed
      c.seeds = 1
      for k, v in kw.items():
        c[k] = v
    return c
  p = config.pipeline
  entry = stages.STAGES.get(config.stage)
  arms = [a for a in (entry.arms if entry is not None and entry.arms else stages.STAGES["pipeline"].arms)
          if not a.only_if or bool(_field(config, a.only_if))]
  labelled = {a.name: stages.get(a.stage).needs_labels for a in arms}
  out = {}
  for i, fraction in enumerate(label_fractions(config)):
    frac = stages.fraction_dir(fraction)
    for arm in arms:
      if not labelled[arm.name] and i:
        continue  # an unlabelled arm (TPP) runs once per seed, on all training images
      name = f"{frac}/{arm.name}" if frac and labelled[arm.name] else arm.name
      target_init = ""
      if arm.target_from:
        src = f"{frac}/{arm.target_from}" if frac and labelled.get(arm.target_from) else arm.target_from
        target_init = str(workdir / f"seed_{seed}" / src)
      if stages.get(arm.stage).objective == "pretext":  # the pretext arm runs on the pipeline's TPP budget
        c = derive(stage=arm.stage, steps=int(p.tpp_steps), epochs=0, batch_size=int(p.tpp_batch_size),
                   target_init=target_init, eval_splits=("val",), best_metric="")
        with c.unlocked():
          c.optim.lr = float(p.tpp_lr)
          c.eval_every = 0
          c.patience = 0  # the TPP budget is pipeline.tpp_steps
      else:
        c = derive(stage=arm.stage, target_init=target_init)
      converged = p.get("budget", "fixed") == "converged" and labelled[arm.name]
      with c.unlocked():
        c.data.label_fraction = fraction if labelled[arm.name] else 1.0
        if converged and not arm.plus_steps:
          c.patience = int(p.patience)  # stops at convergence, `steps` is its cap
        if arm.plus_steps:
          own = int(c.steps)
          if converged:  # the compute-matched control: TPP's steps + the steps the TPP fine-tune trained
            own = finetune_steps(workdir / f"seed_{seed}" / (f"{frac}/tpp_finetune" if frac else "tpp_finetune"))
            own = int(c.steps) if own is None else own
          c.steps = own + int(_field(config, arm.plus_steps))
        if arm.lr and float(_field(config, arm.lr)):
          c.optim.lr = float(_field(config, arm.lr))
        for dotted, value in arm.overrides:
          *parents, leaf = dotted.split(".")
          node = c
          for part in parents:
            node = node[part]
          node[leaf] = value
      out[name] = c
  return out


def finetune_steps(run: pathlib.Path) -> int | None:
  """The steps a finished arm trained (its convergence step under patience), None before it finished."""
  path = run / "summary.json"
  if not path.exists():
    return None
  summary = json.loads(path.read_text())
  return int(summary.get("converged_at") or summary["steps"])


def waits_for_finetune(config, arm: str) -> bool:
  """A converged budget's compute-matched arm: its steps are known once the TPP fine-tune has finished."""
  return config.pipeline.get("budget", "fixed") == "converged" and arm.split("/")[-1] == "baseline_matched"


def is_control(arm_config) -> bool:
  """Whether an arm starts from no TPP arm (baseline, baseline_matched, linear, full): its run does not depend on
  the pipeline's pretext, so pipelines that differ only there can share it (pipeline.controls_from)."""
  return stages.get(arm_config.stage).objective != "pretext" and not arm_config.target_init


# Fields two shared control arms may differ in: how the run is shown and saved, not what it computes.
_SHARE_MAY_DIFFER = ("progress", "stop_after", "checkpoint_every", "log_every", "keep_checkpoints", "eval_batch_size",
                     "data.cache", "data.prefetch", "seeds")


def controls_source(config, wd: pathlib.Path) -> pathlib.Path | None:
  """The workdir named by pipeline.controls_from (absolute), or None when it is unset."""
  src = str(config.pipeline.get("controls_from", "") or "")
  if not src:
    return None
  path = pathlib.Path(src).absolute()
  if path.resolve() == wd.resolve():
    raise engine.ConfigError(f"pipeline.controls_from={src} is this pipeline's own --workdir; name another "
                             "pipeline's workdir (whose baselines this one shares) or leave it empty.")
  return path


def shared_control_config(cfg, source: pathlib.Path, seed: int, arm: str):
  """The config of control arm `arm` as pipeline `source` runs it: `cfg` with the source's pretext and pipeline
  sections, checked equal, field by field, to the arm the source pipeline derives (one ConfigError naming the
  differing fields). Raises FileNotFoundError while `source` holds no pipeline config yet."""
  import ml_collections as mlc

  from tpp_jax import config as config_lib
  from tpp_jax.jsonio import read_json
  from tpp_jax.tree import flatten
  saved = source / "config.json"
  if not saved.exists():
    raise FileNotFoundError(saved)
  src_config = mlc.ConfigDict(config_lib.with_defaults(read_json(saved)))
  if src_config.get("stage") != "pipeline":
    raise engine.ConfigError(f"pipeline.controls_from={source} is a {src_config.get('stage')!r} run, not a pipeline "
                             "workdir; name the --workdir of a stage=pipeline run.")
  if arm not in arm_configs(src_config, seed, source) and (source / f"seed_{seed}" / arm / "config.json").exists():
    with src_config.unlocked():  # an arm it ran before a rerun left it out (these fields only select the arms)
      for f in ("compute_matched", "brackets", "label_fractions"):
        src_config.pipeline[f] = copy.deepcopy(cfg.pipeline[f])
  theirs = arm_configs(src_config, seed, source).get(arm)
  if theirs is None:
    raise engine.ConfigError(f"pipeline.controls_from={source} does not run arm {arm!r} (its pipeline.compute_matched"
                             f" / brackets / label_fractions differ); set the same there, or leave it empty.")
  ours = copy.deepcopy(cfg)
  with ours.unlocked():
    ours.pretext = copy.deepcopy(src_config.pretext)
    ours.pipeline = copy.deepcopy(src_config.pipeline)
  a, b = (flatten(json.loads(config_lib.to_json(c)), sep=".") for c in (ours, theirs))
  diff = sorted(k for k in set(a) | set(b) if k not in _SHARE_MAY_DIFFER and a.get(k) != b.get(k))
  if diff:
    raise engine.ConfigError(f"pipeline.controls_from={source}: its arm {arm} differs from this pipeline's in fields "
                             f"{diff}; shared arms may differ only in pretext.* and pipeline.*. Use the same values, "
                             "or leave pipeline.controls_from empty to train this pipeline's own.")
  return ours


def _link(link: pathlib.Path, target: pathlib.Path):
  """DIR/seed_S/NAME -> OTHER/seed_S/NAME (a relative symlink); a folder of this pipeline's own is never replaced."""
  if link.is_symlink():
    if link.resolve() == target.resolve():
      return
    link.unlink()
  elif link.exists():
    raise engine.ConfigError(f"{link} holds this pipeline's own run; pipeline.controls_from would hide it. Leave "
                             "pipeline.controls_from empty for this workdir, or use a new --workdir.")
  link.parent.mkdir(parents=True, exist_ok=True)
  os.symlink(os.path.relpath(target, link.parent), link)


def _busy(source: pathlib.Path) -> bool:
  """Whether another process holds the lock of the existing folder `source`."""
  if not source.is_dir():
    return False
  try:
    with workdir_lib.lock(source):
      return False
  except workdir_lib.WorkdirBusy:
    return True


def _no_pipeline(source: pathlib.Path) -> Exception:
  return engine.ConfigError(f"pipeline.controls_from={source} holds no pipeline (no config.json); run that pipeline "
                            "first, or leave pipeline.controls_from empty.")


def run_shared_control(cfg, wd: pathlib.Path, source: pathlib.Path, seed: int, arm: str, poll_s: float = 20.0) -> dict:
  """Train (or find finished) control arm `arm` of seed `seed` in pipeline `source` and link it into `wd`."""
  target = source / f"seed_{seed}" / arm
  waited = False

  def wait():
    nonlocal waited
    if not waited:
      print(f"waiting for {source} (another process runs it) to finish seed_{seed}/{arm}", flush=True)
      waited = True
    time.sleep(poll_s)

  while True:
    if (signum := workdir_lib.stop_requested()) is not None:
      raise engine.Interrupted(f"{signal.Signals(signum).name}: stopped while waiting for {target}; every finished "
                               "arm is saved; rerun the same command to resume.", signum)
    try:
      shared = shared_control_config(cfg, source, seed, arm)
    except FileNotFoundError:  # no pipeline there yet: one is starting up (it holds the lock), or none exists
      if _busy(source):
        wait()
        continue
      raise _no_pipeline(source) from None
    workdir_lib.check_config(shared, target)
    summary = workdir_lib.finished_summary(shared, target)
    if summary is not None:
      print(f"{target} holds this run, finished ({summary['steps']} steps); shared, not trained again.", flush=True)
      break
    try:  # not there yet: train it in the source pipeline, holding that pipeline's lock
      with workdir_lib.lock(source):
        summary = engine.train(shared, target)
      break
    except workdir_lib.WorkdirBusy:  # the source pipeline runs now: it trains this arm itself
      wait()
  if "stopped_at" not in summary:
    _link(wd / f"seed_{seed}" / arm, target)
  return summary


def run(config, workdir) -> dict:
  wd = pathlib.Path(workdir).absolute()
  if config.peft.type == "none":
    raise engine.ConfigError("stage 'pipeline' compares TPP and plain PEFT: set peft.type (e.g. lora).")
  is_main = jax.process_index() == 0
  source = controls_source(config, wd)
  with workdir_lib.lock(wd, enabled=is_main), workdir_lib.stop_signals():
    workdir_lib.check_config(config, wd)
    if source is not None and not (source / "config.json").exists() and not _busy(source):
      raise _no_pipeline(source)
    seeds = [int(config.seed) + i for i in range(int(config.seeds))]
    for seed in seeds:  # every arm that exists must accept its config before anything is written
      for arm, cfg in arm_configs(config, seed, wd).items():
        if int(cfg.get("epochs", 0)) or waits_for_finetune(config, arm):  # (steps known later: checked then)
          continue
        if source is None or not is_control(cfg):
          workdir_lib.check_config(cfg, wd / f"seed_{seed}" / arm)
        elif (source / "config.json").exists():  # (a source still starting up is checked when its arm runs)
          workdir_lib.check_config(shared_control_config(cfg, source, seed, arm), source / f"seed_{seed}" / arm)
    from tpp_jax import config as config_lib
    if is_main:
      write_atomic(wd / "config.json", config_lib.to_json(config))
    summaries = {}
    # this pipeline's own arms seed by seed, then the shared controls (by then the source has most of them)
    todo = [(seed, arm, cfg) for seed in seeds for arm, cfg in arm_configs(config, seed, wd).items()]
    shared = {(seed, arm) for seed, arm, cfg in todo if source is not None and is_control(cfg)}
    for seed, arm, cfg in sorted(todo, key=lambda t: (t[:2] in shared)):  # (a stable sort: the order kept otherwise)
      if (signum := workdir_lib.stop_requested()) is not None:
        raise engine.Interrupted(f"{signal.Signals(signum).name}: stopped before seed {seed}: {arm}; every "
                                 "finished arm is saved; rerun the same command to resume.", signum)
      if (seed, arm) in shared:
        print(f"== seed {seed}: {arm} (shared with {source}) ==", flush=True)
        summaries[(seed, arm)] = run_shared_control(cfg, wd, source, seed, arm)
      else:
        print(f"== seed {seed}: {arm} ==", flush=True)
        if waits_for_finetune(config, arm):  # the TPP fine-tune has finished by now: its steps are known
          cfg = arm_configs(config, seed, wd)[arm]
        summaries[(seed, arm)] = engine.train(cfg, wd / f"seed_{seed}" / arm)
      if "stopped_at" in summaries[(seed, arm)]:  # stop_after: the arm checkpointed; the rest waits for a rerun
        print(f"Pipeline stopped in seed {seed}: {arm} (stop_after); rerun the same command to resume.")
        return {"report": None, "stopped_at": f"seed_{seed}/{arm}"}
    if not all(figures.readable_png(wd / f) for f in figures.pipeline_figure_files(config)):  # missing / torn: redraw
      figures.draw_pipeline_figures(config, wd, seeds[0], label_fractions(config)[0])
    path = None
    if config.pipeline.report:
      from tpp_jax import report
      path = report.write_report(wd)
      print(f"Report: {path}")
  print(comparison_table(summaries, config.task.type))
  return {"report": str(path) if path else None,
          "runs": {f"seed_{s}/{a}": v.get("final") for (s, a), v in summaries.items()}}


def comparison_table(summaries: dict, task: str) -> str:
  """A plain-text test-metric table of the fine-tune arms per labelled fraction (mean ± std over seeds).

  Args:
    summaries: {(seed, folder under seed_S): summary} ('tpp_finetune', 'frac_0.05/baseline', ...).
  """
  keys = metrics.TASK_METRICS[task]
  rows: dict = {}
  for (_, name), s in summaries.items():
    arm, frac = name.rsplit("/", 1)[-1], float(s.get("config", {}).get("data", {}).get("label_fraction", 1.0))
    if stages.get(s.get("stage", "finetune")).objective != "pretext":
      rows.setdefault((-frac, arm), []).append(s)
  def fmt(v):
    v = np.asarray(v, float)
    return f"{v.mean():.4f} ± {v.std(ddof=1):.4f}" if len(v) > 1 else f"{v.mean():.4f}"
  multi = len({f for f, _ in rows}) > 1
  order = {"baseline": 0, "baseline_matched": 1, "tpp_finetune": 2}
  ranked = sorted(rows.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 3), kv[0][1]))
  labelled = [(f"{arm} ({100 * -neg:g}% labels)" if multi else arm, group) for (neg, arm), group in ranked]
  width = max([14] + [len(label) for label, _ in labelled])
  stopped = any(s.get("converged_at") is not None or int(s.get("config", {}).get("patience", 0) or 0)
                for _, group in labelled for s in group)
  lines = [f"{'arm':{width}s} " + " ".join(f"{k:>18s}" for k in keys) + ("  steps (each seed)" if stopped else "")]
  for label, group in labelled:
    vals = {k: [s["final"].get("test", {}).get(k, np.nan) for s in group] for k in keys}
    trained = " ".join(str(s.get("converged_at") or s.get("steps")) for s in group)
    lines.append(f"{label:{width}s} " + " ".join(f"{fmt(vals[k]):>18s}" for k in keys)
                 + (f"  {trained}" if stopped else ""))
  return "\n".join(lines)


def print_json(obj):
  print(json.dumps(obj, indent=2, default=str))
