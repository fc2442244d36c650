"""report.py on fake run folders (no training): tables vs numpy, paired differences, figures, CLI."""
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from tpp_jax import report

CLS = ("accuracy", "balanced_accuracy", "macro_f1", "auc")
SEG = ("dice", "iou")
PARAMS = {"finetune": {"total": 5_600_000, "trainable": 74_000, "target": 73_000, "head": 1_000, "backbone": 5_500_000},
          "tpp": {"total": 6_000_000, "trainable": 473_000, "target": 73_000, "head": 0, "backbone": 5_500_000}}


def _config(stage, seed, task, peft, target_init=""):
  return {"stage": stage, "seed": seed, "steps": 20 if stage != "tpp" else 10, "batch_size": 8,
          "peft": {"type": peft, "rank": 8, "alpha": 8.0, "targets": "q,v"},
          "task": {"type": task, "num_classes": 2}, "pretext": {"type": "mae", "mask_ratio": 0.75,
                                                                "norm_pix_loss": True},
          "target_init": target_init, "model": {"variant": "Ti/16", "image_size": 32},
          "init": {"path": "/shared/house_vit_ti8_64.safetensors"}, "optim": {"lr": 1e-3},
          "data": {"path": "/data/fake.npz", "source": "npz"}}


def make_run(path, stage, seed, task="classification", peft="lora", final=None, rng=None, target_init="",
             torn=False):
  """A run folder as engine.Trainer.run leaves it; returns its final metrics."""
  rng = rng or np.random.default_rng(seed)
  path = pathlib.Path(path)
  path.mkdir(parents=True)
  cfg = _config(stage, seed, task, peft, target_init)
  keys = ("loss",) if stage == "tpp" else (CLS if task == "classification" else SEG) + ("loss",)
  if final is None:
    final = {s: {k: float(rng.uniform(0.4, 0.95)) for k in keys} for s in ("val", "test")}
    if stage == "tpp":
      final = {"val": final["val"]}
  rows = []
  for step in range(2, cfg["steps"] + 1, 2):
    rows.append({"step": step, "stage": stage, "split": "train", "loss": float(1.0 / step + rng.uniform(0, .1)),
                 "lr": 1e-3, "images_per_sec": 100.0 + step})
    if step % 10 == 0:
      rows.append({"step": step, "stage": stage, "split": "val",
                   **{k: float(rng.uniform(0.4, 0.9)) for k in keys}})
  rows.append({"step": cfg["steps"], "stage": stage, "split": "test", **final.get("test", {})})
  text = "".join(json.dumps(r) + "\n" for r in rows) + ('{"step": 99, "spl' if torn else "")
  (path / "metrics.jsonl").write_text(text)
  (path / "config.json").write_text(json.dumps(cfg))
  summary = {"stage": stage, "config": cfg, "steps": cfg["steps"],
             "params": PARAMS["tpp" if stage == "tpp" else "finetune"],
             "init": "tpp_jax/assets/house_vit_ti8_64.safetensors (safetensors)",
             "target_init": {"path": target_init, "step": 10} if target_init else None,
             "final": final, "best": None, "images_per_sec": float(rng.uniform(100, 200)),
             "wall_time_s": float(rng.uniform(5, 50))}
  (path / "summary.json").write_text(json.dumps(summary))
  return final


def make_pipeline(root, seeds=(0, 1, 2), task="classification", peft="lora", skip=()):
  """DIR/config.json + DIR/seed_s/{tpp,tpp_finetune,baseline}; returns {(seed, arm): final}."""
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  top = _config("pipeline", seeds[0], task, peft)
  top["seeds"] = len(seeds)
  (root / "config.json").write_text(json.dumps(top))
  finals = {}
  rng = np.random.default_rng(123)
  for s in seeds:
    for arm in ("tpp", "tpp_finetune", "baseline"):
      if (s, arm) in skip:
        continue
      stage = "tpp" if arm == "tpp" else "finetune"
      ti = str(root / f"seed_{s}" / "tpp") if arm == "tpp_finetune" else ""
      finals[(s, arm)] = make_run(root / f"seed_{s}" / arm, stage, s, task, peft, rng=rng, target_init=ti)
  return finals


