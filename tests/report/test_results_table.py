"""launch/results_table.py (the README's results tables) on fake pipelines: its numbers against scipy, via its CLI."""
import subprocess
import sys

import numpy as np
import pytest
from test_report import make_pipeline, scipy_paired, scipy_verdict

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def _rows(text: str, title: str) -> list[list[str]]:
  lines = text.splitlines()
  start = next(i for i, l in enumerate(lines) if l.startswith("#### ") and title in l) + 2
  out = []
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    out.append([c.strip() for c in line.strip().strip("|").split("|")])
  return out


@pytest.mark.parametrize("task, metrics", [("classification", ("accuracy", "AUC")), ("segmentation", ("Dice", "IoU"))])
def test_results_table_cli_matches_scipy(tmp_path, sp_stats, task, metrics):
  finals = make_pipeline(tmp_path / "out" / "row", seeds=(0, 1, 2, 3), task=task)
  (tmp_path / "out" / "started" / "seed_0" / "tpp").mkdir(parents=True)  # a pipeline at its first arm: no rows
  r = subprocess.run([sys.executable, str(ROOT / "launch" / "results_table.py"), str(tmp_path / "out")],
                     capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 0, r.stderr
  rows = _rows(r.stdout, "final step")
  assert [row[4] for row in rows] == list(metrics)
  for row, name in zip(rows, metrics):
    key = {"AUC": "auc", "Dice": "dice", "IoU": "iou"}.get(name, name)
    tpp = [finals[(s, "tpp_finetune")]["test"][key] for s in range(4)]
    base = [finals[(s, "baseline")]["test"][key] for s in range(4)]
    mean, lo, hi, p = scipy_paired(sp_stats, tpp, base)
    assert row[3] == "TPP − baseline" and row[5] == "4"
    assert row[6] == f"{np.mean(base):.4f} ± {np.std(base, ddof=1):.4f}"
    assert row[7] == f"{np.mean(tpp):.4f} ± {np.std(tpp, ddof=1):.4f}"
    assert row[8] == f"{mean:+.4f}" and row[9] == f"[{lo:+.4f}, {hi:+.4f}]"
    assert float(row[10]) == pytest.approx(p, rel=1e-2) and row[11] == scipy_verdict(mean, p)
