"""Paired statistics of TPP vs baseline over seeds: paired t-test (or bootstrap) with a confidence interval.

Only numpy and the standard library (no scipy, no JAX): the Student-t CDF comes from the regularised incomplete
beta function (Lentz continued fraction), its quantile from a bracketed Newton solve.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

VERDICTS = ("TPP better", "no detectable difference", "baseline better")
_EPS = 1e-16
_TINY = 1e-300


def _betacf(a: float, b: float, x: float) -> float:
  """Continued fraction of I_x(a, b) (modified Lentz); converges fast for x < (a + 1) / (a + b + 2)."""
  qab, qap, qam = a + b, a + 1.0, a - 1.0
  c, d = 1.0, 1.0 - qab * x / qap
  d = 1.0 / (d if abs(d) > _TINY else _TINY)
  h = d
  for m in range(1, 100_000):
    m2 = 2 * m
    for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
      d = 1.0 + num * d
      d = 1.0 / (d if abs(d) > _TINY else _TINY)
      c = 1.0 + num / c
      c = c if abs(c) > _TINY else _TINY
      delta = d * c
      h *= delta
    if abs(delta - 1.0) < _EPS:
      return h
  raise ArithmeticError(f"incomplete beta: no convergence for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float, xc: float | None = None) -> float:
  """Regularised incomplete beta I_x(a, b); `xc` = 1 - x given exactly avoids cancellation near x = 1."""
  xc = 1.0 - x if xc is None else xc
  if x <= 0.0:
    return 0.0
  if xc <= 0.0:
    return 1.0
  log_front = a * math.log(x) + b * math.log(xc) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
  if x < (a + 1.0) / (a + b + 2.0):
    return math.exp(log_front) * _betacf(a, b, x) / a
  return 1.0 - math.exp(log_front) * _betacf(b, a, xc) / b


def t_sf2(t: float, df: float) -> float:
  """Two-sided tail P(|T| >= |t|) of Student's t with `df` degrees of freedom."""
  t = abs(float(t))
  if math.isnan(t):
    return math.nan
  if math.isinf(t):
    return 0.0
  if t == 0.0:
    return 1.0
  r = df / (t * t)  # x = df / (df + t^2) = r / (1 + r); 1 - x = 1 / (1 + r)
  return betainc(df / 2.0, 0.5, r / (1.0 + r), 1.0 / (1.0 + r))


def t_cdf(t: float, df: float) -> float:
  """P(T <= t), Student's t with `df` degrees of freedom."""
  half = 0.5 * t_sf2(t, df)
  return half if t < 0 else 1.0 - half


def _t_logpdf(t: float, df: float) -> float:
  return (math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
          - (df + 1) / 2 * math.log1p(t * t / df))


def t_isf(p: float, df: float) -> float:
  """Upper quantile: the t > 0 with P(T >= t) = p (0 < p <= 0.5), by bracketed Newton on the tail."""
  if not 0.0 < p <= 0.5:
    raise ValueError(f"t_isf needs 0 < p <= 0.5, got {p}")
  if p == 0.5:
    return 0.0
  tail = lambda t: 0.5 * t_sf2(t, df)  # noqa: E731
  lo, hi = 0.0, 1.0
  while tail(hi) > p:
    lo, hi = hi, 2.0 * hi
  t = 0.5 * (lo + hi)
  for _ in range(200):
    f = tail(t) - p
    if f > 0:
      lo = t
    else:
      hi = t
    step = f / math.exp(_t_logpdf(t, df))  # d(tail)/dt = -pdf
    new = t + step
    if not lo < new < hi:
      new = 0.5 * (lo + hi)
    if abs(new - t) <= 4 * _EPS * abs(new) or hi - lo <= 4 * _EPS * hi:
      return new
    t = new
  return t


def t_ppf(q: float, df: float) -> float:
  """Quantile of Student's t: the t with P(T <= t) = q, 0 < q < 1."""
  if not 0.0 < q < 1.0:
    raise ValueError(f"t_ppf needs 0 < q < 1, got {q}")
  return -t_isf(q, df) if q < 0.5 else t_isf(1.0 - q, df)


def _verdict(mean: float, p: float, level: float, higher_is_better: bool) -> str:
  if not p < 1.0 - level or mean == 0:
    return VERDICTS[1]
  return VERDICTS[0] if (mean > 0) == higher_is_better else VERDICTS[2]


