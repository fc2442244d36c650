"""Comparison report of TPP vs plain PEFT runs: Markdown tables, learning curves and figures.

  python -m tpp_jax.report RUN_DIR [RUN_DIR ...]

Finds every run folder (one with summary.json) under the given folders and writes RUN_DIR/report.md
(the first folder) with the test / val metric tables (mean ± std over seeds and the paired
TPP − baseline (and TPP − baseline_matched) difference with its 95% CI, paired t-test p and verdict; also in
comparison.json) of the final step and of the checkpoint selected by validation (summary.json `best_final`, with
the steps trained and the best step per arm), the `linear` / `full` bracket arms beside them, learning_curves.png,
with fine-tune runs on part of the labels (data.label_fraction < 1) the label-efficiency table and
label_efficiency.png, the pipeline's own figures when present (mae_reconstructions.png, segmentation_overlays.png),
parameter counts, wall time and images/s.
Only numpy and matplotlib (Agg canvas, no pyplot) are needed (statistics: tpp_jax.stats): no JAX or scipy import.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import re
from typing import Iterable, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tpp_jax import stages, stats
from tpp_jax.logging_utils import read_json, read_jsonl
from tpp_jax.metrics import MAIN_METRIC, TASK_METRICS

PRETEXT_STAGES = ("pretrain", "tpp")
ARM_ORDER = ("tpp_finetune", "baseline", "baseline_matched", "linear", "full", "tpp")
BASELINES = ("baseline", "baseline_matched")  # roles TPP → fine-tune is compared with (same seed and fraction)
BRACKETS = ("linear", "full")  # pipeline.brackets: linear probe and full fine-tune of the same backbone (no test)
SOURCES = {"final": "final step", "best_final": "selected by validation (best step)"}  # summary.json metric blocks
FIGURES = (("mae_reconstructions.png", "MAE reconstructions (TPP arm)",
            "Validation images: masked input / reconstruction by the TPP-trained target parameters / original."),
           ("segmentation_overlays.png", "Segmentation overlays (TPP arm)",
            "Ground truth (left, green) and prediction (right, red; ground-truth contour in green) over the input "
            "image."))


class NoRunsError(ValueError):
  """A folder given to the report holds no run folder (no summary.json beneath it)."""


# ----------------------------------------------------------------------------------------------
# Collecting runs.


def _get(cfg: dict, dotted: str, default=None):
  """cfg['a']['b'] for 'a.b', or default."""
  node = cfg
  for part in dotted.split("."):
    if not isinstance(node, dict) or part not in node:
      return default
    node = node[part]
  return node


def _seed_of(path: pathlib.Path, cfg: dict) -> int | None:
  seed = _get(cfg, "seed")
  if seed is not None:
    return int(seed)
  for part in reversed(path.parts):
    m = re.fullmatch(r"seed_(\d+)", part)
    if m:
      return int(m.group(1))
  return None


def _role(arm: str, stage: str, has_target_init: bool) -> str:
  """What a run is in the comparison: tpp | tpp_finetune | baseline | baseline_matched | linear | full | other."""
  if arm in ARM_ORDER:
    return arm
  if stage == "tpp":
    return "tpp"
  if stage == "finetune":
    return "tpp_finetune" if has_target_init else "baseline"
  return "other"


def _peft_of(stage: str, cfg: dict) -> str:
  """peft.type of a run; 'none' for a stage built without PEFT parameters (linear, full, pretrain)."""
  entry = stages.STAGES.get(stage)
  return "none" if entry is not None and entry.trains and not entry.peft else str(_get(cfg, "peft.type", "none"))


def _record(run: pathlib.Path) -> dict:
  summary = read_json(run / "summary.json")
  cfg_path = run / "config.json"
  cfg = read_json(cfg_path) if cfg_path.exists() else (summary.get("config") or {})
  stage = str(summary.get("stage") or _get(cfg, "stage", ""))
  target_init = summary.get("target_init")
  has_ti = bool(target_init) or bool(_get(cfg, "target_init", ""))
  arm = run.name
  fraction = float(_get(cfg, "data.label_fraction", 1.0) or 1.0) if stage not in PRETEXT_STAGES else 1.0
  return {
      "path": str(run), "arm": arm, "role": _role(arm, stage, has_ti),
      "seed": _seed_of(run, cfg), "stage": stage, "fraction": fraction,
      "train_examples": (summary.get("data") or {}).get("train_examples"),
      "peft": _peft_of(stage, cfg), "task": str(_get(cfg, "task.type", "classification")),
      "pretext": str(_get(cfg, "pretext.type", "")), "config": cfg,
      "final": summary.get("final") or {}, "best": summary.get("best"), "best_final": summary.get("best_final") or {},
      "params": summary.get("params") or {}, "steps": summary.get("steps", _get(cfg, "steps")),
      "init": summary.get("init"), "target_init": target_init,
      "images_per_sec": summary.get("images_per_sec"), "wall_time_s": summary.get("wall_time_s"),
      "rows": read_jsonl(run / "metrics.jsonl"),
  }


def _arm_rank(arm: str) -> tuple:
  return (ARM_ORDER.index(arm) if arm in ARM_ORDER else len(ARM_ORDER), arm)


def collect(run_dirs: Iterable) -> list[dict]:
  """Records of every run folder (with summary.json) under `run_dirs`, searched recursively.

  Args:
    run_dirs: folders (a pipeline folder, run folders, or parents of them).

  Returns:
    One dict per run: path, arm (folder name: tpp_finetune / baseline / baseline_matched / linear / full / tpp /
    other), role,
    seed, stage, fraction (data.label_fraction: the labelled fraction of the train split, 1.0 for pretext runs),
    train_examples (summary.json data.train_examples, None before it was recorded), peft, task, pretext, config,
    final ({split: metrics}), best ({step, metric, value} or None), best_final ({split: metrics} of the best
    checkpoint; {} when none was kept or the summary predates it), params, steps, init, target_init,
    images_per_sec, wall_time_s and rows (metrics.jsonl). Sorted by arm then seed; a run reached twice is listed once.
  """
  if isinstance(run_dirs, (str, os.PathLike)):
    run_dirs = [run_dirs]
  seen, records = set(), []
  for d in run_dirs:
    d = pathlib.Path(d)
    if not d.exists():
      raise FileNotFoundError(f"{d} does not exist.")
    found = [d / "summary.json"] if (d / "summary.json").exists() else []
    found += sorted(pathlib.Path(root) / "summary.json" for root, _, files in os.walk(d, followlinks=True)
                    if "summary.json" in files and pathlib.Path(root) != d)  # (links: pipeline.controls_from)
    for s in found:
      run = s.parent.resolve()
      if run not in seen:
        seen.add(run)
        records.append(_record(run))
  records.sort(key=lambda r: (-r["fraction"], _arm_rank(r["arm"]), r["peft"], -1 if r["seed"] is None else r["seed"],
                              r["path"]))
  return records


# ----------------------------------------------------------------------------------------------
# Tables.


def _finite(values) -> np.ndarray:
  a = np.asarray([np.nan if v is None else float(v) for v in values], float)
  return a[np.isfinite(a)]


def _mean_std(values) -> str:
  """'mean ± std' (ddof=1), '± n/a' for one value, 'n/a' for none."""
  a = _finite(values)
  if a.size == 0:
    return "n/a"
  if a.size == 1:
    return f"{a[0]:.4f} ± n/a"
  return f"{a.mean():.4f} ± {a.std(ddof=1):.4f}"


def _count(values) -> str:
  vals = sorted({int(v) for v in values if v is not None})
  if not vals:
    return "n/a"
  return f"{vals[0]:,}" if len(vals) == 1 else f"{vals[0]:,}–{vals[-1]:,}"


def _mean_fmt(values, fmt: str = "{:.1f}") -> str:
  a = _finite(values)
  return fmt.format(a.mean()) if a.size else "n/a"


def _groups(records: Sequence[dict]) -> dict:
  """{(arm, peft, task, fraction): [records]} in report order (largest labelled fraction first)."""
  out: dict = {}
  for r in sorted(records, key=lambda r: (-r["fraction"], _arm_rank(r["arm"]), r["peft"], r["task"])):
    out.setdefault((r["arm"], r["peft"], r["task"], r["fraction"]), []).append(r)
  return out


def _multi_fraction(records: Sequence[dict]) -> bool:
  """Some run trained on part of the labels: the tables get a `labels` column."""
  return any(r["fraction"] != 1.0 for r in records)


def _frac_cell(fraction: float) -> str:
  return f"{100 * fraction:.6g}%"


def _metric_keys(records: Sequence[dict]) -> list[str]:
  keys: list[str] = []
  for task in TASK_METRICS:
    if any(r["task"] == task for r in records):
      keys += TASK_METRICS[task]
  return keys


def _has_task_metrics(r: dict, split: str, source: str = "final") -> bool:
  return r["stage"] not in PRETEXT_STAGES and any(k in r[source].get(split, {}) for k in TASK_METRICS[r["task"]])


def _best_step(r: dict):
  """The step of the checkpoint selected by validation (summary.json best.step), None when none was kept."""
  return (r["best"] or {}).get("step")


def _steps_cell(values) -> str:
  """Mean of step counts: '150', or '133.3 (100–200)' when they differ; 'n/a' for none."""
  a = _finite(values)
  if a.size == 0:
    return "n/a"
  if a.min() == a.max():
    return f"{a[0]:,.0f}"
  return f"{a.mean():,.1f} ({a.min():,.0f}–{a.max():,.0f})"


def _per_seed(group: Sequence[dict], split: str, key: str, source: str = "final") -> dict:
  """{seed: mean value of that seed's runs} (finite values only) of the `source` metrics (final / best_final)."""
  vals: dict = {}
  for r in group:
    v = r[source].get(split, {}).get(key)
    if v is not None and math.isfinite(float(v)):
      vals.setdefault(r["seed"], []).append(float(v))
  return {s: float(np.mean(v)) for s, v in vals.items()}


def paired_differences(records: Sequence[dict], split: str = "test", source: str = "final") -> list[dict]:
  """Per-seed TPP − baseline (and TPP − baseline_matched) differences, per PEFT type, task and labelled fraction.

  Args:
    records: from `collect`.
    split: 'test' or 'val'.
    source: 'final' (the last step) or 'best_final' (the checkpoint selected by validation).

  Returns:
    A list of {"label", "peft", "task", "fraction", "train_examples", "tpp", "baseline", "seeds",
    "diffs": {metric: np.ndarray}, "values": {metric: (seeds, tpp values, baseline values)}, "best_steps":
    {arm: {seed: mean best step}}} with one entry per (TPP-initialised arm, baseline / baseline_matched arm) pair
    of the same PEFT type, task and fraction; per metric, the seeds present in both arms. train_examples: the
    sorted training-set sizes of the pair's runs.
  """
  runs = [r for r in records if _has_task_metrics(r, split, source)]
  groups = _groups(runs)
  out = []
  for (t_arm, peft, task, frac), t_runs in groups.items():
    if t_runs[0]["role"] != "tpp_finetune":
      continue
    for (b_arm, b_peft, b_task, b_frac), b_runs in groups.items():
      if b_runs[0]["role"] not in BASELINES or (b_peft, b_task, b_frac) != (peft, task, frac):
        continue
      diffs, values, seeds = {}, {}, set()
      for k in TASK_METRICS[task]:
        a, b = _per_seed(t_runs, split, k, source), _per_seed(b_runs, split, k, source)
        common = sorted(set(a) & set(b), key=lambda s: (s is None, s or 0))
        diffs[k] = np.asarray([a[s] - b[s] for s in common], float)
        values[k] = (common, np.asarray([a[s] for s in common], float), np.asarray([b[s] for s in common], float))
        seeds |= set(common)
      label = (f"TPP − {b_arm}" if t_arm == "tpp_finetune" and b_arm in BASELINES else f"{t_arm} − {b_arm}")
      sizes = sorted({int(r["train_examples"]) for r in t_runs + b_runs if r["train_examples"] is not None})
      best_steps = {arm: {s: float(np.mean(v)) for s, v in _by_seed(rs, _best_step).items()}
                    for arm, rs in ((t_arm, t_runs), (b_arm, b_runs))}
      out.append({"label": label, "peft": peft, "task": task, "fraction": frac, "train_examples": sizes,
                  "tpp": t_arm, "baseline": b_arm, "seeds": sorted(seeds, key=lambda s: (s is None, s or 0)),
                  "diffs": diffs, "values": values, "best_steps": best_steps})
  return out


def _by_seed(group: Sequence[dict], value) -> dict:
  """{seed: [value(r) of that seed's runs]}, Nones left out."""
  out: dict = {}
  for r in group:
    v = value(r)
    if v is not None:
      out.setdefault(r["seed"], []).append(float(v))
  return out


def _diff_cell(d: np.ndarray) -> str:
  if d.size == 0:
    return "n/a"
  if d.size == 1:
    return f"{d[0]:+.4f} ± n/a"
  return f"{d.mean():+.4f} ± {d.std(ddof=1):.4f}"


def _at_best_header(runs: Sequence[dict]) -> str:
  return " / ".join(dict.fromkeys(MAIN_METRIC[r["task"]] for r in runs)) + " @ best step"


def metric_table(records: Sequence[dict], split: str = "test", source: str = "final") -> str:
  """Markdown table of the task metrics per arm (mean ± std over seeds) and TPP − baseline.

  Args:
    records: from `collect`; pretext-only runs (stage tpp / pretrain) are left out.
    split: 'test' or 'val'.
    source: 'final' (summary.json `final`: the last step) or 'best_final' (the checkpoint selected by validation).

  Returns:
    The table: one row per (arm, PEFT type), n seeds, each metric as `mean ± std` (ddof=1; `± n/a`
    for one seed), the steps trained and the best (validation-selected) step (means over seeds); with
    source='final' also the main metric (auc / dice) of the best step, trainable / target parameters, images/s and
    wall time (means); then one difference row per TPP / baseline pair, mean ± std of the per-seed paired
    differences.
  """
  runs = [r for r in records if _has_task_metrics(r, split, source)]
  if not runs:
    return f"_No runs with {split} task metrics{'' if source == 'final' else ' ' + SOURCES[source]}._"
  keys = _metric_keys(runs)
  multi_task = len({r["task"] for r in runs}) > 1
  multi_frac = _multi_fraction(runs)
  final = source == "final"
  extra = ["steps", "best step"] + ([_at_best_header(runs), "trainable params", "target params", "images/s",
                                     "wall time (s)"] if final else [])
  head = ["arm", "peft"] + (["task"] if multi_task else []) + (["labels"] if multi_frac else []) + ["n"] + keys + extra
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * (len(head) - len(keys) - len(extra)) + [
      "---:"] * (len(keys) + len(extra))) + "|"]
  for (arm, peft, task, frac), group in _groups(runs).items():
    cells = [f"`{arm}`", peft] + ([task] if multi_task else []) + ([_frac_cell(frac)] if multi_frac else []) + [
        str(len(group))]
    for k in keys:
      cells.append(_mean_std([r[source].get(split, {}).get(k) for r in group]) if k in TASK_METRICS[task] else "")
    cells += [_steps_cell(r["steps"] for r in group), _steps_cell(_best_step(r) for r in group)]
    if final:
      cells += [_mean_std([r["best_final"].get(split, {}).get(MAIN_METRIC[task]) for r in group]),
                _count(r["params"].get("trainable") for r in group), _count(r["params"].get("target") for r in group),
                _mean_fmt(r["images_per_sec"] for r in group), _mean_fmt(r["wall_time_s"] for r in group)]
    lines.append("| " + " | ".join(cells) + " |")
  best = {(d["label"], d["peft"], d["task"], d["fraction"]): d for d in paired_differences(runs, split, "best_final")}
  for d in paired_differences(runs, split, source):
    cells = [f"**{d['label']}**", d["peft"]] + ([d["task"]] if multi_task else []) + (
        [_frac_cell(d["fraction"])] if multi_frac else []) + [str(len(d["seeds"]))]
    for k in keys:
      cells.append(f"**{_diff_cell(d['diffs'][k])}**" if k in d["diffs"] else "")
    cells += ["", ""]
    if final:
      b = best.get((d["label"], d["peft"], d["task"], d["fraction"]))
      cells += [f"**{_diff_cell(b['diffs'][MAIN_METRIC[d['task']]])}**" if b else ""] + [""] * 4
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _higher_is_better(metric: str) -> bool:
  return "loss" not in metric  # losses: lower is better; every task metric: higher is better


