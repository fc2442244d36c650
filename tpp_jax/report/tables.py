"""Statistics tables of the records: metric tables, paired TPP − baseline comparisons, label efficiency.

Markdown strings (and the same numbers as dicts for comparison.json); statistics from tpp_jax.stats.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from tpp_jax import stats
from tpp_jax.metrics import MAIN_METRIC, TASK_METRICS
from tpp_jax.report.collect import PRETEXT_STAGES, _groups

BASELINES = ("baseline", "baseline_matched")  # roles TPP → fine-tune is compared with (same seed and fraction)
SOURCES = {"final": "final step", "best_final": "selected by validation (best step)"}  # summary.json metric blocks


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