def paired_comparison(tpp: Sequence[float], baseline: Sequence[float], level: float = 0.95,
                      higher_is_better: bool = True, method: str = "t", n_boot: int = 10_000,
                      seed: int = 0) -> dict:
  """Paired comparison of TPP vs baseline values of one metric, one pair per seed (same order).

  Args:
    tpp, baseline: per-seed values; pairs where either is None / non-finite are dropped.
    level: confidence level of the interval; the verdict is significant when p < 1 - level.
    higher_is_better: False for losses (then a negative TPP − baseline difference is "TPP better").
    method: 't' (paired t-test, two-sided, t-based CI) or 'bootstrap' (percentile CI of the mean difference
      from `n_boot` resamples of the seeds with numpy's generator seeded by `seed`; two-sided bootstrap p).

  Returns:
    dict(mean_diff, ci_low, ci_high, p, n, verdict, test, level, higher_is_better, note): mean_diff is the mean
    of TPP − baseline; n the number of pairs. n < 2: CI NaN, p None, verdict 'not enough seeds (n=N)'. All
    differences equal up to rounding (zero variance): CI = [d, d], p = 1 if d == 0 else 0, and `note` says so.
  """
  if method not in ("t", "bootstrap"):
    raise ValueError(f"method must be 't' or 'bootstrap', got {method!r}")
  if not 0.0 < level < 1.0:
    raise ValueError(f"level must be in (0, 1), got {level}")
  a = np.asarray([np.nan if v is None else float(v) for v in tpp], float)
  b = np.asarray([np.nan if v is None else float(v) for v in baseline], float)
  if a.shape != b.shape:
    raise ValueError(f"paired values need equal lengths, got {a.size} TPP and {b.size} baseline values")
  ok = np.isfinite(a) & np.isfinite(b)
  a, b = a[ok], b[ok]
  d = a - b
  n = int(d.size)
  test = ("paired t-test (two-sided)" if method == "t"
          else f"paired bootstrap (percentile CI, {n_boot} resamples, seed {seed}; two-sided)")
  out = {"mean_diff": float(d.mean()) if n else math.nan, "ci_low": math.nan, "ci_high": math.nan, "p": None,
         "n": n, "verdict": f"not enough seeds (n={n})", "test": test, "level": level,
         "higher_is_better": higher_is_better, "note": ""}
  if n < 2:
    return out
  mean = out["mean_diff"]
  tol = 8 * np.finfo(float).eps * max(float(np.abs(a).max()), float(np.abs(b).max()))
  if np.ptp(d) <= tol:  # all differences equal up to the rounding of a - b: zero variance, no t statistic
    zero = abs(mean) <= tol
    mean = out["mean_diff"] = 0.0 if zero else mean
    out.update(ci_low=mean, ci_high=mean, p=1.0 if zero else 0.0,
               note=f"all {n} paired differences are equal{' to 0' if zero else ''} (zero variance): "
               "the test is degenerate (p = 1 for no difference, 0 otherwise)")
  elif method == "t":
    se = float(d.std(ddof=1)) / math.sqrt(n)
    half = t_isf((1.0 - level) / 2.0, n - 1) * se
    out.update(ci_low=mean - half, ci_high=mean + half, p=t_sf2(mean / se, n - 1))
  else:
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    means = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    below, above = (np.sum(means <= 0) + 1) / (n_boot + 1), (np.sum(means >= 0) + 1) / (n_boot + 1)
    out.update(ci_low=float(lo), ci_high=float(hi), p=float(min(1.0, 2.0 * min(below, above))))
  out["verdict"] = _verdict(mean, out["p"], level, higher_is_better)
  return out


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict:
  """Mean of one arm's per-seed values with its t-based confidence interval (the band of a plot).

  Returns:
    dict(mean, std, ci_low, ci_high, n); None / non-finite values are dropped. n = 0: mean NaN; n < 2: the
    interval is NaN; std is ddof=1.
  """
  if not 0.0 < level < 1.0:
    raise ValueError(f"level must be in (0, 1), got {level}")
  a = np.asarray([np.nan if v is None else float(v) for v in values], float)
  a = a[np.isfinite(a)]
  n = int(a.size)
  out = {"mean": float(a.mean()) if n else math.nan, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan,
         "n": n}
  if n >= 2:
    sd = float(a.std(ddof=1))
    half = t_isf((1.0 - level) / 2.0, n - 1) * sd / math.sqrt(n)
    out.update(std=sd, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
  return out


def holm(p_values: Sequence[float | None]) -> list[float | None]:
  """Holm's step-down adjusted p-values (family-wise error control over all the tests given).

  The i-th smallest of m p-values becomes max over j <= i of min(1, (m - j + 1) * p_(j)); a test is rejected at
  level a when its adjusted p < a. None (a test that could not run) stays None and does not count in m.
  """
  idx = [i for i, p in enumerate(p_values) if p is not None]
  m = len(idx)
  out: list[float | None] = [None] * len(p_values)
  running = 0.0
  for rank, i in enumerate(sorted(idx, key=lambda i: p_values[i])):
    running = max(running, min(1.0, (m - rank) * float(p_values[i])))
    out[i] = running
  return out