def paired_comparisons(records: Sequence[dict], split: str = "test", level: float = 0.95,
                       source: str = "final") -> list[dict]:
  """Paired t-test of every metric of every TPP / baseline pair (same seeds), from `stats.paired_comparison`.

  Args:
    source: 'final' (the last step) or 'best_final' (the checkpoint selected by validation).

  Returns:
    One dict per (pair, metric): comparison (label), tpp, baseline (arms), peft, task, fraction (labelled fraction
    of the train split), train_examples (the runs' training-set sizes), split, checkpoint ('final' / 'best'),
    metric, seeds, tpp_values, baseline_values, diffs, (source 'best_final': tpp_best_steps, baseline_best_steps per
    seed, None where a run kept no best), and paired_comparison's mean_diff, ci_low, ci_high, p, n, verdict, test,
    level, higher_is_better, note. NaN (n < 2) is written as None so the list is valid JSON.
  """
  out = []
  for d in paired_differences(records, split, source):
    for k in TASK_METRICS[d["task"]]:
      seeds, a, b = d["values"][k]
      r = stats.paired_comparison(a, b, level=level, higher_is_better=_higher_is_better(k))
      r = {k2: (None if isinstance(v, float) and math.isnan(v) else v) for k2, v in r.items()}
      steps = {} if source == "final" else {
          f"{role}_best_steps": [d["best_steps"][d[role]].get(s) for s in seeds] for role in ("tpp", "baseline")}
      out.append({"comparison": d["label"], "tpp": d["tpp"], "baseline": d["baseline"], "peft": d["peft"],
                  "task": d["task"], "fraction": d["fraction"], "train_examples": d["train_examples"], "split": split,
                  "checkpoint": "final" if source == "final" else "best", "metric": k, "seeds": list(seeds),
                  "tpp_values": a.tolist(), "baseline_values": b.tolist(), "diffs": (a - b).tolist(), **steps, **r})
  return out


