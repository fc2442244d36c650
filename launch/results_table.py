"""docs/results.md's study tables, from the pipelines `launch/results.sh` wrote.

  python launch/results_table.py [OUT=runs/results]

OUT holds one folder per row: {pn,kv}_lora (TPP 200 steps with the pretext head trained, the baseline, the
compute-matched baseline, both fine-tune arms again on a few of the labels: the smallest fraction < 1 there),
{pn,kv}_frozen (the pretext head frozen) and {pn,kv}_tpp1000 (TPP 1,000 steps); pn = chest X-ray pneumonia (AUC),
kv = Kvasir-SEG (Dice). Printed:

1. The comparisons, test split, for the checkpoint selected by validation and for the final step: per data set the
   paired difference of the primary metric over seeds (mean, 95 % CI, paired t-test p) and the p adjusted with Holm
   over all the table's comparisons (both data sets); the verdict is read from the adjusted p at the 5 % level.
2. The steps each arm trained before patience stopped it (the cap is `steps`).
3. The head start: the best validation metric reached by 25 / 50 / 100 % of the cap (rounded down to an evaluated
   step), TPP against the baseline.

Rows and seeds that are missing are left out (a study still running prints what it has).
"""
from __future__ import annotations

import pathlib
import sys

import numpy as np

from tpp_jax import report, stats

FEW = "few"  # the smallest labelled fraction < 1 a data set's *_lora row ran (FEW in a label: its percent)
DATA = {"pn": ("chest X-ray pneumonia", "auc", "AUC"), "kv": ("Kvasir-SEG polyps", "dice", "Dice")}
# (label, (row, arm, labelled fraction) minus (row, arm, fraction), names of the two sides for the verdict)
COMPARISONS = (
    ("TPP − baseline", ("lora", "tpp_finetune", 1.0), ("lora", "baseline", 1.0), ("TPP", "baseline")),
    ("TPP − compute-matched baseline", ("lora", "tpp_finetune", 1.0), ("lora", "baseline_matched", 1.0),
     ("TPP", "matched baseline")),
    ("TPP (head frozen) − baseline", ("frozen", "tpp_finetune", 1.0), ("lora", "baseline", 1.0), ("TPP", "baseline")),
    ("head frozen − head trained", ("frozen", "tpp_finetune", 1.0), ("lora", "tpp_finetune", 1.0),
     ("frozen head", "trained head")),
    ("TPP 1,000 steps − baseline", ("tpp1000", "tpp_finetune", 1.0), ("lora", "baseline", 1.0), ("TPP", "baseline")),
    ("TPP 1,000 − 200 steps", ("tpp1000", "tpp_finetune", 1.0), ("lora", "tpp_finetune", 1.0),
     ("1,000 steps", "200 steps")),
    ("FEW labels: TPP − baseline", ("lora", "tpp_finetune", FEW), ("lora", "baseline", FEW), ("TPP", "baseline")),
)
ARMS = (("baseline", ("lora", "baseline", 1.0)),
        ("compute-matched baseline", ("lora", "baseline_matched", 1.0)),
        ("TPP 200, head trained", ("lora", "tpp_finetune", 1.0)),
        ("TPP 200, head frozen", ("frozen", "tpp_finetune", 1.0)),
        ("TPP 1,000, head trained", ("tpp1000", "tpp_finetune", 1.0)),
        ("FEW labels: baseline", ("lora", "baseline", FEW)),
        ("FEW labels: TPP 200", ("lora", "tpp_finetune", FEW)))


def _ms(values) -> str:
  v = np.asarray(list(values), float)
  return f"{v.mean():.4f} ± {v.std(ddof=1):.4f}" if v.size > 1 else (f"{v[0]:.4f}" if v.size else "n/a")


def load(out: pathlib.Path) -> dict:
  """{(data, row): records} of the row folders present under OUT."""
  found = {}
  for data in DATA:
    for row in ("lora", "frozen", "tpp1000"):
      folder = out / f"{data}_{row}"
      if folder.is_dir():
        found[(data, row)] = report.collect([folder])
  return found


def few(found: dict, data: str) -> float | None:
  fractions = [r["fraction"] for r in found.get((data, "lora"), []) if r["fraction"] < 1]
  return min(fractions) if fractions else None


def _label(found: dict, data: str, label: str) -> str:
  return label.replace("FEW", f"{100 * (few(found, data) or 0):g} %")


def runs(found: dict, data: str, side: tuple) -> dict:
  """{seed: record} of one arm (row, arm, fraction) of a data set."""
  row, arm, fraction = side
  if fraction == FEW:
    fraction = few(found, data)
  return {r["seed"]: r for r in found.get((data, row), []) if r["arm"] == arm and r["fraction"] == fraction}


