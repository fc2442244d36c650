"""tpp_jax.stats against scipy (the independent reference): t CDF / quantile, paired t-test p-values and CIs."""
import math
import os

import numpy as np
import pytest

from tpp_jax import stats

from conftest import holm_by_closed_testing

try:
  from scipy import special as sp_special
  from scipy import stats as sp_stats
except ImportError:  # a fresh clone without the test extras
  if os.environ.get("CI", "").lower() == "true":
    raise
  pytest.skip("scipy (the reference for these tests) is not installed: pip install scipy", allow_module_level=True)

RTOL = 1e-6


def rel(a, b) -> float:
  return abs(a - b) / max(abs(b), 1e-300)


def scipy_paired(a, b, level=0.95):
  """(p, ci_low, ci_high) of scipy's paired t-test and t interval."""
  d = np.asarray(a, float) - np.asarray(b, float)
  p = sp_stats.ttest_rel(a, b).pvalue
  lo, hi = sp_stats.t.interval(level, d.size - 1, loc=d.mean(), scale=sp_stats.sem(d))
  return float(p), float(lo), float(hi)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 9, 29, 100, 1000])
def test_t_cdf_and_quantile_match_scipy(df):
  for t in (-40.0, -3.0, -1e-3, 0.0, 0.01, 0.5, 1.0, 2.0, 4.3, 12.7, 100.0, 1e4):
    assert rel(stats.t_cdf(t, df), sp_stats.t.cdf(t, df)) <= RTOL, t
    if t:
      assert rel(stats.t_sf2(t, df), 2 * sp_stats.t.sf(abs(t), df)) <= RTOL, t
  for q in (1e-9, 1e-4, 0.005, 0.025, 0.05, 0.1, 0.3, 0.49, 0.51, 0.7, 0.9, 0.95, 0.975, 0.995, 0.9999):
    assert rel(stats.t_ppf(q, df), sp_stats.t.ppf(q, df)) <= RTOL, q
  assert stats.t_ppf(0.5, df) == 0.0 and stats.t_cdf(0.0, df) == 0.5


def test_betainc_matches_scipy():
  rng = np.random.default_rng(0)
  for _ in range(300):
    a, b = rng.uniform(0.05, 60, 2)
    x = rng.uniform(0, 1)
    assert rel(stats.betainc(a, b, x), sp_special.betainc(a, b, x)) <= RTOL, (a, b, x)
  assert stats.betainc(2.0, 3.0, 0.0) == 0.0 and stats.betainc(2.0, 3.0, 1.0) == 1.0


@pytest.mark.parametrize("n", [2, 3, 5, 10])
@pytest.mark.parametrize("effect", [0.0, 1e-4, 0.01, 0.1, 1.0, 10.0])
def test_paired_t_test_matches_scipy_on_random_data(n, effect):
  rng = np.random.default_rng(1000 * n + int(effect * 1e4))
  for _ in range(10):
    base = rng.uniform(0.4, 0.95, n)
    tpp = base + effect + rng.normal(0, 0.02, n)
    for level in (0.9, 0.95, 0.99):
      r = stats.paired_comparison(tpp, base, level=level)
      p, lo, hi = scipy_paired(tpp, base, level)
      assert r["n"] == n and r["test"] == "paired t-test (two-sided)"
      assert rel(r["mean_diff"], float(np.mean(tpp - base))) <= 1e-12
      assert rel(r["p"], p) <= RTOL and rel(r["ci_low"], lo) <= RTOL and rel(r["ci_high"], hi) <= RTOL
      sig = p < 1 - level
      assert r["verdict"] == ("no detectable difference" if not sig else
                              "TPP better" if np.mean(tpp - base) > 0 else "baseline better")