def _json_safe(obj):
  """NaN floats -> None, recursively (valid JSON)."""
  if isinstance(obj, float) and math.isnan(obj):
    return None
  if isinstance(obj, dict):
    return {k: _json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_json_safe(v) for v in obj]
  return obj


def _seed_key(s):
  return (s is None, s or 0)


def label_efficiency(records: Sequence[dict], split: str = "test", level: float = 0.95) -> list[dict]:
  """The main metric (auc / dice) per labelled fraction: both arms and their paired comparison.

  Returns:
    One dict per (TPP / baseline or baseline_matched pair, labelled fraction), largest fraction first: fraction,
    train_examples, peft, task, split, metric, comparison, tpp, baseline, arms ({arm: seeds, values and
    stats.mean_ci's mean, std, ci_low, ci_high, n over that arm's seeds}), seeds, tpp_values, baseline_values and
    paired_comparison's mean_diff, ci_low, ci_high, p, n, verdict, ... over the seeds in both arms. NaN -> None.
  """
  runs = [r for r in records if _has_task_metrics(r, split)]
  groups = _groups(runs)
  out = []
  for d in paired_differences(runs, split):
    k = MAIN_METRIC[d["task"]]
    seeds, a, b = d["values"][k]
    arms = {}
    for arm in (d["tpp"], d["baseline"]):
      vals = _per_seed(groups[(arm, d["peft"], d["task"], d["fraction"])], split, k)
      order = sorted(vals, key=_seed_key)
      arms[arm] = {"seeds": order, "values": [vals[s] for s in order], **stats.mean_ci([vals[s] for s in order], level)}
    r = stats.paired_comparison(a, b, level=level, higher_is_better=_higher_is_better(k))
    out.append(_json_safe({"fraction": d["fraction"], "train_examples": d["train_examples"], "peft": d["peft"],
                           "task": d["task"], "split": split, "metric": k, "comparison": d["label"], "tpp": d["tpp"],
                           "baseline": d["baseline"], "arms": arms, "seeds": list(seeds), "tpp_values": a.tolist(),
                           "baseline_values": b.tolist(), **r}))
  return out