def comparisons(found: dict, source: str) -> list[dict]:
  """Every comparison with both sides present: paired over the seeds both have, Holm-adjusted over the list."""
  out = []
  for data, (_, key, _) in DATA.items():
    for label, a_side, b_side, names in COMPARISONS:
      a, b = runs(found, data, a_side), runs(found, data, b_side)
      seeds = sorted(s for s in set(a) & set(b) if key in a[s][source].get("test", {})
                     and key in b[s][source].get("test", {}))
      if len(seeds) < 2:
        continue
      av = [a[s][source]["test"][key] for s in seeds]
      bv = [b[s][source]["test"][key] for s in seeds]
      out.append({"data": data, "label": _label(found, data, label), "names": names, "a": av, "b": bv,
                  **stats.paired_comparison(av, bv)})
  for c, adjusted in zip(out, stats.holm([c["p"] for c in out])):
    c["p_holm"] = adjusted
  return out


def _verdict(c: dict) -> str:
  if c["p_holm"] is None or not c["p_holm"] < 0.05 or c["mean_diff"] == 0:
    return "no detectable difference"
  return f"{c['names'][0] if c['mean_diff'] > 0 else c['names'][1]} better"


def comparison_table(found: dict, source: str) -> str:
  lines = ["| data | comparison | metric | n | first | second | difference | 95% CI | p | Holm p | verdict |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
  for c in comparisons(found, source):
    name, _, metric = DATA[c["data"]]
    lines.append(f"| {name} | {c['label']} | {metric} | {c['n']} | {_ms(c['a'])} | {_ms(c['b'])} | "
                 f"{c['mean_diff']:+.4f} | [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] | {c['p']:.3g} | "
                 f"{c['p_holm']:.3g} | {_verdict(c)} |")
  return "\n".join(lines)


def _trained(r: dict) -> int:
  return int(r["converged_at"] or r["steps"])


def steps_table(found: dict) -> str:
  lines = ["| data | arm | n | steps trained: mean | min – max | stopped by patience |",
           "|---|---|---:|---:|---:|---:|"]
  for data, (name, _, _) in DATA.items():
    for label, side in ARMS:
      group = list(runs(found, data, side).values())
      if group:
        steps = [_trained(r) for r in group]
        stopped = sum(r["converged_at"] is not None for r in group)
        lines.append(f"| {name} | {_label(found, data, label)} | {len(group)} | {np.mean(steps):.0f} | "
                     f"{min(steps)} – {max(steps)} | "
                     f"{stopped} of {len(group)} |")
  return "\n".join(lines)


def best_by(r: dict, key: str, step: int) -> float | None:
  """The best validation metric reached by `step` (the checkpoint a run stopped there would keep)."""
  values = [row[key] for row in r["rows"] if row.get("split") == "val" and key in row and row["step"] <= step]
  return max(values) if values else None


def head_start_table(found: dict) -> str:
  lines = ["| data | TPP arm | n | by step | baseline | TPP | difference | p |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
  for data, (name, key, metric) in DATA.items():
    base = runs(found, data, ("lora", "baseline", 1.0))
    for label, side in ARMS[2:5]:
      tpp = runs(found, data, side)
      seeds = sorted(set(base) & set(tpp))
      if len(seeds) < 2:
        continue
      cfg = base[seeds[0]]["config"]
      cap, every = int(cfg["steps"]), int(cfg.get("eval_every") or 1)
      for step in sorted({max(every, f * cap // 4 // every * every) for f in (1, 2, 4)}):  # evaluated steps
        bv = [best_by(base[s], key, step) for s in seeds]
        tv = [best_by(tpp[s], key, step) for s in seeds]
        c = stats.paired_comparison(tv, bv)
        if c["n"] < 2:  # no evaluation by then
          continue
        p = "n/a" if c["p"] is None else f"{c['p']:.3g}"
        cells = " | ".join(_ms(v for v in vs if v is not None) for vs in (bv, tv))
        lines.append(f"| {name} ({metric}, val) | {label} | {c['n']} | {step} | {cells} | {c['mean_diff']:+.4f} | "
                     f"{p} |")
  return "\n".join(lines)


def main(argv=None):
  out = pathlib.Path((argv or sys.argv[1:] or ["runs/results"])[0])
  found = load(out)
  for source, title in (("best_final", "checkpoint selected by validation"), ("final", "final step")):
    print(f"\n#### Test split, {title}\n\n{comparison_table(found, source)}")
  print("\n_paired t-test over seeds (two-sided); Holm p: adjusted over all the comparisons of the table; verdict at "
        "the 5 % level of the adjusted p; first / second: mean ± std over seeds of the two sides._")
  print(f"\n#### Steps trained (pipeline.budget=converged)\n\n{steps_table(found)}")
  print(f"\n#### Head start: best validation metric by 25 / 50 / 100 % of the cap\n\n{head_start_table(found)}")
  print("\n_p: paired t-test over seeds, not adjusted (descriptive)._")


if __name__ == "__main__":
  main()