def table_rows(table: str) -> tuple[list[str], dict]:
  """(header cells, {first cell: cells}) of a Markdown table."""
  lines = [l for l in table.splitlines() if l.startswith("|")]
  split = lambda l: [c.strip() for c in l.strip().strip("|").split("|")]  # noqa: E731
  header = split(lines[0])
  return header, {split(l)[0]: split(l) for l in lines[2:]}


def fmt(values) -> str:
  a = np.asarray(values, float)
  return f"{a.mean():.4f} ± {a.std(ddof=1):.4f}" if a.size > 1 else f"{a[0]:.4f} ± n/a"


def test_collect_finds_every_run_with_arm_seed_and_rows(tmp_path):
  make_pipeline(tmp_path / "p")
  recs = report.collect([tmp_path / "p"])
  assert len(recs) == 9
  assert [r["arm"] for r in recs[:3]] == ["tpp_finetune"] * 3
  arms = ("tpp", "tpp_finetune", "baseline")
  assert {(r["arm"], r["seed"]) for r in recs} == {(a, s) for a in arms for s in range(3)}
  r = next(r for r in recs if r["arm"] == "baseline" and r["seed"] == 1)
  assert (r["stage"], r["peft"], r["task"], r["pretext"]) == ("finetune", "lora", "classification", "mae")
  assert r["params"]["trainable"] == 74_000 and r["images_per_sec"] > 0 and r["wall_time_s"] > 0
  assert {row["split"] for row in r["rows"]} == {"train", "val", "test"}
  assert set(r["final"]["test"]) >= set(CLS)
  # a run folder given directly, and the same run twice, is listed once
  assert len(report.collect([tmp_path / "p" / "seed_0" / "baseline", tmp_path / "p"])) == 9


def test_collect_infers_roles_of_standalone_runs_and_skips_torn_lines(tmp_path):
  make_run(tmp_path / "pn_tpp", "tpp", 0)
  make_run(tmp_path / "pn_ft", "finetune", 0, target_init=str(tmp_path / "pn_tpp"), torn=True)
  make_run(tmp_path / "pn_base", "finetune", 0)
  roles = {r["arm"]: r["role"] for r in report.collect([tmp_path])}
  assert roles == {"pn_tpp": "tpp", "pn_ft": "tpp_finetune", "pn_base": "baseline"}
  ft = next(r for r in report.collect([tmp_path / "pn_ft"]))
  assert all(row["step"] != 99 for row in ft["rows"])
  table = report.metric_table(report.collect([tmp_path]))
  assert "pn_ft − pn_base" in table


@pytest.mark.parametrize("split", ["test", "val"])
def test_metric_table_mean_std_and_paired_difference_match_numpy(tmp_path, split):
  finals = make_pipeline(tmp_path)
  table = report.metric_table(report.collect([tmp_path]), split)
  header, rows = table_rows(table)
  assert header[:3] == ["arm", "peft", "n"] and header[3:7] == list(CLS)
  assert {"trainable params", "target params", "images/s", "wall time (s)"} <= set(header)
  assert "`tpp`" not in rows  # the pretext-only arm has no task metrics
  for arm in ("tpp_finetune", "baseline"):
    row = rows[f"`{arm}`"]
    assert row[1] == "lora" and row[2] == "3"
    for k in CLS:
      assert row[header.index(k)] == fmt([finals[(s, arm)][split][k] for s in range(3)])
    assert row[header.index("trainable params")] == "74,000" and row[header.index("target params")] == "73,000"
  diff = rows["**TPP − baseline**"]
  assert diff[2] == "3"
  for k in CLS:
    d = np.asarray([finals[(s, "tpp_finetune")][split][k] - finals[(s, "baseline")][split][k] for s in range(3)])
    assert diff[header.index(k)] == f"**{d.mean():+.4f} ± {d.std(ddof=1):.4f}**"