@pytest.mark.parametrize("tpp, base", [
    ([0.91, 0.72], [0.90, 0.70]),  # n = 2, same sign
    ([0.50, 0.70], [0.60, 0.40]),  # n = 2, opposite signs
    ([0.800001, 0.8000012, 0.8000009], [0.8, 0.8, 0.8]),  # tiny effect, tiny spread: significant
    ([0.9, 0.1, 0.5], [0.1, 0.9, 0.5]),  # mean difference 0
    (list(np.linspace(0.5, 0.9, 10) + 0.3 + 1e-3 * np.sin(np.arange(10))), list(np.linspace(0.5, 0.9, 10))),  # p~1e-15
    ([1e6 + 3, 1e6 + 5, 1e6 + 4.5], [1e6, 1e6 + 1, 1e6 + 2]),  # large values
])
def test_paired_t_test_matches_scipy_on_edge_cases(tpp, base):
  r = stats.paired_comparison(tpp, base)
  p, lo, hi = scipy_paired(tpp, base)
  assert rel(r["p"], p) <= RTOL and rel(r["ci_low"], lo) <= RTOL and rel(r["ci_high"], hi) <= RTOL
  assert r["ci_low"] <= r["mean_diff"] <= r["ci_high"]


def test_verdict_respects_level_and_direction():
  base = np.asarray([0.70, 0.72, 0.74, 0.71, 0.73])
  up = base + np.asarray([0.05, 0.06, 0.04, 0.05, 0.055])
  assert stats.paired_comparison(up, base)["verdict"] == "TPP better"
  assert stats.paired_comparison(base, up)["verdict"] == "baseline better"
  # losses: lower is better, so a lower TPP loss is "TPP better"
  assert stats.paired_comparison(base, up, higher_is_better=False)["verdict"] == "TPP better"
  assert stats.paired_comparison(up, base, higher_is_better=False)["verdict"] == "baseline better"
  # a p between 0.01 and 0.05: significant at 95 %, not at 99 %
  noisy = base + np.asarray([0.02, 0.005, 0.03, 0.01, 0.015])
  p = sp_stats.ttest_rel(noisy, base).pvalue
  assert 0.01 < p < 0.05
  assert stats.paired_comparison(noisy, base, level=0.95)["verdict"] == "TPP better"
  assert stats.paired_comparison(noisy, base, level=0.99)["verdict"] == "no detectable difference"


def test_one_seed_and_missing_values():
  r = stats.paired_comparison([0.8], [0.7])
  assert r["n"] == 1 and r["p"] is None and r["verdict"] == "not enough seeds (n=1)"
  assert r["mean_diff"] == pytest.approx(0.1) and math.isnan(r["ci_low"]) and math.isnan(r["ci_high"])
  assert stats.paired_comparison([], [])["verdict"] == "not enough seeds (n=0)"
  # a pair with a missing value is dropped
  r = stats.paired_comparison([0.8, None, 0.9, 0.85], [0.7, 0.6, float("nan"), 0.8])
  p, lo, hi = scipy_paired([0.8, 0.85], [0.7, 0.8])
  assert r["n"] == 2 and rel(r["p"], p) <= RTOL and rel(r["ci_low"], lo) <= RTOL
  with pytest.raises(ValueError, match="equal lengths"):
    stats.paired_comparison([1, 2, 3], [1, 2])
  with pytest.raises(ValueError, match="method"):
    stats.paired_comparison([1, 2], [1, 2], method="wilcoxon")


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")
def test_zero_variance_is_reported_not_nan():
  r = stats.paired_comparison([0.8, 0.9, 1.0], [0.8, 0.9, 1.0])
  assert (r["mean_diff"], r["ci_low"], r["ci_high"], r["p"]) == (0.0, 0.0, 0.0, 1.0)
  assert r["verdict"] == "no detectable difference" and "zero variance" in r["note"]
  # equal up to float rounding (0.9 - 0.5 != 0.8 - 0.4 in binary): still zero variance, scipy agrees p = 0
  r = stats.paired_comparison([0.9, 0.8, 0.7], [0.5, 0.4, 0.3])
  assert r["p"] == 0.0 and r["ci_low"] == r["ci_high"] == pytest.approx(0.4) and r["verdict"] == "TPP better"
  assert "zero variance" in r["note"]
  assert sp_stats.ttest_rel([0.3, 0.2], [0.5, 0.4]).pvalue == 0.0  # t = -inf: the limit we use
  r = stats.paired_comparison([0.3, 0.2], [0.5, 0.4])
  assert r["p"] == 0.0 and r["verdict"] == "baseline better"
  assert stats.paired_comparison([0.3, 0.2], [0.5, 0.4], higher_is_better=False)["verdict"] == "TPP better"


