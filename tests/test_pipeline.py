"""The product's front door: configs/default.py:smoke runs the whole pipeline; eval; backbone export."""
import json

import jax
import numpy as np
import pytest

from tpp_jax import engine, evaluate, figures, pipeline
from tpp_jax.checkpoints import store

from conftest import SMOKE_PIPELINE_ARG, SMOKE_PIPELINE_ARMS, load_config


def test_default_smoke_pipeline_writes_report_and_all_arms(smoke_pipeline):
  wd = smoke_pipeline  # configs/default.py:smoke with every comparison arm, through the CLI (conftest)
  arms = SMOKE_PIPELINE_ARMS
  assert sorted(str(p.parent.relative_to(wd / "seed_0")) for p in (wd / "seed_0").rglob("summary.json")) == sorted(arms)
  for arm in arms[:3]:
    s = json.loads((wd / "seed_0" / arm / "summary.json").read_text())
    assert s["stage"] == ("tpp" if arm == "tpp" else "finetune")
    assert "house_vit_ti8_64" in s["init"], s["init"]  # the shipped house backbone was loaded
  ft = json.loads((wd / "seed_0" / "tpp_finetune" / "summary.json").read_text())
  base = json.loads((wd / "seed_0" / "baseline" / "summary.json").read_text())
  assert ft["target_init"]["path"].endswith("seed_0/tpp") and base["target_init"] is None
  assert set(ft["final"]["test"]) >= {"accuracy", "balanced_accuracy", "macro_f1", "auc"}
  report = (wd / "report.md").read_text()
  for png in ("learning_curves.png", "mae_reconstructions.png"):
    assert (wd / png).stat().st_size > 1000 and png in report
  assert "tpp_finetune" in report and "baseline" in report

  # a rerun of the finished pipeline reuses every arm (label fractions included): nothing is retrained, re-evaluated
  # or rewritten; a figure a kill tore (here: emptied) is drawn again
  summaries = {a: (wd / "seed_0" / a / "summary.json") for a in arms}
  before = {a: (p.stat().st_mtime_ns, p.read_text()) for a, p in summaries.items()}
  (wd / "mae_reconstructions.png").write_bytes(b"")
  again = pipeline.run(load_config("default", SMOKE_PIPELINE_ARG), wd)
  assert {a: (p.stat().st_mtime_ns, p.read_text()) for a, p in summaries.items()} == before
  assert figures.readable_png(wd / "mae_reconstructions.png")
  assert again["report"] == str(wd / "report.md")
  assert again["runs"] == {f"seed_0/{a}": json.loads(before[a][1])["final"] for a in arms}


def test_eval_stage_reproduces_the_final_metrics(tmp_path, pneumonia_npz):
  c = load_config("experiment", "pneumonia,smoke,px32,steps=4")
  c.data.path = str(pneumonia_npz)
  s = engine.train(c, tmp_path / "run")
  e = load_config("experiment", "stage=eval")
  ev = evaluate.run(e, tmp_path / "run")
  for split in ("val", "test"):
    for k in ("accuracy", "auc", "loss"):
      assert ev["results"][split][k] == pytest.approx(s["final"][split][k], abs=1e-6)
  assert (tmp_path / "run" / "eval.json").exists()


def test_house_backbone_config_exports_and_reloads(tmp_path):
  from tpp_jax import export_backbone

  from conftest import house_smoke_config
  c = house_smoke_config()
  engine.train(c, tmp_path / "pre")
  summary = export_backbone.export(tmp_path / "pre", tmp_path / "out", "tiny")
  h = summary["heldout"]
  assert np.isfinite(h["mae_loss"]) and h["mean_patch_loss"] == pytest.approx(1 - 1 / (8 * 8 * 3), rel=1e-3)
  # the exported fp16 file loads as init and equals the checkpoint to fp16 precision
  loaded = store.load_flat(tmp_path / "out" / "tiny.safetensors")
  enc_ck, _ = store.load_backbone_tpp(tmp_path / "pre")  # from the workdir (orbax)
  for a, b in zip(jax.tree_util.tree_leaves(loaded["encoder"]), jax.tree_util.tree_leaves(enc_ck)):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-4)
  ft = load_config("experiment", "demo,smoke,steps=2")
  ft.model.update(image_size=64, pos_emb="sincos")
  ft.data.image_size = 64
  ft.init.path = str(tmp_path / "out" / "tiny.safetensors")
  t = engine.Trainer(ft, tmp_path / "ft")
  got = jax.device_get(t.state["params"]["encoder"]["blocks_0"]["attn"]["q"]["kernel"])
  np.testing.assert_array_equal(got, loaded["encoder"]["blocks_0"]["attn"]["q"]["kernel"])