def test_paired_difference_uses_only_seeds_present_in_both_arms(tmp_path):
  finals = make_pipeline(tmp_path, skip={(2, "baseline")})
  recs = report.collect([tmp_path])
  (d,) = report.paired_differences(recs, "test")
  assert d["seeds"] == [0, 1]
  want = [finals[(s, "tpp_finetune")]["test"]["auc"] - finals[(s, "baseline")]["test"]["auc"] for s in (0, 1)]
  np.testing.assert_allclose(d["diffs"]["auc"], want)
  header, rows = table_rows(report.metric_table(recs))
  assert rows["`tpp_finetune`"][2] == "3" and rows["`baseline`"][2] == "2" and rows["**TPP − baseline**"][2] == "2"


def test_one_seed_shows_na_std(tmp_path):
  finals = make_pipeline(tmp_path, seeds=(5,))
  header, rows = table_rows(report.metric_table(report.collect([tmp_path])))
  row = rows["`baseline`"]
  assert row[2] == "1"
  assert row[header.index("auc")] == f"{finals[(5, 'baseline')]['test']['auc']:.4f} ± n/a"
  d = finals[(5, "tpp_finetune")]["test"]["auc"] - finals[(5, "baseline")]["test"]["auc"]
  assert rows["**TPP − baseline**"][header.index("auc")] == f"**{d:+.4f} ± n/a**"


def test_segmentation_table_shows_dice_and_iou(tmp_path):
  finals = make_pipeline(tmp_path, task="segmentation", peft="dora")
  table = report.metric_table(report.collect([tmp_path]))
  header, rows = table_rows(table)
  assert header[3:5] == ["dice", "iou"] and "auc" not in header and "accuracy" not in header
  assert rows["`tpp_finetune`"][1] == "dora"
  assert rows["`tpp_finetune`"][3] == fmt([finals[(s, "tpp_finetune")]["test"]["dice"] for s in range(3)])
  assert "**TPP − baseline**" in rows


def test_groups_split_by_peft_type(tmp_path):
  make_pipeline(tmp_path / "lora", seeds=(0, 1), peft="lora")
  make_pipeline(tmp_path / "dora", seeds=(0, 1), peft="dora")
  table = report.metric_table(report.collect([tmp_path]))
  body = [l for l in table.splitlines()[2:]]
  assert sum(l.startswith("| `tpp_finetune` |") for l in body) == 2
  assert sum(l.startswith("| **TPP − baseline** |") for l in body) == 2


def assert_png(path, min_size=(100, 100)):
  path = pathlib.Path(path)
  assert path.exists() and path.stat().st_size > 1000
  with Image.open(path) as im:
    im.verify()
  with Image.open(path) as im:
    assert im.format == "PNG" and im.size[0] >= min_size[0] and im.size[1] >= min_size[1]


def test_learning_curves_png(tmp_path):
  make_pipeline(tmp_path / "p")
  recs = report.collect([tmp_path / "p"])
  assert_png(report.plot_learning_curves(recs, tmp_path / "lc.png"))
  # without the tpp arm: two panels, still a valid image
  out = report.plot_learning_curves([r for r in recs if r["stage"] != "tpp"], tmp_path / "lc2.png")
  assert_png(out)
  with Image.open(tmp_path / "lc.png") as a, Image.open(out) as b:
    assert a.size[0] > b.size[0]


