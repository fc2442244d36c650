"""Label efficiency (pipeline.label_fractions) and the compute-matched baseline (pipeline.compute_matched)."""
import json
import pathlib

import numpy as np
import pytest

from tpp_jax import build as build_lib
from tpp_jax import config as config_lib
from tpp_jax import pipeline, report
from tpp_jax.data import pipeline as data_pipeline

from conftest import SMOKE_PIPELINE_ARG, load_config

ARGS = SMOKE_PIPELINE_ARG  # label fractions (0.25, 1.0), the compute-matched baseline and the brackets
FT_ARMS = ("tpp_finetune", "baseline", "baseline_matched", "linear", "full")


class _Labels:
  """A random-access classification source of labels only."""

  def __init__(self, labels):
    self.labels = np.asarray(labels, np.int32)

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    return {"label": self.labels[i]}


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.5, 1.0])
def test_stratified_subset_keeps_class_proportions(fraction):
  counts = [400, 37, 1, 120, 3]
  labels = np.random.default_rng(1).permutation(np.repeat(np.arange(len(counts)), counts))
  src = _Labels(labels)
  sub = data_pipeline.stratified_subset(src, fraction, seed=3)
  idx = sub.indices
  assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < len(src)  # sorted, unique, inside
  got = np.bincount(labels[idx], minlength=len(counts))
  for n_c, k in zip(counts, got):
    assert k >= 1 and abs(k - fraction * n_c) <= 1, (fraction, n_c, k)
  assert abs(len(sub) - fraction * len(labels)) <= len(counts)
  np.testing.assert_array_equal(sub.labels, labels[idx])  # class weights / balanced sampling see the subset
  again = data_pipeline.stratified_subset(src, fraction, seed=3)
  np.testing.assert_array_equal(again.indices, idx)  # the same (fraction, seed): the same examples
  if fraction < 1.0:
    other = data_pipeline.stratified_subset(src, fraction, seed=4)
    assert not np.array_equal(other.indices, idx)
    bigger = data_pipeline.stratified_subset(src, min(1.0, 2 * fraction), seed=3)
    assert set(idx) <= set(bigger.indices)  # one seed's subsets are nested
  with pytest.raises(ValueError, match=r"data.label_fraction=1.5 must be in \(0, 1\]"):
    data_pipeline.stratified_subset(src, 1.5, seed=0)


def test_every_arm_of_a_fraction_trains_on_the_same_train_subset(tmp_path):
  c = load_config("default", ARGS)
  c.data.update(max_train_examples=0, max_eval_examples=0)
  full = build_lib.build_sources(c)  # stage pipeline: no subset
  arms = pipeline.arm_configs(c, 0, tmp_path)
  assert list(arms) == ["tpp", *FT_ARMS, *(f"frac_0.25/{a}" for a in FT_ARMS)]
  assert arms["frac_0.25/tpp_finetune"].target_init == str(tmp_path / "seed_0" / "tpp")  # one TPP arm per seed
  assert arms["baseline_matched"].steps == arms["frac_0.25/baseline_matched"].steps == c.steps + c.pipeline.tpp_steps
  assert arms["baseline"].steps == c.steps and not arms["frac_0.25/baseline_matched"].target_init
  assert len(build_lib.build_sources(arms["tpp"])["train"]) == len(full["train"])  # TPP: every training image
  subsets = [build_lib.build_sources(arms[f"frac_0.25/{a}"]) for a in FT_ARMS]
  train_labels = np.asarray(full["train"].labels)
  for s in subsets:
    np.testing.assert_array_equal(s["train"].indices, subsets[0]["train"].indices)
    assert s["train"].source.split == "train" and len(s["val"]) == len(full["val"])  # a subset of train only
    np.testing.assert_array_equal(s["train"].labels, train_labels[s["train"].indices])
    assert abs(len(s["train"]) - 0.25 * len(full["train"])) <= 1
  for a in FT_ARMS:
    assert len(build_lib.build_sources(arms[a])["train"]) == len(full["train"])
  seed1 = build_lib.build_sources(pipeline.arm_configs(c, 1, tmp_path)["frac_0.25/baseline"])["train"]
  assert not np.array_equal(seed1.indices, subsets[0]["train"].indices)


