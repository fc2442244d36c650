"""Figures (matplotlib Agg canvas, no pyplot): learning curves, label efficiency, MAE reconstructions and
segmentation overlays."""
from __future__ import annotations

import io
import math
import pathlib
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tpp_jax.jsonio import write_atomic
from tpp_jax.metrics import MAIN_METRIC
from tpp_jax.report.collect import PRETEXT_STAGES, _arm_rank, _groups
from tpp_jax.report.tables import _frac_cell, _pct


def _save(fig: Figure, out_png):
  """Write a PNG to a path (returned as a Path) or to a binary file object (returned as is)."""
  FigureCanvasAgg(fig)
  if hasattr(out_png, "write"):
    fig.savefig(out_png, format="png", dpi=110, bbox_inches="tight")
    return out_png
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
  return write_atomic(out_png, buf.getvalue())  # a killed run leaves no torn PNG


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
