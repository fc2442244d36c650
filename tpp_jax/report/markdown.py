"""report.md: the setup, metric / paired / label-efficiency tables, pretext and cost sections, figures and
runs of a pipeline folder (and comparison.json beside it)."""
from __future__ import annotations

import json
import os
import pathlib
from typing import Sequence

from tpp_jax.jsonio import read_json, write_atomic
from tpp_jax.report.collect import PRETEXT_STAGES, NoRunsError, _get, _groups, collect
from tpp_jax.report.plots import _series, plot_label_efficiency, plot_learning_curves
from tpp_jax.report.tables import (
    SOURCES,
    _count,
    _finite,
    _frac_cell,
    _has_task_metrics,
    _mean_fmt,
    _mean_std,
    _multi_fraction,
    comparison_data,
    label_efficiency,
    label_efficiency_table,
    metric_table,
    paired_table,
)

BRACKETS = ("linear", "full")  # pipeline.brackets: linear probe and full fine-tune of the same backbone (no test)
FIGURES = (("mae_reconstructions.png", "MAE reconstructions (TPP arm)",
            "Validation images: masked input / reconstruction by the TPP-trained target parameters / original."),
           ("segmentation_overlays.png", "Segmentation overlays (TPP arm)",
            "Ground truth (left, green) and prediction (right, red; ground-truth contour in green) over the input "
            "image."))


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
  head = f", head {p.get('head', 'train')}" + (" (frozen: only the target parameters train)"
                                                if p.get("head") == "frozen" else "")
  if t == "mae":
    return f"mae (mask ratio {p.get('mask_ratio')}, norm_pix_loss {p.get('norm_pix_loss')}{head})"
  return f"{t} ({head[2:]})"


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
  write_atomic(wd / "comparison.json", json.dumps(comparison_data(records), indent=1) + "\n")
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
  write_atomic(out, "\n".join(md) + "\n")
  return out
