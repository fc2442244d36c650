"""launch/results_table.py (docs/results.md's study tables) on a fake study: numbers against scipy, Holm against
closed testing, via its CLI."""
import json
import subprocess
import sys

import numpy as np
import pytest
from test_report import make_run

from conftest import holm_by_closed_testing

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
SEEDS = (0, 1, 2, 3)
# (row, arm folder, labelled fraction) of the study, as launch/results.sh lays it out
ARMS = (("lora", "tpp", 1.0), ("lora", "tpp_finetune", 1.0), ("lora", "baseline", 1.0),
        ("lora", "baseline_matched", 1.0), ("lora", "frac_0.05/tpp_finetune", 0.05),
        ("lora", "frac_0.05/baseline", 0.05), ("frozen", "tpp_finetune", 1.0), ("tpp1000", "tpp_finetune", 1.0))


def _study(out):
  """Fake pipelines pn_* (classification) and kv_* (segmentation); returns {(data, row, arm, seed): run folder}."""
  rng = np.random.default_rng(7)
  runs = {}
  for data, task in (("pn", "classification"), ("kv", "segmentation")):
    for row, arm, fraction in ARMS:
      for s in SEEDS:
        path = out / f"{data}_{row}" / f"seed_{s}" / arm
        make_run(path, "tpp" if arm == "tpp" else "finetune", s, task, rng=rng)
        summary = json.loads((path / "summary.json").read_text())
        summary["best_final"] = {"test": {k: float(rng.uniform(0.5, 0.9)) for k in ("auc", "dice")}}
        summary["converged_at"] = 10 if (s == 1 and arm == "baseline") else None
        (path / "summary.json").write_text(json.dumps(summary))
        cfg = json.loads((path / "config.json").read_text())
        cfg["data"]["label_fraction"] = fraction
        (path / "config.json").write_text(json.dumps(cfg))
        runs[(data, row, arm.split("/")[-1] if fraction == 1.0 else arm, s)] = path
  return runs


def _table(text: str, title: str) -> list[list[str]]:
  lines = text.splitlines()
  start = next(i for i, l in enumerate(lines) if l.startswith("#### ") and title in l) + 2
  out = []
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    out.append([c.strip() for c in line.strip().strip("|").split("|")])
  return out


def _value(path, source, key):
  return json.loads((path / "summary.json").read_text())[source]["test"][key]


@pytest.mark.parametrize("source, title", [("best_final", "selected by validation"), ("final", "final step")])
def test_study_table_matches_scipy_and_closed_testing(tmp_path, sp_stats, source, title):
  runs = _study(tmp_path / "out")
  r = subprocess.run([sys.executable, str(ROOT / "launch" / "results_table.py"), str(tmp_path / "out")],
                     capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 0, r.stderr
  rows = _table(r.stdout, title)
  sides = {"TPP − baseline": (("lora", "tpp_finetune"), ("lora", "baseline")),
           "TPP − compute-matched baseline": (("lora", "tpp_finetune"), ("lora", "baseline_matched")),
           "TPP (head frozen) − baseline": (("frozen", "tpp_finetune"), ("lora", "baseline")),
           "head frozen − head trained": (("frozen", "tpp_finetune"), ("lora", "tpp_finetune")),
           "TPP 1,000 steps − baseline": (("tpp1000", "tpp_finetune"), ("lora", "baseline")),
           "TPP 1,000 − 200 steps": (("tpp1000", "tpp_finetune"), ("lora", "tpp_finetune")),
           "5 % labels: TPP − baseline": (("lora", "frac_0.05/tpp_finetune"), ("lora", "frac_0.05/baseline"))}
  assert [row[1] for row in rows] == list(sides) * 2 and len(rows) == 14
  expected = []
  for row in rows:
    data, key = ("pn", "auc") if row[2] == "AUC" else ("kv", "dice")
    (ra, aa), (rb, ab) = sides[row[1]]
    a = [_value(runs[(data, ra, aa, s)], source, key) for s in SEEDS]
    b = [_value(runs[(data, rb, ab, s)], source, key) for s in SEEDS]
    d = np.subtract(a, b)
    lo, hi = sp_stats.t.interval(0.95, d.size - 1, loc=d.mean(), scale=sp_stats.sem(d))
    expected.append(sp_stats.ttest_rel(a, b).pvalue)
    assert row[3] == "4" and row[4] == f"{np.mean(a):.4f} ± {np.std(a, ddof=1):.4f}"
    assert row[6] == f"{d.mean():+.4f}" and row[7] == f"[{lo:+.4f}, {hi:+.4f}]"
    assert float(row[8]) == pytest.approx(expected[-1], rel=2e-3)
  for row, p_holm in zip(rows, holm_by_closed_testing(expected)):
    assert float(row[9]) == pytest.approx(p_holm, rel=2e-3)
    assert (row[10] == "no detectable difference") == (p_holm >= 0.05)


def test_study_steps_and_head_start(tmp_path):
  runs = _study(tmp_path / "out")
  r = subprocess.run([sys.executable, str(ROOT / "launch" / "results_table.py"), str(tmp_path / "out")],
                     capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 0, r.stderr
  steps = {(row[0], row[1]): row for row in _table(r.stdout, "Steps trained")}
  # seed 1's baseline stopped at 10 by patience, the others ran their 20 steps
  assert steps[("chest X-ray pneumonia", "baseline")][2:] == ["4", f"{np.mean([20, 10, 20, 20]):.0f}", "10 – 20",
                                                            "1 of 4"]
  assert steps[("Kvasir-SEG polyps", "TPP 1,000, head trained")][2:] == ["4", "20", "20 – 20", "0 of 4"]
  head = _table(r.stdout, "Head start")
  # by step 5 (a quarter of the 20-step cap) no run has evaluated yet: no row; 10 and 20 for each data set and arm
  assert [row[3] for row in head] == ["10", "20"] * 6
  by_20 = next(row for row in head if row[0].startswith("Kvasir") and row[1] == "TPP 200, head frozen"
               and row[3] == "20")

  def best(path):  # the best validation Dice of the run's metrics.jsonl
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return max(x["dice"] for x in rows if x["split"] == "val")
  base = [best(runs[("kv", "lora", "baseline", s)]) for s in SEEDS]
  tpp = [best(runs[("kv", "frozen", "tpp_finetune", s)]) for s in SEEDS]
  assert by_20[4] == f"{np.mean(base):.4f} ± {np.std(base, ddof=1):.4f}"
  assert by_20[6] == f"{np.mean(tpp) - np.mean(base):+.4f}"


def test_study_table_prints_what_a_running_study_has(tmp_path):
  (tmp_path / "out" / "pn_lora" / "seed_0" / "tpp").mkdir(parents=True)  # a study at its first arm
  r = subprocess.run([sys.executable, str(ROOT / "launch" / "results_table.py"), str(tmp_path / "out")],
                     capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 0, r.stderr
  assert _table(r.stdout, "final step") == [] and _table(r.stdout, "Steps trained") == []