def label_efficiency_table(records: Sequence[dict], split: str = "test", level: float = 0.95) -> str:
  """Markdown table of `label_efficiency`: per labelled fraction and comparison, the training-set size, n, each
  arm's main metric (mean ± std over seeds), the paired difference, its t-based CI, p and the verdict. Empty
  string when there is no TPP / baseline pair."""
  rows = label_efficiency(records, split, level)
  if not rows:
    return ""
  multi = len({(r["peft"], r["task"]) for r in rows}) > 1
  metrics = sorted({r["metric"] for r in rows})
  head = (["peft", "task"] if multi else []) + [
      "labels", "train examples", "comparison", "n", "`tpp_finetune`", "compared arm", "TPP − baseline",
      f"{_pct(level)}% CI", "p", "verdict"]
  lines = ["| " + " | ".join(head) + " |",
           "|" + "|".join(["---"] * (len(head) - 9) + ["---:", "---", "---:", "---:", "---:", "---:", "---:", "---:",
                                                        "---"]) + "|"]
  for r in rows:
    diff = "n/a" if r["mean_diff"] is None else f"{r['mean_diff']:+.4f}"
    ci = "n/a" if r["ci_low"] is None else f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
    cells = ([r["peft"], r["task"]] if multi else []) + [
        _frac_cell(r["fraction"]), _count(r["train_examples"]), f"**{r['comparison']}**", str(r["n"]),
        _mean_std(r["arms"][r["tpp"]]["values"]), f"`{r['baseline']}` {_mean_std(r['arms'][r['baseline']]['values'])}",
        diff, ci, _p_cell(r), r["verdict"]]
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", f"_{' / '.join(metrics)} on the {split} split, mean ± std over seeds per arm; per labelled fraction, "
            "the paired t-test over the seeds in both arms (two-sided, "
            f"{_pct(level)} % level, t-based CI of the mean difference). labels: the stratified fraction of the "
            "training split the fine-tune arms trained on (drawn once per fraction and seed, the same examples for "
            "every arm; train examples: its size); the TPP arm pre-trained on all training images, without labels._"]
  return "\n".join(lines)


def _pct(level: float) -> str:
  return f"{100 * level:.10g}"


def _p_cell(r: dict) -> str:
  if r["p"] is None:
    return "n/a"
  return f"{r['p']:.3g}" + ("*" if r["note"] else "")


def paired_table(records: Sequence[dict], split: str = "test", level: float = 0.95, source: str = "final") -> str:
  """Markdown table of the paired comparison of each metric, TPP → fine-tune minus baseline (same seed).

  Columns: comparison, peft, (task), metric, n (seeds in both arms), (source 'best_final': `best step (TPP /
  baseline)`, the mean validation-selected step of each arm over those seeds), `TPP − baseline` (mean of the
  per-seed differences), the t-based CI, the two-sided paired t-test p and the verdict at `level`; then one line
  naming the test and level. Empty string when there is no TPP / baseline pair.
  """
  comps = paired_comparisons([r for r in records if _has_task_metrics(r, split, source)], split, level, source)
  if not comps:
    return ""
  multi_task = len({c["task"] for c in comps}) > 1
  multi_frac = any(c["fraction"] != 1.0 for c in comps)
  best = source != "final"
  head = ["comparison", "peft"] + (["task"] if multi_task else []) + (["labels"] if multi_frac else []) + [
      "metric", "n"] + (["best step (TPP / baseline)"] if best else []) + [
      "TPP − baseline", f"{_pct(level)}% CI", "p", "verdict"]
  lines = ["| " + " | ".join(head) + " |",
           "|" + "|".join(["---"] * (len(head) - 5 - best) + ["---:"] * (4 + best) + ["---"]) + "|"]
  for c in comps:
    diff = "n/a" if c["mean_diff"] is None else f"{c['mean_diff']:+.4f}"
    ci = "n/a" if c["ci_low"] is None else f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]"
    steps = [f"{_steps_cell(c['tpp_best_steps'])} / {_steps_cell(c['baseline_best_steps'])}"] if best else []
    cells = [f"**{c['comparison']}**", c["peft"]] + ([c["task"]] if multi_task else []) + (
        [_frac_cell(c["fraction"])] if multi_frac else []) + [c["metric"], str(c["n"])] + steps + [
        diff, ci, _p_cell(c), c["verdict"]]
    lines.append("| " + " | ".join(cells) + " |")
  ns = sorted({c["n"] for c in comps})
  n = str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
  alpha = f"{1 - level:.10g}"
  seeds = f"{n} seed{'' if n == '1' else 's'}"
  which = ("each arm's checkpoint selected by validation (its best step by best_metric on the val split), "
           if best else "")
  lines += ["", f"_paired t-test over {seeds}, two-sided, {_pct(level)} % level: per seed, {which}TPP → fine-tune "
            f'minus baseline (same seed and budget); verdict "TPP better" / "baseline better" when p < {alpha} '
            '(by the sign of the mean difference; higher is better for every metric shown), else "no detectable '
            'difference"; fewer than 2 seeds: no test._']
  if any(c["baseline"] == "baseline_matched" for c in comps):
    lines.append("_TPP − baseline_matched: the same test against the compute-matched baseline (random target init, "
                 "trained pipeline.tpp_steps + steps steps: as many optimizer steps as TPP + fine-tune)._")
  if any(c["note"] for c in comps):
    lines.append("_* all paired differences equal (zero variance): the t-test is degenerate; p = 1 for no "
                 "difference, 0 otherwise._")
  return "\n".join(lines)


