"""tpp_jax.metrics against scikit-learn (classification) and direct numpy counting (Dice / IoU)."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from tpp_jax import metrics

TOL = 1e-9


def _tied_probs(rng, n, k, levels=4):
  """Rows of small integers normalised to sum to 1: many exact ties within each column."""
  w = rng.integers(0, levels, size=(n, k)).astype(np.float64)
  w[w.sum(1) == 0, 0] = 1.0
  return w / w.sum(1, keepdims=True)


def _sklearn(labels, probs):
  preds = probs.argmax(1)
  if probs.shape[1] == 2:
    auc = skm.roc_auc_score(labels, probs[:, 1])
  else:
    auc = skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # balanced_accuracy warns when a class is never true
    bal = skm.balanced_accuracy_score(labels, preds)
  return {
      "accuracy": skm.accuracy_score(labels, preds),
      "balanced_accuracy": bal,
      "macro_f1": skm.f1_score(labels, preds, average="macro", zero_division=0),
      "auc": auc,
  }


def _assert_close(ours, ref, keys=("accuracy", "balanced_accuracy", "macro_f1", "auc")):
  for key in keys:
    assert isinstance(ours[key], float), key
    assert abs(ours[key] - ref[key]) < TOL, (key, ours[key], ref[key])


CASES = [  # (num_classes, label prior, tied scores)
    (2, None, False), (2, None, True), (2, [0.9, 0.1], True),
    (4, None, False), (4, None, True), (4, [0.7, 0.2, 0.07, 0.03], True),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k,prior,tied", CASES)
def test_classification_matches_sklearn(seed, k, prior, tied):
  rng = np.random.default_rng(seed)
  n = 200
  labels = rng.choice(k, size=n, p=prior)
  labels[:k] = np.arange(k)  # every class present in labels (sklearn ovr needs all K)
  probs = _tied_probs(rng, n, k) if tied else rng.dirichlet(np.ones(k), size=n)
  # Make the scores informative so the metrics are not all near chance.
  boost = rng.integers(0, 3, size=(n, 1)) if tied else rng.random((n, 1))  # discrete keeps ties
  probs = probs + 0.5 * np.eye(k)[labels] * boost
  probs /= probs.sum(1, keepdims=True)
  if tied:
    assert len(np.unique(probs[:, 1])) < n // 2  # many exact ties
  _assert_close(metrics.classification_metrics(labels, probs), _sklearn(labels, probs))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_class_missing_from_predictions(seed):
  rng = np.random.default_rng(seed)
  n, k = 150, 4
  labels = rng.choice(k, size=n, p=[0.5, 0.3, 0.15, 0.05])
  labels[:k] = np.arange(k)
  probs = _tied_probs(rng, n, k)
  probs[:, 3] = 0.0  # class 3 is never predicted but has true samples (F1 = 0 for it)
  probs[:, 0] += 1e-3
  probs /= probs.sum(1, keepdims=True)
  assert 3 not in probs.argmax(1)
  ours = metrics.classification_metrics(labels, probs)
  _assert_close(ours, _sklearn(labels, probs))


def test_class_missing_from_labels():
  """Predicted-but-never-true class: counts in macro F1, not in balanced accuracy; AUC skips it."""
  rng = np.random.default_rng(3)
  n, k = 120, 4
  labels = rng.choice(3, size=n)  # class 3 never true
  probs = _tied_probs(rng, n, k)
  assert 3 in probs.argmax(1)
  ours = metrics.classification_metrics(labels, probs)
  _assert_close(ours, _sklearn_no_auc(labels, probs), keys=("accuracy", "balanced_accuracy",
                                                            "macro_f1"))
  ref_auc = np.mean([skm.roc_auc_score(labels == c, probs[:, c]) for c in range(3)])
  assert abs(ours["auc"] - ref_auc) < TOL


def _sklearn_no_auc(labels, probs):
  preds = probs.argmax(1)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    bal = skm.balanced_accuracy_score(labels, preds)
  return {"accuracy": skm.accuracy_score(labels, preds), "balanced_accuracy": bal,
          "macro_f1": skm.f1_score(labels, preds, average="macro", zero_division=0)}


def test_auc_all_tied_and_single_class():
  labels = np.array([0, 1, 0, 1, 1])
  assert metrics.classification_metrics(labels, np.full((5, 2), 0.5))["auc"] == 0.5
  one = metrics.classification_metrics(np.ones(5, int), np.full((5, 2), 0.5))
  assert np.isnan(one["auc"]) and one["accuracy"] == 0.0
  one4 = metrics.classification_metrics(np.full(6, 2), _tied_probs(np.random.default_rng(0), 6, 4))
  assert np.isnan(one4["auc"])


def test_valid_mask_excludes_padding():
  rng = np.random.default_rng(4)
  labels = rng.choice(4, size=90)
  labels[:4] = np.arange(4)
  probs = _tied_probs(rng, 90, 4)
  pad_labels = np.concatenate([labels, np.zeros(10, int)])
  pad_probs = np.concatenate([probs, np.eye(4)[np.full(10, 3)]])  # padding would all be wrong
  valid = np.arange(100) < 90
  ref = metrics.classification_metrics(labels, probs)
  assert metrics.classification_metrics(pad_labels, pad_probs, weights_valid=valid) == ref
  assert metrics.classification_metrics(pad_labels, pad_probs) != ref

  acc = metrics.ClassificationAccumulator()
  for lo in range(0, 100, 32):  # batches of 32, the last one padded
    sl = slice(lo, lo + 32)
    acc.update(jnp.asarray(pad_labels[sl]), jnp.asarray(pad_probs[sl]), valid[sl])
  assert acc.compute() == ref
  acc.reset()
  assert np.isnan(acc.compute()["accuracy"])


# ------------------------------------------------------------------------------------ segmentation


def _direct_dice_iou(pred, target, k):
  """Flatten every image of the split, count pixels per class, divide once."""
  p, t = pred.reshape(-1), target.reshape(-1)
  dice, iou = [], []
  for c in range(k):
    inter = np.sum((p == c) & (t == c))
    ps, ts = np.sum(p == c), np.sum(t == c)
    dice.append(2 * inter / (ps + ts))
    iou.append(inter / (ps + ts - inter))
  return np.array(dice), np.array(iou)


def _random_masks(rng, b, h, w, k):
  target = rng.choice(k, size=(b, h, w), p=[0.6] + [0.4 / (k - 1)] * (k - 1))
  noise = rng.random((b, h, w)) < 0.25
  pred = np.where(noise, rng.choice(k, size=(b, h, w)), target)
  return pred, target


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_seg_metrics_match_direct_count(k, seed):
  rng = np.random.default_rng(seed)
  pred, target = _random_masks(rng, 10, 16, 12, k)
  sm = metrics.SegMetrics(num_classes=k)
  for lo in range(0, 10, 4):
    sm.update(pred[lo:lo + 4], target[lo:lo + 4])
  out = sm.compute()
  dice, iou = _direct_dice_iou(pred, target, k)
  np.testing.assert_allclose(out["dice_per_class"], dice, rtol=0, atol=TOL)
  np.testing.assert_allclose(out["iou_per_class"], iou, rtol=0, atol=TOL)
  assert abs(out["dice"] - dice[1:].mean()) < TOL
  assert abs(out["iou"] - iou[1:].mean()) < TOL
  assert sm.counts.dtype == np.int64


def test_seg_valid_mask_excludes_padding():
  rng = np.random.default_rng(5)
  pred, target = _random_masks(rng, 6, 8, 8, 3)
  pad_pred = np.concatenate([pred, np.full((2, 8, 8), 2)])
  pad_target = np.concatenate([target, np.zeros((2, 8, 8), int)])
  valid = np.arange(8) < 6
  ref, masked, unmasked = (metrics.SegMetrics(3) for _ in range(3))
  ref.update(pred, target)
  masked.update(pad_pred, pad_target, valid)
  unmasked.update(pad_pred, pad_target)
  assert masked.compute() == ref.compute()
  assert unmasked.compute() != ref.compute()


@pytest.mark.parametrize("k", [2, 3])
def test_jax_seg_counts_match_numpy(k):
  rng = np.random.default_rng(6)
  pred, target = _random_masks(rng, 8, 16, 16, k)
  valid = np.array([True] * 6 + [False] * 2)
  fn = jax.jit(metrics.seg_counts, static_argnums=2)
  counts = fn(jnp.asarray(pred, jnp.int32), jnp.asarray(target, jnp.int32), k, jnp.asarray(valid))
  assert counts.shape == (k, 3) and counts.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(counts),
                                metrics._seg_counts_np(pred[valid], target[valid], k))
  direct = np.stack([[np.sum((pred[:6] == c) & (target[:6] == c)), np.sum(pred[:6] == c),
                      np.sum(target[:6] == c)] for c in range(k)])
  np.testing.assert_array_equal(np.asarray(counts), direct)

  on_device, on_host = metrics.SegMetrics(k), metrics.SegMetrics(k)
  on_device.update_counts(counts)
  on_device.update_counts(fn(pred[:2], target[:2], k)[None])  # (1, K, 3), e.g. per-device
  on_host.update(pred, target, valid)
  on_host.update(pred[:2], target[:2])
  np.testing.assert_array_equal(on_device.counts, on_host.counts)
  assert on_device.compute() == on_host.compute()


def test_dataset_level_differs_from_mean_of_per_image_dice():
  """A large perfectly segmented lesion and a 1-pixel lesion that is missed.

  Mean of per-image Dice = (1 + 0) / 2 = 0.5: the single missed pixel weighs as much as the 100
  correct ones. Dataset-level Dice = 2 * 100 / (100 + 101) ~= 0.995 weighs every pixel equally,
  and an image without foreground in either mask (per-image Dice 0/0) needs no special case.
  """
  target = np.zeros((3, 20, 20), int)
  target[0, :10, :10] = 1    # 100-pixel lesion ...
  pred = target.copy()       # ... predicted exactly
  target[1, 5, 5] = 1        # 1-pixel lesion, missed (pred[1] is all background)
  # image 2: empty in both masks

  per_image = [2 * np.sum(p & t) / (p.sum() + t.sum()) for p, t in zip(pred[:2], target[:2])]
  assert per_image == [1.0, 0.0]
  sm = metrics.SegMetrics(num_classes=2)
  sm.update(pred, target)
  out = sm.compute()
  assert abs(out["dice"] - 200 / 201) < TOL
  assert abs(out["iou"] - 100 / 101) < TOL
  assert abs(out["dice"] - np.mean(per_image)) > 0.49


def test_absent_class_is_nan_and_skipped_in_mean():
  target = np.zeros((1, 4, 4), int)
  target[0, 0] = 1
  out = metrics.SegMetrics(3)
  out.update(target, target)
  res = out.compute()
  assert np.isnan(res["dice_per_class"][2]) and res["dice"] == 1.0 and res["iou"] == 1.0


# ------------------------------------------------------------------------------------ engine accumulators


def test_metric_names_are_what_compute_returns():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, 30)
  assert tuple(metrics.classification_metrics(labels, _tied_probs(rng, 30, 3))) == metrics.CLASSIFICATION_METRICS
  sm = metrics.SegMetrics(2)
  sm.update(np.ones((1, 2, 2), int), np.ones((1, 2, 2), int))
  assert set(metrics.SEGMENTATION_METRICS) <= set(sm.compute())
  assert metrics.TASK_METRICS == {"classification": metrics.CLASSIFICATION_METRICS,
                                  "segmentation": metrics.SEGMENTATION_METRICS}
  for task, name in metrics.MAIN_METRIC.items():
    assert name in metrics.TASK_METRICS[task]


def test_classification_accumulator_add_takes_eval_outputs():
  """`add(out)` with objectives/classification.py's eval outputs: metrics of the valid rows + their mean loss."""
  rng = np.random.default_rng(5)
  labels, probs = rng.integers(0, 2, 70), _tied_probs(rng, 70, 2)
  loss, valid = rng.random(70), np.arange(70) < 61
  acc = metrics.ClassificationAccumulator()
  for lo in range(0, 70, 16):
    sl = slice(lo, lo + 16)
    acc.add({"probs": jnp.asarray(probs[sl]), "label": jnp.asarray(labels[sl]), "valid": valid[sl],
             "loss": jnp.asarray(loss[sl])})
  res = acc.compute()
  want = metrics.classification_metrics(labels[valid], probs[valid])
  assert {k: res[k] for k in want} == want
  assert abs(res["loss"] - loss[valid].mean()) < 1e-6
  acc.reset()
  assert "loss" not in acc.compute()


def test_seg_metrics_add_takes_eval_outputs():
  """`add(out)` with objectives/segmentation.py's eval outputs: counts summed, loss = loss_sum / valid images."""
  rng = np.random.default_rng(6)
  pred, target = rng.integers(0, 3, (2, 5, 8, 8)), rng.integers(0, 3, (2, 5, 8, 8))
  valid = np.array([[True] * 5, [True, True, False, False, False]])
  sm, ref = metrics.SegMetrics(3), metrics.SegMetrics(3)
  for p, t, v, ls in zip(pred, target, valid, (4.0, 1.5)):
    sm.add({"counts": metrics.seg_counts(p, t, 3, v), "loss_sum": np.float32(ls), "count": np.float32(v.sum())})
    ref.update(p, t, v)
  res = sm.compute()
  assert res["dice_per_class"] == ref.compute()["dice_per_class"]
  assert res["loss"] == pytest.approx(5.5 / 7)
  assert "loss" not in ref.compute()