@pytest.mark.parametrize("channels", [1, 3])
def test_reconstruction_and_overlay_pngs(tmp_path, channels):
  rng = np.random.default_rng(0)
  mean, std = np.full(channels, 0.5, np.float32), np.full(channels, 0.25, np.float32)
  x = rng.normal(size=(3, 16, 16, channels)).astype(np.float32)
  masked = x.copy()
  masked[:, :8] = 0.0
  assert_png(report.plot_reconstructions(x, masked, x + 0.1, tmp_path / "rec.png", mean=mean, std=std))
  masks = np.zeros((3, 16, 16), np.int32)
  masks[:, 4:12, 4:12] = 1
  preds = np.roll(masks, 2, axis=1)
  preds[2] = 0  # an empty prediction
  assert_png(report.plot_segmentation_overlays(x, masks, preds, tmp_path / "seg.png", mean=mean, std=std))
  multi = masks.copy()
  multi[:, 6:10, 6:10] = 2  # three classes
  assert_png(report.plot_segmentation_overlays(x, multi, np.roll(multi, 1, axis=2), tmp_path / "seg3.png"))
  # logits and a single image
  logits = np.stack([1 - masks, masks], -1).astype(np.float32)
  assert_png(report.plot_segmentation_overlays(x[:1], masks[:1], logits[:1], tmp_path / "seg1.png"), (50, 50))