def comparison_data(records: Sequence[dict], level: float = 0.95) -> dict:
  """The numbers of the paired tables, machine-readable (written as comparison.json beside report.md).

  `splits`: the final step's metrics; `selected_by_validation`: the same comparisons of each run's checkpoint
  selected by validation (summary.json `best_final`; its val numbers are the selection split's, optimistic).
  """
  out = {"test": "paired t-test", "alternative": "two-sided", "level": level,
         "difference": "TPP → fine-tune minus baseline, same seed", "confidence_interval": "t-based",
         "splits": {split: paired_comparisons([r for r in records if _has_task_metrics(r, split)], split, level)
                    for split in ("test", "val")},
         "selected_by_validation": {
             "checkpoint": "each run's best step by best_metric on the val split (summary.json best, best_final)",
             "splits": {split: paired_comparisons([r for r in records if _has_task_metrics(r, split, "best_final")],
                                                  split, level, "best_final") for split in ("test", "val")}}}
  if _multi_fraction([r for r in records if r["stage"] not in PRETEXT_STAGES]):
    out["label_fractions"] = sorted({r["fraction"] for r in records if r["stage"] not in PRETEXT_STAGES})
    out["label_efficiency"] = {split: label_efficiency(records, split, level) for split in ("test", "val")}
  return out


# ----------------------------------------------------------------------------------------------
# Figures.


def _save(fig: Figure, out_png):
  """Write a PNG to a path (returned as a Path) or to a binary file object (returned as is)."""
  out = out_png if hasattr(out_png, "write") else pathlib.Path(out_png)
  if isinstance(out, pathlib.Path):
    out.parent.mkdir(parents=True, exist_ok=True)
  FigureCanvasAgg(fig)
  fig.savefig(out, format="png", dpi=110, bbox_inches="tight")
  return out