@pytest.mark.parametrize("arg, match", [
    ("pipeline.label_fractions=(0.0,1.0)", r"pipeline.label_fractions=\(0.0, 1.0\): \[0.0\] not in \(0, 1\]"),
    ("pipeline.label_fractions=(0.2,0.2)", r"lists \[0.2\] more than once"),
    ("pipeline.label_fractions=()", r"must be a non-empty tuple"),
    ("data.label_fraction=0.5", r"set pipeline.label_fractions=\(0.5, 1.0\) instead"),
    ("stage=finetune,data.label_fraction=1.5", r"data.label_fraction=1.5 must be a number in \(0, 1\]"),
])
def test_bad_fractions_are_refused_with_the_fix(arg, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(load_config("default", arg))


def test_cli_pipeline_with_label_fractions_and_compute_matched_baseline(smoke_pipeline):
  """The shared smoke pipeline (conftest.SMOKE_PIPELINE_ARG, through the CLI): every fine-tune arm once per label
  fraction on the same stratified subset, one TPP arm per seed on every training image, baseline_matched trained
  tpp_steps + steps, and the report's label-efficiency section. (Its rerun finding every arm finished:
  tests/test_pipeline.py.)"""
  wd = smoke_pipeline
  seed = wd / "seed_0"
  assert sorted(p.name for p in seed.iterdir()) == sorted(["tpp", *FT_ARMS, "frac_0.25"])
  assert sorted(p.name for p in (seed / "frac_0.25").iterdir()) == sorted(FT_ARMS)
  s = {a: json.loads((seed / a / "summary.json").read_text()) for a in ("tpp", *FT_ARMS)}
  s.update({f"frac/{a}": json.loads((seed / "frac_0.25" / a / "summary.json").read_text()) for a in FT_ARMS})
  c = load_config("default", ARGS)
  full = build_lib.build_sources(c)["train"]  # max_train_examples=128 of the demo set
  want = len(data_pipeline.stratified_subset(full, 0.25, 0))
  assert want == 32
  assert s["tpp"]["data"]["train_examples"] == len(full) == 128  # TPP: every training image, once per seed
  for a in FT_ARMS:
    assert s[a]["data"]["train_examples"] == 128 and s[a]["config"]["data"]["label_fraction"] == 1.0
    frac = s[f"frac/{a}"]
    assert frac["data"]["train_examples"] == want and frac["config"]["data"]["label_fraction"] == 0.25
  for k in ("tpp_finetune", "frac/tpp_finetune"):
    assert s[k]["target_init"]["path"] == str(seed / "tpp")  # the shared TPP arm
  for k in ("baseline", "baseline_matched", "frac/baseline", "frac/baseline_matched"):
    assert s[k]["target_init"] is None
  matched = c.pipeline.tpp_steps + c.steps
  for k in ("baseline_matched", "frac/baseline_matched"):
    assert s[k]["steps"] == matched == 8
  rows = [json.loads(l) for l in (seed / "baseline_matched" / "metrics.jsonl").read_text().splitlines()]
  assert max(row["step"] for row in rows if row["split"] == "train") == matched
  assert s["baseline"]["steps"] == s["frac/baseline"]["steps"] == c.steps

  md = (wd / "report.md").read_text()
  section = md.split("## Label efficiency")[1].split("\n## ")[0]
  assert "| labels | train examples | comparison | n | `tpp_finetune` | compared arm | TPP − baseline |" in section
  for frac, n in (("25%", "32"), ("100%", "128")):
    for comp in ("TPP − baseline", "TPP − baseline_matched"):
      assert f"| {frac} | {n} | **{comp}** | 1 |" in section, section
  assert "![label efficiency](label_efficiency.png)" in md
  assert (wd / "label_efficiency.png").stat().st_size > 1000
  data = json.loads((wd / "comparison.json").read_text())
  assert data["label_fractions"] == [0.25, 1.0]
  assert {(e["fraction"], e["baseline"]) for e in data["label_efficiency"]["test"]} == {
      (f, b) for f in (0.25, 1.0) for b in ("baseline", "baseline_matched")}


# ------------------------------------------------------------------------------------------------
# The report's label-efficiency table from fixed fake summaries.



FRACS = {0.1: 40, 1.0: 400}
FAKE_ARMS = ("tpp_finetune", "baseline", "baseline_matched")
AUC = {  # (fraction, arm): per-seed test auc
    (0.1, "tpp_finetune"): [0.81, 0.78, 0.84, 0.80], (0.1, "baseline"): [0.70, 0.74, 0.71, 0.69],
    (0.1, "baseline_matched"): [0.72, 0.73, 0.75, 0.70],
    (1.0, "tpp_finetune"): [0.90, 0.91, 0.89, 0.93], (1.0, "baseline"): [0.91, 0.90, 0.88, 0.92],
    (1.0, "baseline_matched"): [0.92, 0.89, 0.90, 0.91]}


def _fake_run(path: pathlib.Path, arm: str, seed: int, fraction: float):
  stage = "tpp" if arm == "tpp" else "finetune"
  steps = {"tpp": 10, "baseline_matched": 30}.get(arm, 20)
  cfg = {"stage": stage, "seed": seed, "steps": steps, "peft": {"type": "lora"}, "task": {"type": "classification"},
         "pretext": {"type": "mae"}, "data": {"label_fraction": fraction if stage != "tpp" else 1.0}}
  auc = None if arm == "tpp" else AUC[(fraction, arm)][seed]
  final = ({"val": {"loss": 0.5}} if arm == "tpp" else
           {s: {"accuracy": 0.7, "balanced_accuracy": 0.7, "macro_f1": 0.7, "auc": auc} for s in ("val", "test")})
  path.mkdir(parents=True)
  (path / "config.json").write_text(json.dumps(cfg))
  (path / "metrics.jsonl").write_text(json.dumps({"step": steps, "split": "train", "loss": 0.3}) + "\n")
  (path / "summary.json").write_text(json.dumps({
      "stage": stage, "config": cfg, "steps": steps, "params": {"trainable": 10, "target": 8}, "final": final,
      "target_init": {"path": str(path.parent.parent / "tpp")} if arm == "tpp_finetune" else None,
      "data": {"train_examples": FRACS[fraction] if stage != "tpp" else 400}}))


def _fake_pipeline(root: pathlib.Path):
  root.mkdir(parents=True, exist_ok=True)
  (root / "config.json").write_text(json.dumps({
      "stage": "pipeline", "seed": 0, "seeds": 4, "steps": 20,
      "pipeline": {"tpp_steps": 10, "label_fractions": [0.1, 1.0], "compute_matched": True}}))
  for s in range(4):
    _fake_run(root / f"seed_{s}" / "tpp", "tpp", s, 1.0)
    for f in FRACS:
      for arm in FAKE_ARMS:
        _fake_run(root / f"seed_{s}" / (f"frac_{f:g}" if f < 1 else "") / arm, arm, s, f)


def test_label_efficiency_table_matches_scipy(tmp_path, sp_stats):
  _fake_pipeline(tmp_path)
  recs = report.collect([tmp_path])
  table = report.label_efficiency_table(recs)
  lines = [l for l in table.splitlines() if l.startswith("|")]
  cells = lambda l: [c.strip() for c in l.strip().strip("|").split("|")]  # noqa: E731
  assert cells(lines[0]) == ["labels", "train examples", "comparison", "n", "`tpp_finetune`", "compared arm",
                             "TPP − baseline", "95% CI", "p", "verdict"]
  rows = [cells(l) for l in lines[2:]]
  want_order = [(f, b) for f in (1.0, 0.1) for b in ("baseline", "baseline_matched")]
  assert [(r[0], r[2]) for r in rows] == [(f"{100 * f:g}%", f"**TPP − {b}**") for f, b in want_order]
  for row, (f, b) in zip(rows, want_order):
    tpp, base = AUC[(f, "tpp_finetune")], AUC[(f, b)]
    d = np.asarray(tpp) - np.asarray(base)
    lo, hi = sp_stats.t.interval(0.95, d.size - 1, loc=d.mean(), scale=sp_stats.sem(d))
    p = sp_stats.ttest_rel(tpp, base).pvalue
    assert row[1] == f"{FRACS[f]:,}" and row[3] == "4"
    assert row[4] == f"{np.mean(tpp):.4f} ± {np.std(tpp, ddof=1):.4f}"
    assert row[5] == f"`{b}` {np.mean(base):.4f} ± {np.std(base, ddof=1):.4f}"
    assert row[6:9] == [f"{d.mean():+.4f}", f"[{lo:+.4f}, {hi:+.4f}]", f"{p:.3g}"]
    assert row[9] == ("no detectable difference" if p >= 0.05 else "TPP better" if d.mean() > 0 else "baseline better")
  assert rows[2][9] == "TPP better" and rows[0][9] == "no detectable difference"

  md = report.write_report(tmp_path).read_text()
  assert "## Label efficiency" in md and (tmp_path / "label_efficiency.png").stat().st_size > 1000
  assert "- labelled fractions of the training split (fine-tune arms): 10%, 100%" in md
  assert "baseline_matched" in md.split("## Test metrics")[1].split("## Validation metrics")[0]
  data = json.loads((tmp_path / "comparison.json").read_text())
  entries = data["label_efficiency"]["test"]
  assert [(e["fraction"], e["baseline"]) for e in entries] == want_order
  for e in entries:
    tpp, base = AUC[(e["fraction"], "tpp_finetune")], AUC[(e["fraction"], e["baseline"])]
    assert e["p"] == pytest.approx(sp_stats.ttest_rel(tpp, base).pvalue, rel=1e-6)
    assert e["arms"]["tpp_finetune"]["values"] == tpp and e["train_examples"] == [FRACS[e["fraction"]]]
    m = sp_stats.t.interval(0.95, 3, loc=np.mean(base), scale=sp_stats.sem(base))
    assert (e["arms"][e["baseline"]]["ci_low"], e["arms"][e["baseline"]]["ci_high"]) == pytest.approx(m, rel=1e-6)
  # the per-fraction entries of the paired tables carry their fraction
  assert {(e["fraction"], e["metric"]) for e in data["splits"]["test"]} >= {(0.1, "auc"), (1.0, "auc")}