def test_display_unnormalises_and_clips():
  x = np.asarray([[[[-3.0, 0.0, 3.0]]]], np.float32)
  out = report.plots._display(x, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
  np.testing.assert_allclose(out[0, 0, 0], [0.0, 0.5, 1.0])
  assert report.plots._display(np.zeros((2, 4, 4, 1)), mean=(0.5,), std=(0.5,)).shape == (2, 4, 4)


def test_write_report_links_figures_and_tables(tmp_path):
  finals = make_pipeline(tmp_path, task="segmentation")
  x = np.zeros((2, 8, 8, 3), np.float32)
  report.plot_reconstructions(x, x, x, tmp_path / "mae_reconstructions.png")
  path = report.write_report(tmp_path)
  assert path == tmp_path / "report.md"
  md = path.read_text()
  assert_png(tmp_path / "learning_curves.png")
  assert "](learning_curves.png)" in md and "](mae_reconstructions.png)" in md
  assert "segmentation_overlays.png" not in md  # not written by this fake pipeline
  assert "## Test metrics" in md and "## Validation metrics" in md
  assert "| arm | peft | n | dice | iou |" in md and "TPP − baseline" in md
  want = fmt([finals[(s, "baseline")]["val"]["iou"] for s in range(3)])
  assert want in md.split("## Validation metrics")[1].split("##")[0]
  for s in ("Ti/16", "lora", "mae", "/data/fake.npz", "house_vit_ti8_64", "74,000", "wall time"):
    assert s in md
  assert str(tmp_path) not in md  # relative links only (renders on GitHub)
  assert "](seed_0/tpp_finetune/summary.json)" in md


def test_write_report_embeds_segmentation_overlays_and_extra_runs(tmp_path):
  make_pipeline(tmp_path / "p", seeds=(0,), task="segmentation")
  make_run(tmp_path / "other" / "full_ft", "full", 0, task="segmentation")
  (tmp_path / "p" / "segmentation_overlays.png").write_bytes(b"")
  md = report.write_report(tmp_path / "p", [tmp_path / "other"]).read_text()
  assert "](segmentation_overlays.png)" in md and "`full_ft`" in md
  assert "](../other/full_ft/summary.json)" in md


def test_folder_without_runs_gives_a_clear_error(tmp_path, capsys):
  (tmp_path / "empty" / "seed_0").mkdir(parents=True)
  with pytest.raises(report.NoRunsError, match="No runs under .*empty.*summary.json"):
    report.write_report(tmp_path / "empty")
  make_pipeline(tmp_path / "p", seeds=(0,))
  with pytest.raises(SystemExit) as e:
    report.main([str(tmp_path / "p"), str(tmp_path / "empty")])
  assert e.value.code == 2 and "No runs under" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    report.main([str(tmp_path / "missing")])
  assert "not a folder" in capsys.readouterr().err


def test_cli_writes_report_into_first_dir(tmp_path, capsys):
  make_pipeline(tmp_path / "p", seeds=(0, 1))
  path = report.main([str(tmp_path / "p")])
  assert path == tmp_path / "p" / "report.md" and path.exists()
  assert "report.md" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Paired statistics (TPP − baseline per seed): checked against scipy, the independent reference.




def paired_rows(text: str) -> tuple[list[str], list[list[str]]]:
  """(header, rows) of the paired-comparison table (the one headed `comparison`) in a Markdown text."""
  split = lambda l: [c.strip() for c in l.strip().strip("|").split("|")]  # noqa: E731
  lines = text.splitlines()
  start = next(i for i, l in enumerate(lines) if l.startswith("| comparison |"))
  body = []
  for l in lines[start + 2:]:
    if not l.startswith("|"):
      break
    body.append(split(l))
  return split(lines[start]), body


def scipy_paired(sp_stats, tpp, base):
  d = np.asarray(tpp) - np.asarray(base)
  lo, hi = sp_stats.t.interval(0.95, d.size - 1, loc=d.mean(), scale=sp_stats.sem(d))
  return d.mean(), lo, hi, sp_stats.ttest_rel(tpp, base).pvalue


def scipy_verdict(mean, p):
  return "no detectable difference" if p >= 0.05 else "TPP better" if mean > 0 else "baseline better"


@pytest.mark.parametrize("task, seeds, split", [("classification", (0, 1, 2, 3, 4), "test"),
                                                ("classification", (3, 4), "val"),
                                                ("segmentation", (0, 1, 2), "test")])
def test_paired_table_columns_and_numbers_match_scipy(tmp_path, sp_stats, task, seeds, split):
  finals = make_pipeline(tmp_path, seeds=seeds, task=task)
  table = report.paired_table(report.collect([tmp_path]), split)
  header, rows = paired_rows(table)
  assert header == ["comparison", "peft", "metric", "n", "TPP − baseline", "95% CI", "p", "verdict"]
  keys = CLS if task == "classification" else SEG
  assert [r[2] for r in rows] == list(keys)
  for row in rows:
    k = row[2]
    tpp = [finals[(s, "tpp_finetune")][split][k] for s in seeds]
    base = [finals[(s, "baseline")][split][k] for s in seeds]
    mean, lo, hi, p = scipy_paired(sp_stats, tpp, base)
    assert row[:2] == ["**TPP − baseline**", "lora"] and row[3] == str(len(seeds))
    assert row[4] == f"{mean:+.4f}" and row[5] == f"[{lo:+.4f}, {hi:+.4f}]" and row[6] == f"{p:.3g}"
    assert row[7] == scipy_verdict(mean, p)
  assert f"paired t-test over {len(seeds)} seeds, two-sided, 95 % level" in table


def test_paired_table_uses_common_seeds_and_says_when_there_are_too_few(tmp_path, sp_stats):
  finals = make_pipeline(tmp_path / "a", skip={(2, "baseline")})
  header, rows = paired_rows(report.paired_table(report.collect([tmp_path / "a"])))
  auc = next(r for r in rows if r[2] == "auc")
  mean, lo, hi, p = scipy_paired(sp_stats, [finals[(s, "tpp_finetune")]["test"]["auc"] for s in (0, 1)],
                                 [finals[(s, "baseline")]["test"]["auc"] for s in (0, 1)])
  assert auc[3] == "2" and auc[6] == f"{p:.3g}" and auc[5] == f"[{lo:+.4f}, {hi:+.4f}]"
  make_pipeline(tmp_path / "b", seeds=(5,))
  table = report.paired_table(report.collect([tmp_path / "b"]))
  header, rows = paired_rows(table)
  for row in rows:
    assert row[3] == "1" and row[5] == "n/a" and row[6] == "n/a" and row[7] == "not enough seeds (n=1)"
  assert "paired t-test over 1 seed, two-sided, 95 % level" in table
  # no baseline arm: no paired table
  only_tpp = [r for r in report.collect([tmp_path / "a"]) if r["arm"] != "baseline"]
  assert report.paired_table(only_tpp) == ""


def test_report_md_and_comparison_json_carry_the_paired_statistics(tmp_path, sp_stats):
  finals = make_pipeline(tmp_path, seeds=(0, 1, 2, 3, 4))
  md = report.write_report(tmp_path).read_text()
  data = json.loads((tmp_path / "comparison.json").read_text())
  assert (data["test"], data["alternative"], data["level"]) == ("paired t-test", "two-sided", 0.95)
  assert "](comparison.json)" in md
  for split, title in (("test", "## Test metrics"), ("val", "## Validation metrics")):
    section = md.split(title)[1].split("\n## ")[0]
    assert "| TPP − baseline | 95% CI | p | verdict |" in section
    assert "paired t-test over 5 seeds, two-sided, 95 % level" in section
    header, rows = paired_rows(section)
    entries = data["splits"][split]
    assert [(e["comparison"], e["metric"]) for e in entries] == [("TPP − baseline", k) for k in CLS]
    for e, row in zip(entries, rows):
      tpp = [finals[(s, "tpp_finetune")][split][e["metric"]] for s in range(5)]
      base = [finals[(s, "baseline")][split][e["metric"]] for s in range(5)]
      mean, lo, hi, p = scipy_paired(sp_stats, tpp, base)
      assert e["seeds"] == list(range(5)) and e["n"] == 5 and e["tpp_values"] == tpp and e["baseline_values"] == base
      for got, want in ((e["mean_diff"], mean), (e["ci_low"], lo), (e["ci_high"], hi), (e["p"], p)):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-12)
      assert e["verdict"] == scipy_verdict(mean, p) == row[7]
      assert row[4:7] == [f"{e['mean_diff']:+.4f}", f"[{e['ci_low']:+.4f}, {e['ci_high']:+.4f}]", f"{e['p']:.3g}"]