def _series(rows: Sequence[dict], split: str, key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of one split's metric; the last row of a step wins (resumed runs)."""
  by_step = {}
  for row in rows:
    v = row.get(key)
    if row.get("split") == split and v is not None and math.isfinite(float(v)):
      by_step[int(row["step"])] = float(v)
  steps = np.asarray(sorted(by_step), float)
  return steps, np.asarray([by_step[s] for s in sorted(by_step)], float)


def _plot_arm(ax, series: list, color, label: str) -> bool:
  """Thin line per seed, thick mean over the seeds (steps common to all seeds)."""
  series = [(s, v) for s, v in series if s.size]
  if not series:
    return False
  for s, v in series:
    ax.plot(s, v, color=color, lw=0.8, alpha=0.35, marker="." if s.size < 3 else None)
  common = sorted(set.intersection(*(set(s.tolist()) for s, _ in series)))
  if common:
    mean = [np.mean([v[np.searchsorted(s, c)] for s, v in series]) for c in common]
    ax.plot(common, mean, color=color, lw=2.2, marker="o" if len(common) < 3 else None,
            label=f"{label} (n={len(series)})")
  return True


def _empty(ax, text: str):
  ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.5")


def plot_learning_curves(records: Sequence[dict], out_png) -> pathlib.Path:
  """Training loss and validation main metric (auc / dice) vs step, all arms in the same axes.

  A third panel shows the TPP pretext loss (stage tpp runs: train, and val dashed) when present.
  Thin lines: single seeds; thick: the mean over seeds.

  Args:
    records: from `collect`.
    out_png: output path.

  Returns:
    The PNG path.
  """
  down = [r for r in records if r["stage"] not in PRETEXT_STAGES]
  if down:  # several labelled fractions: the fine-tune curves of the largest one
    down = [r for r in down if r["fraction"] == max(d["fraction"] for d in down)]
  pre = [r for r in records if r["stage"] == "tpp"]
  ncols = 3 if pre else 2
  fig = Figure(figsize=(5.2 * ncols, 4.0))
  axes = fig.subplots(1, ncols, squeeze=False)[0]
  colors = ["tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive"]
  groups = _groups(down)
  multi_peft = len({k[1] for k in groups}) > 1
  mains = sorted({MAIN_METRIC[k[2]] for k in groups})
  any_loss = any_val = False
  for i, ((arm, peft, task, _), group) in enumerate(groups.items()):
    c = colors[i % len(colors)]
    label = f"{arm} ({peft})" if multi_peft else arm
    any_loss |= _plot_arm(axes[0], [_series(r["rows"], "train", "loss") for r in group], c, label)
    any_val |= _plot_arm(axes[1], [_series(r["rows"], "val", MAIN_METRIC[task]) for r in group], c, label)
  axes[0].set(title="fine-tune: training loss", xlabel="step", ylabel="loss")
  axes[1].set(title=f"fine-tune: validation {' / '.join(mains) or 'metric'}", xlabel="step",
              ylabel=" / ".join(mains) or "metric")
  for ax, ok in ((axes[0], any_loss), (axes[1], any_val)):
    if ok:
      ax.legend(fontsize=8)
    else:
      _empty(ax, "no data")
    ax.grid(alpha=0.3)
  if pre:
    ax = axes[2]
    for i, ((arm, peft, _, _), group) in enumerate(_groups(pre).items()):
      c = colors[(len(groups) + i) % len(colors)]
      kind = group[0]["pretext"] or "pretext"
      label = f"{arm} {kind}" + (f" ({peft})" if multi_peft else "")
      ok = _plot_arm(ax, [_series(r["rows"], "train", "loss") for r in group], c, f"{label} train")
      val = [_series(r["rows"], "val", "loss") for r in group]
      if any(s.size for s, _ in val):
        for s, v in val:
          ax.plot(s, v, color=c, ls="--", lw=1.5, marker="s", ms=4, alpha=0.8)
        ax.plot([], [], color=c, ls="--", marker="s", label=f"{label} val")
        ok = True
      if not ok:
        _empty(ax, "no data")
    ax.set(title="TPP: pretext loss (target params only)", xlabel="step", ylabel="loss")
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  return _save(fig, out_png)


ARM_COLORS = {"tpp_finetune": "tab:red", "baseline": "tab:blue", "baseline_matched": "tab:green"}


def plot_label_efficiency(rows: Sequence[dict], out_png, level: float = 0.95) -> pathlib.Path:
  """The main metric vs the labelled fraction (log axis), one row of panels per (PEFT type, task).

  Left: each fine-tune arm's mean over seeds with its t-interval band. Right: the paired difference TPP − baseline
  (and − baseline_matched) with its CI band, and 0.

  Args:
    rows: from `label_efficiency`.
    out_png: output path (or a binary file object).
    level: the confidence level of the bands (the caption's).

  Returns:
    The PNG path.
  """
  combos = list(dict.fromkeys((r["peft"], r["task"]) for r in rows)) or [("", "")]
  fig = Figure(figsize=(10.4, 4.0 * len(combos)))
  axes = fig.subplots(len(combos), 2, squeeze=False)
  multi = len(combos) > 1
  nan = lambda v: np.nan if v is None else float(v)  # noqa: E731
  for (peft, task), (left, right) in zip(combos, axes):
    sel = [r for r in rows if (r["peft"], r["task"]) == (peft, task)]
    fracs = sorted({r["fraction"] for r in sel})
    metric = sel[0]["metric"] if sel else "metric"
    arms: dict = {}  # arm -> {fraction: mean_ci}
    for r in sel:
      for arm, s in r["arms"].items():
        arms.setdefault(arm, {})[r["fraction"]] = s
    for i, (arm, by_frac) in enumerate(sorted(arms.items(), key=lambda kv: _arm_rank(kv[0]))):
      c = ARM_COLORS.get(arm, f"C{i + 3}")
      x = sorted(by_frac)
      left.plot(x, [nan(by_frac[f]["mean"]) for f in x], color=c, marker="o", lw=2,
                label=f"{arm} (n={max(by_frac[f]['n'] for f in x)})")
      left.fill_between(x, [nan(by_frac[f]["ci_low"]) for f in x], [nan(by_frac[f]["ci_high"]) for f in x],
                        color=c, alpha=0.2, lw=0)
    by_comp: dict = {}
    for r in sel:
      by_comp.setdefault((r["comparison"], r["baseline"]), []).append(r)
    for (label, b_arm), rs in by_comp.items():
      rs = sorted(rs, key=lambda r: r["fraction"])
      c = ARM_COLORS.get(b_arm, "tab:gray")
      x = [r["fraction"] for r in rs]
      right.plot(x, [nan(r["mean_diff"]) for r in rs], color=c, marker="o", lw=2, label=label)
      right.fill_between(x, [nan(r["ci_low"]) for r in rs], [nan(r["ci_high"]) for r in rs], color=c, alpha=0.2, lw=0)
    right.axhline(0.0, color="0.3", lw=0.8, ls="--")
    suffix = f" ({peft}, {task})" if multi else ""
    left.set(title=f"test {metric} vs labelled fraction{suffix}", ylabel=metric)
    right.set(title=f"paired difference, {_pct(level)}% CI{suffix}", ylabel=f"Δ {metric}")
    for ax in (left, right):
      ax.set_xlabel("labelled fraction of the training split")
      if fracs:
        if len(fracs) > 1 and fracs[-1] / fracs[0] >= 4:
          ax.set_xscale("log")
        ax.set_xticks(fracs)
        ax.set_xticklabels([_frac_cell(f) for f in fracs])
        ax.minorticks_off()
      if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
      else:
        _empty(ax, "no data")
      ax.grid(alpha=0.3)
  fig.tight_layout()
  return _save(fig, out_png)


def _display(x, mean=None, std=None) -> np.ndarray:
  """(N, H, W, C) normalised images -> [0, 1] for imshow; C=1 (or no C) -> (N, H, W)."""
  x = np.asarray(x, np.float32)
  if x.ndim == 3:
    x = x[..., None]
  if std is not None:
    x = x * np.asarray(std, np.float32).reshape(-1)
  if mean is not None:
    x = x + np.asarray(mean, np.float32).reshape(-1)
  x = np.clip(x, 0.0, 1.0)
  return x[..., 0] if x.shape[-1] == 1 else x


def _imshow(ax, img: np.ndarray):
  ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
  ax.set_xticks([])
  ax.set_yticks([])


def plot_reconstructions(originals, masked, recons, out_png, mean=None, std=None) -> pathlib.Path:
  """Grid of MAE reconstructions: rows = images, columns = masked input / reconstruction / original.

  Args:
    originals, masked, recons: float arrays (N, H, W, C), C 1 or 3, normalised with mean/std.
    out_png: output path (or a binary file object).
    mean, std: the data normalisation (per channel or scalar); None = already in [0, 1].

  Returns:
    The PNG path.
  """
  cols = [("masked input", _display(masked, mean, std)), ("reconstruction", _display(recons, mean, std)),
          ("original", _display(originals, mean, std))]
  n = cols[0][1].shape[0]
  fig = Figure(figsize=(3 * 1.8, n * 1.8 + 0.3))
  axes = fig.subplots(n, 3, squeeze=False)
  for i in range(n):
    for j, (title, imgs) in enumerate(cols):
      _imshow(axes[i, j], imgs[i])
      if i == 0:
        axes[i, j].set_title(title, fontsize=9)
  fig.tight_layout()
  return _save(fig, out_png)


def _labels(x) -> np.ndarray:
  """Masks / predictions as (N, H, W) ints; logits (N, H, W, K) are arg-maxed."""
  x = np.asarray(x)
  if x.ndim == 4:
    x = x[..., 0] if x.shape[-1] == 1 else x.argmax(-1)
  return x.astype(np.int64)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
  a, b = a > 0, b > 0
  s = a.sum() + b.sum()
  return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


def _overlay(ax, img, labels, num_classes: int, color: str, contour=None):
  """Image with the foreground classes filled (binary: `color`; more classes: tab10) and a contour."""
  from matplotlib import colormaps
  from matplotlib.colors import ListedColormap
  _imshow(ax, img)
  if num_classes <= 2:
    cmap, vmin, vmax = ListedColormap([color]), 0, 1
  else:  # class c -> tab10 colour c (cycling)
    cmap, vmin, vmax = colormaps["tab10"], 0, 10
    labels = np.where(labels > 0, (labels - 1) % 9 + 1, 0)
  ax.imshow(np.ma.masked_where(labels == 0, labels), cmap=cmap, alpha=0.4, vmin=vmin, vmax=vmax,
            interpolation="nearest")
  if contour is not None and contour.any() and not contour.all():
    ax.contour(contour.astype(float), levels=[0.5], colors="lime", linewidths=1.0)


def plot_segmentation_overlays(images, masks, preds, out_png, mean=None, std=None) -> pathlib.Path:
  """Per image: ground truth (overlay + contour) and prediction (overlay + ground-truth contour).

  Args:
    images: float (N, H, W, C), normalised with mean/std.
    masks: int (N, H, W) ground-truth class indices (0 = background).
    preds: int (N, H, W) predicted classes, or logits (N, H, W, K).
    out_png: output path (or a binary file object).
    mean, std: the data normalisation; None = images already in [0, 1].

  Returns:
    The PNG path.
  """
  imgs, masks, preds = _display(images, mean, std), _labels(masks), _labels(preds)
  n = imgs.shape[0]
  k = int(max(masks.max(initial=0), preds.max(initial=0))) + 1
  fig = Figure(figsize=(2 * 2.2, n * 2.2 + 0.3))
  axes = fig.subplots(n, 2, squeeze=False)
  for i in range(n):
    _overlay(axes[i, 0], imgs[i], masks[i], k, "lime", contour=masks[i] > 0)
    _overlay(axes[i, 1], imgs[i], preds[i], k, "red", contour=masks[i] > 0)
    axes[i, 0].set_title("ground truth" if i == 0 else "", fontsize=9)
    axes[i, 1].set_title(("prediction (GT contour), " if i == 0 else "") + f"dice {_dice(masks[i], preds[i]):.3f}",
                         fontsize=9)
  fig.tight_layout()
  return _save(fig, out_png)


# ----------------------------------------------------------------------------------------------
# report.md


def _uniq(values) -> str:
  vals = []
  for v in values:
    s = "''" if v in ("", None) else str(v)
    if s not in vals:
      vals.append(s)
  return ", ".join(f"`{v}`" for v in vals) if vals else "n/a"


def _peft_desc(cfg: dict) -> str:
  p = _get(cfg, "peft", {}) or {}
  t = p.get("type", "none")
  if t in ("lora", "dora"):
    return f"{t} (rank {p.get('rank')}, alpha {p.get('alpha')}, targets {p.get('targets')})"
  if "adapter" in str(t):
    return f"{t} (dim {p.get('adapter_dim')})"
  if "prompt" in str(t) or "vpt" in str(t):
    return f"{t} ({p.get('num_prompts')} prompts{', deep' if p.get('deep') else ''})"
  return str(t)


def _pretext_desc(cfg: dict) -> str:
  p = _get(cfg, "pretext", {}) or {}
  t = p.get("type", "")
  if t == "mae":
    return f"mae (mask ratio {p.get('mask_ratio')}, norm_pix_loss {p.get('norm_pix_loss')})"
  return str(t)


def _setup_lines(records: Sequence[dict], top_cfg: dict | None) -> list[str]:
  down = [r for r in records if r["stage"] not in PRETEXT_STAGES] or list(records)
  pre = [r for r in records if r["stage"] == "tpp"]
  cfgs = [r["config"] for r in down]
  peft_cfgs = [r["config"] for r in down if r["peft"] != "none"] or cfgs
  lines = [
      f"- backbone init: {_uniq(r['init'] or _get(r['config'], 'init.path', '') for r in down)}",
      f"- model: {_uniq(_get(c, 'model.variant') for c in cfgs)}, image size "
      f"{_uniq(_get(c, 'model.image_size') for c in cfgs)}",
      f"- PEFT: {_uniq(_peft_desc(c) for c in peft_cfgs)}",
      f"- pretext (TPP): {_uniq(_pretext_desc(r['config']) for r in pre) if pre else _uniq(map(_pretext_desc, cfgs))}",
      f"- task: {_uniq('%s (%s classes)' % (_get(c, 'task.type'), _get(c, 'task.num_classes')) for c in cfgs)}",
      f"- data: {_uniq(_get(c, 'data.path') for c in cfgs)} (source {_uniq(_get(c, 'data.source') for c in cfgs)})",
      f"- fine-tune steps: {_uniq(r['steps'] for r in down)}, batch size {_uniq(_get(c, 'batch_size') for c in cfgs)}, "
      f"lr {_uniq(_get(c, 'optim.lr') for c in cfgs)}",
  ]
  if pre:
    lines.append(f"- TPP steps: {_uniq(r['steps'] for r in pre)}, batch size "
                 f"{_uniq(_get(r['config'], 'batch_size') for r in pre)}, "
                 f"lr {_uniq(_get(r['config'], 'optim.lr') for r in pre)}")
  seeds = sorted({r["seed"] for r in records if r["seed"] is not None})
  lines.append(f"- seeds: {', '.join(map(str, seeds)) or 'n/a'}")
  if top_cfg and _get(top_cfg, "stage") == "pipeline":
    lines.append(f"- pipeline: {_get(top_cfg, 'seeds')} seed(s) from seed {_get(top_cfg, 'seed')}")
    fractions = _get(top_cfg, "pipeline.label_fractions") or [1.0]
    if any(float(f) != 1.0 for f in fractions):
      lines.append("- labelled fractions of the training split (fine-tune arms): "
                   + ", ".join(_frac_cell(f) for f in sorted({float(f) for f in fractions})))
    if _get(top_cfg, "pipeline.compute_matched"):
      lines.append(f"- compute-matched baseline (`baseline_matched`): random target init, "
                   f"{_get(top_cfg, 'pipeline.tpp_steps')} + {_get(top_cfg, 'steps')} steps")
    if _get(top_cfg, "pipeline.brackets"):
      lines.append("- brackets: `linear` (linear probe: task head only) and `full` (full fine-tune: backbone + "
                   "head), the baseline's data, steps, optimizer (lr) and seeds")
  return lines


def _pretext_table(records: Sequence[dict]) -> str:
  pre = [r for r in records if r["stage"] in PRETEXT_STAGES]
  if not pre:
    return ""
  lines = ["| arm | stage | pretext | peft | n | final train loss | val loss |", "|---|---|---|---|---:|---:|---:|"]
  for (arm, peft, _, _), group in _groups(pre).items():
    last = []
    for r in group:
      s, v = _series(r["rows"], "train", "loss")
      last.append(v[-1] if v.size else None)
    val = [r["final"].get("val", {}).get("loss") for r in group]
    lines.append(f"| `{arm}` | {group[0]['stage']} | {group[0]['pretext']} | {peft} | {len(group)} | "
                 f"{_mean_std(last)} | {_mean_std(val)} |")
  return "\n".join(lines)


def _cost_table(records: Sequence[dict]) -> str:
  multi = _multi_fraction(records)
  lines = ["| arm | stage | peft | " + ("labels | steps | " if multi else "") + "n | total params | trainable | "
           "target | head | images/s | wall time / run (s) | wall time, all seeds (s) |",
           "|---|---|---|" + ("---|---:|" if multi else "") + "---:|---:|---:|---:|---:|---:|---:|---:|"]
  for (arm, peft, _, frac), g in _groups(records).items():
    p = lambda k: _count(r["params"].get(k) for r in g)  # noqa: E731
    total_wall = _finite(r["wall_time_s"] for r in g)
    labels = f"{_frac_cell(frac)} | {_count(r['steps'] for r in g)} | " if multi else ""
    lines.append(f"| `{arm}` | {g[0]['stage']} | {peft} | {labels}{len(g)} | {p('total')} | {p('trainable')} | "
                 f"{p('target')} | "
                 f"{p('head')} | {_mean_fmt(r['images_per_sec'] for r in g)} | "
                 f"{_mean_fmt(r['wall_time_s'] for r in g)} | {total_wall.sum():.1f} |")
  return "\n".join(lines)


def _link(path: str, start: pathlib.Path) -> str:
  return pathlib.Path(os.path.relpath(path, start)).as_posix()


def write_report(pipeline_dir, extra_runs: Sequence = ()) -> pathlib.Path:
  """Writes `pipeline_dir/report.md` (and `learning_curves.png` beside it).

  Args:
    pipeline_dir: a `pipeline` workdir (seed_*/{tpp,tpp_finetune,baseline}) or any folder of runs.
    extra_runs: more folders whose runs join the comparison.

  Returns:
    The path of report.md.

  Raises:
    NoRunsError: a given folder holds no run folder.
  """
  wd = pathlib.Path(pipeline_dir)
  records = []
  for d in [wd, *extra_runs]:
    d = pathlib.Path(d)
    if not d.is_dir():
      raise NoRunsError(f"{d} is not a folder.")
    found = collect([d])
    if not found:
      raise NoRunsError(f"No runs under {d}: a run folder holds summary.json (the --workdir of a finished "
                        "training run, or a pipeline folder with seed_*/tpp_finetune, seed_*/baseline).")
    records += found
  records = collect([r["path"] for r in records])  # dedupe and sort
  top_cfg = read_json(wd / "config.json") if (wd / "config.json").exists() else None
  curves = plot_learning_curves(records, wd / "learning_curves.png")

  md = [f"# TPP vs plain PEFT: `{wd.resolve().name}`", "",
        "**TPP** (Target Parameter Pre-training): the PEFT parameters (e.g. LoRA) are first trained with a "
        "self-supervised pretext task (MAE / DINO) on the downstream images, backbone frozen, then fine-tuned "
        "on the task (`tpp_finetune`).  ",
        "**Baseline**: the same PEFT fine-tuning from the usual random init of those parameters (`baseline`), "
        "with the same seeds, data and step budget"
        + (" (`baseline_matched`: the same, trained TPP + fine-tune steps, so a gain is not just more steps)"
           if any(r["role"] == "baseline_matched" for r in records) else "") + ".  ",
        *(["**Brackets**: the same backbone, data, steps, optimizer and seed with the linear probe (`linear`: the "
           "task head only, backbone frozen) and the full fine-tune (`full`: backbone + head); where the PEFT arms "
           "fall between them.  "] if any(r["role"] in BRACKETS for r in records) else []),
        "**TPP − baseline**: mean ± std over seeds of the per-seed paired differences (positive = TPP better "
        "for all metrics shown). Under each metric table, the paired comparison per metric: the mean "
        "difference, its 95% confidence interval (t-based), the two-sided paired t-test p over the seeds and "
        "the verdict at the 95 % level; the same numbers are in [comparison.json](comparison.json).", "",
        "## Setup", "", *_setup_lines(records, top_cfg), ""]
  for split, title in (("test", "Test metrics"), ("val", "Validation metrics")):
    md += [f"## {title}", "", metric_table(records, split), ""]
    paired = paired_table(records, split)
    md += [paired, ""] if paired else []
    if split == "test" and any(_has_task_metrics(r, split, "best_final") for r in records):
      md += [f"### {SOURCES['best_final'].capitalize()}: {title.lower()}", "",
             "Each run's checkpoint with the best validation metric (`best_metric`, evaluated every `eval_every` "
             "steps and at the last step; summary.json `best_final`), the numbers a fixed budget that stops before "
             "convergence can hide: `steps` is what each arm trained, `best step` where it peaked (mean over seeds).",
             "", metric_table(records, split, "best_final"), ""]
      paired = paired_table(records, split, source="best_final")
      md += [paired, ""] if paired else []
  md += ["Mean ± std over seeds (std with ddof=1; `n/a` for a single seed); metrics of the final step, except "
         f"under _{SOURCES['best_final']}_ and in the `@ best step` column: the checkpoint selected by validation "
         "(on the val split that column is the selection value itself, so it is optimistic).", ""]
  if _multi_fraction([r for r in records if _has_task_metrics(r, "test")]):
    md += ["## Label efficiency", "", label_efficiency_table(records, "test"), ""]
    png = plot_label_efficiency(label_efficiency(records, "test"), wd / "label_efficiency.png")
    md += [f"![label efficiency]({_link(str(png), wd)})", "",
           "Left: the test metric of each fine-tune arm vs the labelled fraction (mean over seeds, band: its "
           "95% t-interval). Right: the paired difference TPP − baseline per fraction with its 95% CI (above 0: "
           "TPP better).", ""]
  (wd / "comparison.json").write_text(json.dumps(comparison_data(records), indent=1) + "\n")
  pre = _pretext_table(records)
  if pre:
    md += ["## TPP pretext", "", pre, ""]
  md += ["## Learning curves", "", f"![learning curves]({_link(str(curves), wd)})", "",
         "Thin lines: single seeds; thick lines: mean over seeds."
         + (f" Fine-tune arms: the largest labelled fraction ({_frac_cell(max(r['fraction'] for r in records))})."
            if _multi_fraction(records) else ""), ""]
  for name, title, caption in FIGURES:
    if (wd / name).exists():
      md += [f"## {title}", "", f"![{title}]({name})", "", caption, ""]
  md += ["## Parameters, wall time and throughput", "", _cost_table(records), "",
         "images/s: training throughput after compilation; wall time includes evaluation and checkpointing. "
         "The TPP arm's total cost is `tpp` + `tpp_finetune`"
         + ("; `baseline_matched` trains as many steps as the two together." if any(
             r["role"] == "baseline_matched" for r in records) else "."), "",
         "## Runs", ""]
  for r in records:
    rel = _link(r["path"], wd)
    labels = f", {_frac_cell(r['fraction'])} labels" if r["fraction"] != 1.0 else ""
    md.append(f"- `{r['arm']}` seed {r['seed']} ({r['stage']}, {r['peft']}{labels}): [{rel}]({rel}/summary.json)")
  out = wd / "report.md"
  out.write_text("\n".join(md) + "\n")
  return out


def main(argv: Sequence[str] | None = None) -> pathlib.Path:
  ap = argparse.ArgumentParser(prog="python -m tpp_jax.report", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                  help="pipeline / run folders; report.md is written into the first")
  a = ap.parse_args(argv)
  try:
    path = write_report(a.run_dirs[0], a.run_dirs[1:])
  except (NoRunsError, FileNotFoundError) as e:
    ap.error(str(e))
  print(f"Report: {path}")
  return path


if __name__ == "__main__":
  main()