def test_bootstrap_ci_is_seeded_and_agrees_with_scipy_percentile_bootstrap():
  rng = np.random.default_rng(7)
  base = rng.uniform(0.5, 0.9, 10)
  tpp = base + 0.03 + rng.normal(0, 0.02, 10)
  d = tpp - base
  r = stats.paired_comparison(tpp, base, method="bootstrap", n_boot=20_000, seed=3)
  assert r == stats.paired_comparison(tpp, base, method="bootstrap", n_boot=20_000, seed=3)
  assert r != stats.paired_comparison(tpp, base, method="bootstrap", n_boot=20_000, seed=4)
  assert "bootstrap" in r["test"] and r["n"] == 10 and d.min() <= r["ci_low"] < r["ci_high"] <= d.max()
  ref = sp_stats.bootstrap((d,), np.mean, n_resamples=20_000, method="percentile", confidence_level=0.95,
                           rng=np.random.default_rng(11)).confidence_interval
  # independent Monte-Carlo estimates of the same percentiles: agree to a small fraction of the spread
  assert abs(r["ci_low"] - ref.low) < 0.05 * d.std() and abs(r["ci_high"] - ref.high) < 0.05 * d.std()
  assert r["p"] < 0.05 and r["verdict"] == "TPP better"
  for effect in (0.0, 0.005, 0.01, 0.02, -0.01):  # verdict "no detectable difference" <=> 0 inside the CI
    other = base + effect + rng.normal(0, 0.02, 10)
    b = stats.paired_comparison(other, base, method="bootstrap")
    assert (b["verdict"] == "no detectable difference") == (b["ci_low"] <= 0 <= b["ci_high"]), b
  flat = stats.paired_comparison([0.5, 0.6], [0.5, 0.6], method="bootstrap")
  assert flat["p"] == 1.0 and "zero variance" in flat["note"]


@pytest.mark.parametrize("n", [2, 3, 5, 12])
def test_mean_ci_matches_scipy_t_interval(n):
  vals = np.random.default_rng(n).uniform(0.6, 0.9, n)
  r = stats.mean_ci(list(vals) + [None, float("nan")], level=0.9)  # missing values are dropped
  lo, hi = sp_stats.t.interval(0.9, n - 1, loc=vals.mean(), scale=sp_stats.sem(vals))
  assert r["n"] == n and rel(r["mean"], vals.mean()) < RTOL and rel(r["std"], vals.std(ddof=1)) < RTOL
  assert rel(r["ci_low"], lo) < RTOL and rel(r["ci_high"], hi) < RTOL
  one = stats.mean_ci([0.7])
  assert one["mean"] == 0.7 and one["n"] == 1 and math.isnan(one["ci_low"]) and math.isnan(one["std"])
  assert stats.mean_ci([])["n"] == 0



@pytest.mark.parametrize("seed", range(6))
def test_holm_equals_closed_testing_with_bonferroni(seed):
  rng = np.random.default_rng(seed)
  p = list(rng.uniform(0, 0.2, size=7) ** 2)
  if seed == 0:
    p[3] = p[1]  # ties
  np.testing.assert_allclose(stats.holm(p), holm_by_closed_testing(p), rtol=0, atol=1e-15)


def test_holm_skips_missing_tests():
  # R: p.adjust(c(0.01, 0.04, 0.03, 0.005), "holm") = 0.03 0.06 0.06 0.02
  assert stats.holm([0.01, None, 0.04, 0.03, 0.005]) == pytest.approx([0.03, None, 0.06, 0.06, 0.02])
  assert stats.holm([]) == [] and stats.holm([None]) == [None]