def test_paired_table_baseline_better_and_zero_variance(tmp_path, sp_stats):
  base = {"accuracy": [0.8, 0.7, 0.9], "balanced_accuracy": [0.8, 0.7, 0.9], "macro_f1": [0.6, 0.5, 0.7],
          "auc": [0.90, 0.85, 0.95]}
  tpp = {"accuracy": [0.8, 0.7, 0.9], "balanced_accuracy": [0.81, 0.69, 0.92], "macro_f1": [0.61, 0.52, 0.72],
         "auc": [0.80, 0.76, 0.84]}
  for s in range(3):
    for arm, vals in (("tpp_finetune", tpp), ("baseline", base)):
      final = {sp: {k: v[s] for k, v in vals.items()} for sp in ("val", "test")}
      make_run(tmp_path / f"seed_{s}" / arm, "finetune", s, final=final,
               target_init=str(tmp_path / "tpp") if arm == "tpp_finetune" else "")
  table = report.paired_table(report.collect([tmp_path]))
  header, rows = paired_rows(table)
  rows = {r[2]: r for r in rows}
  assert rows["accuracy"][4:] == ["+0.0000", "[+0.0000, +0.0000]", "1*", "no detectable difference"]
  assert "zero variance" in table
  for k in ("balanced_accuracy", "macro_f1", "auc"):
    mean, lo, hi, p = scipy_paired(sp_stats, tpp[k], base[k])
    assert rows[k][5:7] == [f"[{lo:+.4f}, {hi:+.4f}]", f"{p:.3g}"] and rows[k][7] == scipy_verdict(mean, p)
  assert rows["auc"][7] == "baseline better" and rows["macro_f1"][7] == "TPP better"


# ----------------------------------------------------------------------------------------------
# Selected by validation (summary.json best / best_final) and the bracket arms (linear, full).


def add_best(run, step, rng):
  """Give a fake run a kept best checkpoint at `step` and its metrics on every split (summary best / best_final)."""
  path = pathlib.Path(run) / "summary.json"
  s = json.loads(path.read_text())
  s["best"] = {"step": step, "metric": "auc", "value": float(rng.uniform(0.5, 1))}
  s["best_final"] = s["final"] if step == s["steps"] else {
      split: {k: float(rng.uniform(0.4, 0.95)) for k in m} for split, m in s["final"].items()}
  path.write_text(json.dumps(s))
  return s["best_final"]