def test_a_copied_pipeline_resumes_where_it_is_now(smoke_pipeline, tmp_path, capsys):
  """`cp -a` of a finished pipeline: its arms' configs hold the old absolute target_init; the copy is the same run
  (workdir.moved_path), so every arm is found finished and nothing is trained again."""
  import shutil
  copy = tmp_path / "moved" / "pipe"
  shutil.copytree(smoke_pipeline, copy, symlinks=True)
  old_ft = json.loads((copy / "seed_0" / "tpp_finetune" / "config.json").read_text())
  assert old_ft["target_init"] == str(smoke_pipeline / "seed_0" / "tpp")  # the old place
  capsys.readouterr()
  out = pipeline.run(load_config("default", SMOKE_PIPELINE_ARG), copy)
  assert capsys.readouterr().out.count("nothing to do") == len(SMOKE_PIPELINE_ARMS)
  assert out["runs"]["seed_0/tpp_finetune"] == json.loads((copy / "seed_0" / "tpp_finetune" / "summary.json")
                                                          .read_text())["final"]


def test_moved_path_is_only_a_path_inside_the_run_that_moved():
  from tpp_jax.workdir import moved_path
  wd = "/new/pipe/seed_0/tpp_finetune"
  assert moved_path("/old/pipe/seed_0/tpp", "/new/pipe/seed_0/tpp", wd)
  assert moved_path("/old/a/seed_0/tpp", "/new/b/seed_0/tpp", "/new/b/seed_0/tpp_finetune")
  assert not moved_path("/runs/x/tpp", "/runs/y/tpp", wd)  # one common part only: another TPP run
  assert not moved_path("/old/pipe/seed_0/tpp", "/elsewhere/pipe/seed_0/tpp", wd)  # not where this run is
  assert not moved_path("/same/seed_0/tpp", "/same/seed_0/tpp", wd) and not moved_path("a/b/c", "d/b/c", wd)
  assert not moved_path(1, 2, wd)


def test_a_converged_budget_stops_each_labelled_arm_and_matches_the_control_to_the_tpp_finetune(tmp_path):
  """pipeline.budget=converged through the CLI: tpp_finetune and baseline stop by pipeline.patience (cap: steps),
  the TPP arm keeps its tpp_steps, baseline_matched trains tpp_steps + the steps the TPP fine-tune trained, and the
  printed table gives each arm's steps."""
  from conftest import run_cli
  wd = tmp_path / "pipe"
  arg = ("smoke,steps=16,pipeline.tpp_steps=4,eval_every=2,pipeline.budget=converged,pipeline.patience=1,"
         "pipeline.compute_matched=True,optim.lr=3e-3")
  r = run_cli(["--config", f"configs/default.py:{arg}", "--workdir", str(wd)])
  assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
  s = {arm: json.loads((wd / "seed_0" / arm / "summary.json").read_text())
       for arm in ("tpp", "tpp_finetune", "baseline", "baseline_matched")}
  assert s["tpp"]["steps"] == 4 and s["tpp"]["config"]["patience"] == 0
  for arm in ("tpp_finetune", "baseline"):
    assert s[arm]["config"]["patience"] == 1 and s[arm]["steps"] == 16
    trained = s[arm]["converged_at"] or 16
    rows = [json.loads(line) for line in (wd / "seed_0" / arm / "metrics.jsonl").read_text().splitlines()]
    assert max(row["step"] for row in rows) == trained
  ft = s["tpp_finetune"]["converged_at"] or 16
  assert ft < 16  # it did stop before the cap (patience 1 on this seed)
  assert s["baseline_matched"]["steps"] == 4 + ft and s["baseline_matched"]["config"]["patience"] == 0
  assert s["baseline_matched"]["converged_at"] is None
  header = next(line for line in r.stdout.splitlines() if line.startswith("arm "))
  assert header.endswith("steps (each seed)"), r.stdout[-1500:]
  matched = next(line for line in r.stdout.splitlines() if line.startswith("baseline_matched "))
  assert matched.endswith(f"  {4 + ft}"), matched
