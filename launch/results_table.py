"""The README's results tables, from the pipelines `launch/results.sh` wrote: one Markdown table per checkpoint.

  python launch/results_table.py [OUT=runs/results]

Every pipeline folder under OUT (one with seed_*/ arms) gives one block of rows: data (test split size), PEFT,
TPP pretext, metric, both arms' mean ± std over seeds, the paired TPP − baseline difference with its 95% CI, the
paired t-test p and the verdict, all from `tpp_jax.report` (the same numbers as each folder's report.md and
comparison.json). Rows for `TPP − baseline_matched` follow when the pipeline ran pipeline.compute_matched, and the
linear-probe / full fine-tune brackets (pipeline.brackets) get their own table. Test split only.
"""
from __future__ import annotations

import pathlib
import sys

import numpy as np

from tpp_jax import report

METRICS = {"classification": ("accuracy", "auc"), "segmentation": ("dice", "iou")}
NAMES = {"accuracy": "accuracy", "auc": "AUC", "dice": "Dice", "iou": "IoU", "balanced_accuracy": "balanced acc.",
         "macro_f1": "macro-F1"}
PEFT = {"lora": "LoRA r=8 q,v", "adapter": "adapter d=8"}


def _ms(values) -> str:
  v = np.asarray(values, float)
  return f"{v.mean():.4f} ± {v.std(ddof=1):.4f}" if v.size > 1 else (f"{v[0]:.4f}" if v.size else "n/a")


DATA = {"pneumonia_cxr_128.npz": "chest X-ray pneumonia (624)", "kvasir_seg_256": "Kvasir-SEG polyps (80)",
        "demo_cxr_64.npz": "demo chest X-ray (624)"}


def _data_name(records) -> str:
  path = pathlib.Path(str(report._get(records[0]["config"], "data.path", ""))).name
  return DATA.get(path, path)


def pipelines(out: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in out.iterdir() if p.is_dir() and any(p.glob("seed_*")))


def paired_rows(run_dir: pathlib.Path, source: str) -> list[str]:
  records = report.collect([run_dir])
  if not records:  # a pipeline still at its first arm
    return []
  pretext = next((r["pretext"] for r in records if r["role"] == "tpp"), "")
  data = _data_name([r for r in records if r["role"] != "tpp"] or records)
  rows = []
  for c in report.paired_comparisons(records, "test", 0.95, source):
    if c["metric"] not in METRICS[c["task"]] or c["fraction"] != 1.0:
      continue
    ci = "n/a" if c["ci_low"] is None else f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]"
    p = "n/a" if c["p"] is None else f"{c['p']:.3g}"
    diff = "n/a" if c["mean_diff"] is None else f"{c['mean_diff']:+.4f}"
    name = pretext if pretext == "contrastive" else pretext.upper()
    rows.append(f"| {data} | {PEFT.get(c['peft'], c['peft'])} | {name} | {c['comparison']} | {NAMES[c['metric']]} | "
                f"{c['n']} | {_ms(c['baseline_values'])} | "
                f"{_ms(c['tpp_values'])} | {diff} | {ci} | {p} | {c['verdict']} |")
  return rows


def bracket_rows(run_dir: pathlib.Path) -> list[str]:
  records = report.collect([run_dir])
  if not records:
    return []
  data = _data_name([r for r in records if r["role"] != "tpp"] or records)
  rows = []
  for arm in ("linear", "baseline", "baseline_matched", "tpp_finetune", "full"):
    runs = [r for r in records if r["arm"] == arm and r["fraction"] == 1.0]
    if not runs or not any(r["arm"] in ("linear", "full") for r in records):
      continue
    task = runs[0]["task"]
    cells = [_ms([r["final"]["test"][k] for r in runs if k in r["final"].get("test", {})]) for k in METRICS[task]]
    rows.append(f"| {data} | {arm} | {len(runs)} | " + " | ".join(cells) + " |")
  return rows


def main(argv=None):
  out = pathlib.Path((argv or sys.argv[1:] or ["runs/results"])[0])
  head = ("| data (test images) | PEFT | pretext | comparison | metric | n | baseline | TPP → fine-tune | difference | "
          "95% CI | p | verdict |\n|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|")
  for source, title in (("final", "final step"), ("best_final", "checkpoint selected by validation")):
    print(f"\n#### Test split, {title}\n\n{head}")
    print("\n".join(row for d in pipelines(out) for row in paired_rows(d, source)))
  brackets = [row for d in pipelines(out) for row in bracket_rows(d)]
  if brackets:
    print("\n#### Brackets: linear probe and full fine-tune beside the PEFT arms (test split, final step)\n\n"
          "| data (test images) | arm | n | accuracy / Dice | AUC / IoU |\n|---|---|---:|---:|---:|")
    print("\n".join(brackets))
  print("\n_paired t-test over seeds, two-sided, 95 % level (tpp_jax.report); mean ± std over seeds._")


if __name__ == "__main__":
  main()