def test_selected_by_validation_tables_and_brackets_match_numpy_and_scipy(tmp_path, sp_stats):
  make_pipeline(tmp_path, seeds=(0, 1, 2))
  rng = np.random.default_rng(7)
  steps = {"tpp_finetune": (10, 20, 14), "baseline": (20, 6, 8), "linear": (20, 20, 20), "full": (4, 4, None)}
  best = {}
  for s in range(3):
    for arm in ("linear", "full"):
      make_run(tmp_path / f"seed_{s}" / arm, arm, s, rng=rng)
    for arm, at in steps.items():
      if at[s] is not None:  # full seed 2: a run without a kept best (e.g. an older summary)
        best[(s, arm)] = add_best(tmp_path / f"seed_{s}" / arm, at[s], rng)
  recs = report.collect([tmp_path])
  assert [r["arm"] for r in recs if r["seed"] == 0] == ["tpp_finetune", "baseline", "linear", "full", "tpp"]

  header, rows = table_rows(report.metric_table(recs, "test"))
  assert header[3:7] == list(CLS) and header[7:10] == ["steps", "best step", "auc @ best step"]
  assert rows["`linear`"][1] == rows["`full`"][1] == "none"  # no PEFT parameters in the brackets
  assert rows["`tpp_finetune`"][7:9] == ["20", "14.7 (10–20)"] and rows["`full`"][7:9] == ["20", "4"]
  for arm in steps:
    want = fmt([best[(s, arm)]["test"]["auc"] for s in range(3) if (s, arm) in best])
    assert rows[f"`{arm}`"][9] == want, arm
  d = np.asarray([best[(s, "tpp_finetune")]["test"]["auc"] - best[(s, "baseline")]["test"]["auc"] for s in range(3)])
  assert rows["**TPP − baseline**"][9] == f"**{d.mean():+.4f} ± {d.std(ddof=1):.4f}**"
  assert not any("linear" in k or "full" in k for k in rows if k.startswith("**"))  # no paired test for brackets

  header, rows = table_rows(report.metric_table(recs, "test", "best_final"))
  assert header[3:] == [*CLS, "steps", "best step"]
  assert rows["`full`"][2] == "2" and rows["`full`"][header.index("best step")] == "4"
  for arm in steps:
    for k in CLS:
      assert rows[f"`{arm}`"][header.index(k)] == fmt([best[(s, arm)]["test"][k] for s in range(3) if (s, arm) in best])

  table = report.paired_table(recs, "test", source="best_final")
  header, rows = paired_rows(table)
  assert header == ["comparison", "peft", "metric", "n", "best step (TPP / baseline)", "TPP − baseline", "95% CI",
                    "p", "verdict"]
  assert "checkpoint selected by validation" in table
  for row in rows:
    k = row[2]
    mean, lo, hi, p = scipy_paired(sp_stats, [best[(s, "tpp_finetune")]["test"][k] for s in range(3)],
                                   [best[(s, "baseline")]["test"][k] for s in range(3)])
    assert row[4] == "14.7 (10–20) / 11.3 (6–20)"
    assert row[5:8] == [f"{mean:+.4f}", f"[{lo:+.4f}, {hi:+.4f}]", f"{p:.3g}"] and row[8] == scipy_verdict(mean, p)

  md = report.write_report(tmp_path).read_text()
  section = md.split("\n## Test metrics\n")[1].split("\n## ")[0]
  assert "### Selected by validation (best step): test metrics" in section and "**Brackets**" in md
  data = json.loads((tmp_path / "comparison.json").read_text())
  sel = {e["metric"]: e for e in data["selected_by_validation"]["splits"]["test"]}
  assert sel["auc"]["tpp_values"] == [best[(s, "tpp_finetune")]["test"]["auc"] for s in range(3)]
  assert sel["auc"]["tpp_best_steps"] == [10, 20, 14] and sel["auc"]["baseline_best_steps"] == [20, 6, 8]
  assert {e["comparison"] for e in data["selected_by_validation"]["splits"]["val"]} == {"TPP − baseline"}
