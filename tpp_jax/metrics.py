"""Evaluation metrics: classification (accuracy, balanced accuracy, macro F1, ROC-AUC) and Dice / IoU.

The host-side metrics use numpy only; they match scikit-learn's definitions (which is a test-only
dependency). Segmentation metrics are dataset-level: per-class intersection / prediction / target
pixel counts are summed over the whole split before dividing, so

  dice_c = 2 * sum(I_c) / (sum(P_c) + sum(T_c)),   iou_c = sum(I_c) / (sum(P_c) + sum(T_c) - sum(I_c)),

which is not the mean of per-image Dice (small objects would otherwise weigh as much as large ones).
`seg_counts` computes the counts with jax.numpy inside a jitted step, so only a (K, 3) array
reaches the host; `SegMetrics.update_counts` adds it.
"""
from __future__ import annotations

from typing import Any

import numpy as np

# Columns of a counts array: (intersection, prediction sum, target sum), one row per class.
COUNT_COLUMNS = ("intersection", "pred_sum", "target_sum")
# The canonical metric names (summary.json "final", report tables), by task; MAIN_METRIC picks the best checkpoint.
CLASSIFICATION_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auc")
SEGMENTATION_METRICS = ("dice", "iou")
TASK_METRICS = {"classification": CLASSIFICATION_METRICS, "segmentation": SEGMENTATION_METRICS}
MAIN_METRIC = {"classification": "auc", "segmentation": "dice"}


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks of x; tied values share the average of the ranks they span."""
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  ends = np.cumsum(counts).astype(np.float64)  # rank of the last member of each tie group
  return (ends - (counts - 1) / 2.0)[inverse.reshape(-1)]


def binary_auc(is_pos: np.ndarray, scores: np.ndarray) -> float:
  """ROC-AUC via the Mann-Whitney U statistic with average ranks for ties.

  Args:
    is_pos: (N,) bool, True for the positive class.
    scores: (N,) float, higher means more positive.

  Returns:
    P(score_pos > score_neg) + 0.5 * P(tie), or nan when only one class is present.
  """
  is_pos = np.asarray(is_pos, bool).reshape(-1)
  n_pos = int(is_pos.sum())
  n_neg = is_pos.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  ranks = _average_ranks(np.asarray(scores, np.float64).reshape(-1))
  u = ranks[is_pos].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def classification_metrics(labels: Any, probs: Any, weights_valid: Any = None) -> dict[str, float]:
  """Accuracy, balanced accuracy, macro F1 and ROC-AUC of argmax predictions.

  Args:
    labels: (N,) int class indices.
    probs: (N, K) float class scores (probabilities); predictions are argmax over K.
    weights_valid: optional (N,) bool; False rows (e.g. batch padding) are ignored.

  Returns:
    Python floats. `balanced_accuracy` is the mean recall over classes present in labels;
    `macro_f1` averages F1 over classes present in labels or predictions (zero_division=0);
    `auc` is ROC-AUC of probs[:, 1] for K == 2, else the one-vs-rest macro average over classes
    present in labels (equal to sklearn's multi_class='ovr' when all K are present); nan when
    fewer than two classes are present. All values are nan for an empty input.
  """
  labels = np.asarray(labels).reshape(-1).astype(np.int64)
  probs = np.asarray(probs, np.float64)
  if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
    raise ValueError(f"probs must be (N, K) with N = len(labels) = {labels.shape[0]}, "
                     f"got shape {probs.shape}.")
  if weights_valid is not None:
    keep = np.asarray(weights_valid, bool).reshape(-1)
    labels, probs = labels[keep], probs[keep]
  nan = float("nan")
  if labels.size == 0:
    return dict.fromkeys(CLASSIFICATION_METRICS, nan)
  preds = probs.argmax(axis=1)
  present = np.unique(labels)
  recall, f1 = [], []
  for c in np.union1d(present, preds):
    tp = np.sum((preds == c) & (labels == c))
    n_true, n_pred = np.sum(labels == c), np.sum(preds == c)
    if n_true:
      recall.append(tp / n_true)
    f1.append(2.0 * tp / (n_true + n_pred))  # denominator > 0 for every class in the union
  num_classes = probs.shape[1]
  if num_classes == 2:
    auc = binary_auc(labels == 1, probs[:, 1])
  elif len(present) < 2:
    auc = nan
  else:
    auc = float(np.mean([binary_auc(labels == c, probs[:, c]) for c in present
                         if 0 <= c < num_classes]))
  return {
      "accuracy": float(np.mean(preds == labels)),
      "balanced_accuracy": float(np.mean(recall)),
      "macro_f1": float(np.mean(f1)),
      "auc": auc,
  }


class ClassificationAccumulator:
  """Collects labels and probabilities over batches; `compute` gives `classification_metrics`.

  `update(labels, probs, valid)` adds arrays; `add(out)` adds an objective's eval outputs
  (`probs`, `label`, `valid`, optional per-example `loss`; then `compute` also gives the mean `loss`).
  """

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    self._labels: list[np.ndarray] = []
    self._probs: list[np.ndarray] = []
    self._losses: list[np.ndarray] = []

  def update(self, labels: Any, probs: Any, valid: Any = None, loss: Any = None) -> None:
    """Adds a batch: labels (B,) int, probs (B, K), valid (B,) bool or None (all valid), loss (B,) or None."""
    labels = np.asarray(labels).reshape(-1)
    probs = np.asarray(probs)
    keep = np.ones(labels.shape, bool) if valid is None else np.asarray(valid, bool).reshape(-1)
    self._labels.append(labels[keep])
    self._probs.append(probs[keep])
    if loss is not None:
      self._losses.append(np.asarray(loss, np.float64).reshape(-1)[keep])

  def add(self, out: dict) -> None:
    """Adds the eval outputs of objectives/classification.py (`probs`, `label`, `valid`, `loss`)."""
    self.update(out["label"], out["probs"], out.get("valid"), out.get("loss"))

  def compute(self) -> dict[str, float]:
    if not self._labels:
      res = classification_metrics(np.zeros(0, np.int64), np.zeros((0, 2)))
    else:
      res = classification_metrics(np.concatenate(self._labels), np.concatenate(self._probs))
    if self._losses:
      losses = np.concatenate(self._losses)
      res["loss"] = float(losses.mean()) if losses.size else float("nan")
    return res


def seg_counts(pred: Any, target: Any, num_classes: int, valid: Any = None):
  """Per-class (intersection, pred_sum, target_sum) pixel counts; jit-safe (jax.numpy).

  Args:
    pred: (B, H, W) int predicted class map.
    target: (B, H, W) int ground-truth class map.
    num_classes: K (static).
    valid: optional (B,) bool; False images (batch padding) contribute nothing.

  Returns:
    (K, 3) int32 counts. Pixel values outside [0, K) count toward no class.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top  (host metrics stay numpy-only)
  pred, target = jnp.asarray(pred), jnp.asarray(target)
  classes = jnp.arange(num_classes, dtype=pred.dtype).reshape((num_classes,) + (1,) * pred.ndim)
  p = pred[None] == classes  # (K, B, H, W); XLA fuses the compare into the reductions
  t = target[None] == classes
  if valid is not None:
    v = jnp.asarray(valid, bool).reshape((1, -1) + (1,) * (pred.ndim - 1))
    p, t = p & v, t & v
  axes = tuple(range(1, pred.ndim + 1))
  count = lambda m: jnp.sum(m, axis=axes, dtype=jnp.int32)
  return jnp.stack([count(p & t), count(p), count(t)], axis=1)


def _seg_counts_np(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
  """numpy twin of `seg_counts`, (K, 3) int64."""
  pred, target = pred.reshape(-1).astype(np.int64), target.reshape(-1).astype(np.int64)
  in_p = (pred >= 0) & (pred < num_classes)
  in_t = (target >= 0) & (target < num_classes)
  inter = np.bincount(pred[in_p & (pred == target)], minlength=num_classes)
  psum = np.bincount(pred[in_p], minlength=num_classes)
  tsum = np.bincount(target[in_t], minlength=num_classes)
  return np.stack([inter, psum, tsum], axis=1).astype(np.int64)


class SegMetrics:
  """Dataset-level Dice / IoU accumulated from per-class pixel counts (int64, whole split).

  `compute` returns `dice` / `iou` (K == 2: the foreground class 1; otherwise the mean over
  foreground classes 1..K-1 that occur in predictions or targets) and `dice_per_class` /
  `iou_per_class` for all K classes, background included. A class absent from both predictions and
  targets has nan Dice / IoU and is left out of the mean.
  """

  def __init__(self, num_classes: int = 2):
    if num_classes < 2:
      raise ValueError(f"num_classes must be >= 2 (background + foreground), got {num_classes}.")
    self.num_classes = num_classes
    self.reset()

  def reset(self) -> None:
    self.counts = np.zeros((self.num_classes, 3), np.int64)
    self._loss: list[float] | None = None  # [sum of per-image losses, valid images] once `add` got them

  def add(self, out: dict) -> None:
    """Adds the eval outputs of objectives/segmentation.py: `counts` (from `seg_counts`), optional `loss_sum`
    and `count` (valid images; then `compute` also gives the mean `loss`)."""
    self.update_counts(out["counts"])
    if "loss_sum" in out:
      total, n = self._loss or [0.0, 0.0]
      self._loss = [total + float(np.sum(out["loss_sum"])), n + float(np.sum(out["count"]))]

  def update(self, pred: Any, target: Any, valid: Any = None) -> None:
    """Adds a batch: pred / target (B, H, W) int, valid (B,) bool or None (all valid)."""
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
      raise ValueError(f"pred {pred.shape} and target {target.shape} must have the same shape.")
    if valid is not None:
      keep = np.asarray(valid, bool).reshape(-1)
      pred, target = pred[keep], target[keep]
    self.counts += _seg_counts_np(pred, target, self.num_classes)

  def update_counts(self, counts: Any) -> None:
    """Adds (K, 3) counts from `seg_counts` (or (..., K, 3), e.g. one per device; summed)."""
    counts = np.asarray(counts).astype(np.int64)
    if counts.shape[-2:] != (self.num_classes, 3):
      raise ValueError(f"counts must end in ({self.num_classes}, 3), got {counts.shape}.")
    self.counts += counts.reshape(-1, self.num_classes, 3).sum(axis=0)

  def compute(self) -> dict[str, Any]:
    inter, psum, tsum = (self.counts[:, i].astype(np.float64) for i in range(3))
    with np.errstate(divide="ignore", invalid="ignore"):
      dice = np.where(psum + tsum > 0, 2.0 * inter / (psum + tsum), np.nan)
      iou = np.where(psum + tsum > 0, inter / (psum + tsum - inter), np.nan)
    fg = slice(1, None)

    def fg_mean(x: np.ndarray) -> float:
      x = x[fg][~np.isnan(x[fg])]
      return float(x.mean()) if x.size else float("nan")

    res = {
        "dice": fg_mean(dice),
        "iou": fg_mean(iou),
        "dice_per_class": [float(d) for d in dice],
        "iou_per_class": [float(j) for j in iou],
    }
    if self._loss is not None:
      res["loss"] = self._loss[0] / max(self._loss[1], 1.0)
    return res
