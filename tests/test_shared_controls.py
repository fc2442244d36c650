"""pipeline.controls_from: pipelines that differ only in their pretext share the control arms (baseline,
baseline_matched, linear, full) of another pipeline instead of training them again, through the CLI."""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

from tpp_jax import config as config_lib
from tpp_jax import engine, pipeline
from tpp_jax import workdir as workdir_lib

from conftest import load_config, one_error_line, run_cli

MAE = "smoke,pipeline.compute_matched=True"
# the arms it shares with the smoke pipeline (conftest.SMOKE_PIPELINE_ARG: evaluated every step) are configured alike
CONTRASTIVE = "smoke,eval_every=1,pipeline.compute_matched=True,pretext.type=contrastive"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, smoke_pipeline) -> tuple[pathlib.Path, pathlib.Path, str]:
  """(the MAE pipeline: a copy of the shared smoke pipeline, the contrastive pipeline sharing its controls, the
  latter's stdout)."""
  root = tmp_path_factory.mktemp("shared")
  src, dst = root / "mae", root / "contrastive"
  shutil.copytree(smoke_pipeline, src, symlinks=True)
  r = run_cli(["--config", f"configs/default.py:{CONTRASTIVE},pipeline.controls_from={src}", "--workdir", str(dst)])
  assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
  return src, dst, r.stdout


def _summary(run: pathlib.Path) -> dict:
  return json.loads((run / "summary.json").read_text())


def test_the_controls_are_links_to_the_source_and_are_not_trained_again(runs):
  src, dst, out = runs
  for arm in ("baseline", "baseline_matched"):
    link = dst / "seed_0" / arm
    assert link.is_symlink() and not os.path.isabs(os.readlink(link)), arm  # relative
    assert link.resolve() == (src / "seed_0" / arm).resolve()
    assert f"== seed 0: {arm} (shared with {src}) ==" in out
    assert f"{src / 'seed_0' / arm} holds this run, finished" in out  # found finished: not trained again
  for arm in ("tpp", "tpp_finetune"):  # the pretext's own arms are this pipeline's
    assert (dst / "seed_0" / arm).is_dir() and not (dst / "seed_0" / arm).is_symlink()
    assert _summary(dst / "seed_0" / arm)["config"]["pretext"]["type"] == "contrastive"
  assert _summary(dst / "seed_0" / "tpp_finetune")["target_init"]["path"] == str(dst / "seed_0" / "tpp")
  # the report compares this pipeline's TPP arm with the shared baselines (their numbers, read through the links)
  comparison = json.loads((dst / "comparison.json").read_text())
  text = json.dumps(comparison)
  base_auc = _summary(src / "seed_0" / "baseline")["final"]["test"]["auc"]
  assert "baseline_matched" in text and f"{base_auc}"[:8] in text
  assert "baseline" in (dst / "report.md").read_text()

  # a rerun trains nothing, in either pipeline
  before = {p: p.stat().st_mtime_ns for p in src.parent.rglob("summary.json")}
  r = run_cli(["--config", f"configs/default.py:{CONTRASTIVE},pipeline.controls_from={src}", "--workdir", str(dst)])
  assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
  assert {p: p.stat().st_mtime_ns for p in src.parent.rglob("summary.json")} == before


def test_a_control_missing_in_the_source_is_trained_there(runs, tmp_path):
  src, dst, _ = runs
  copy = tmp_path / "mae"  # (a copy of the MAE pipeline alone: its own folder is kept whole)
  shutil.copytree(src, copy, symlinks=True)
  expected = _summary(copy / "seed_0" / "baseline")["final"]
  shutil.rmtree(copy / "seed_0" / "baseline")
  r = run_cli(["--config", f"configs/default.py:{CONTRASTIVE},pipeline.controls_from={copy}",
               "--workdir", str(tmp_path / "contrastive")])
  assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
  again = _summary(copy / "seed_0" / "baseline")
  assert again["config"]["pretext"]["type"] == "mae"  # trained as the source pipeline runs it
  for k, v in expected["test"].items():
    assert again["final"]["test"][k] == pytest.approx(v, abs=1e-5), k  # the same run as the source's own
  assert not (copy / workdir_lib.LOCK_FILE).exists()  # the source's lock was given back


def test_controls_that_would_differ_are_refused_with_one_error_and_nothing_written(runs, tmp_path):
  src, _, _ = runs
  wd = tmp_path / "other"
  r = run_cli(["--config", f"configs/default.py:{CONTRASTIVE},optim.lr=5e-4,pipeline.controls_from={src}",
               "--workdir", str(wd)])
  line = one_error_line(r)
  assert "pipeline.controls_from" in line and "optim.lr" in line and "pretext.*" in line, line
  assert not wd.exists()
  r = run_cli(["--config", f"configs/default.py:{CONTRASTIVE},pipeline.label_fractions=(0.5,1.0),"
               f"pipeline.controls_from={src}", "--workdir", str(wd)])
  line = one_error_line(r)
  assert "does not run arm 'frac_0.5/baseline'" in line, line
  assert not wd.exists()
  r = run_cli(["--config", f"configs/default.py:{CONTRASTIVE},pipeline.controls_from={tmp_path / 'nothing'}",
               "--workdir", str(wd)])
  line = one_error_line(r)
  assert "holds no pipeline" in line and "run that pipeline first" in line, line
  assert not (tmp_path / "nothing").exists() and not wd.exists()


def test_is_control_and_a_pipeline_cannot_share_with_itself(tmp_path):
  c = load_config("default", MAE + ",pipeline.brackets=True")
  arms = pipeline.arm_configs(c, 0, tmp_path)
  assert [a for a, cfg in arms.items() if pipeline.is_control(cfg)] == ["baseline", "baseline_matched", "linear",
                                                                         "full"]
  with c.unlocked():
    c.pipeline.controls_from = str(tmp_path)
  with pytest.raises(config_lib.ConfigError, match="this pipeline's own --workdir"):
    pipeline.controls_source(c, tmp_path)


def test_a_busy_source_is_waited_for_then_its_arm_is_trained_there(runs, tmp_path, monkeypatch, capsys):
  src, _, _ = runs
  copy = tmp_path / "mae"
  shutil.copytree(src, copy, symlinks=True)
  shutil.rmtree(copy / "seed_0" / "baseline_matched")
  holder = subprocess.Popen([sys.executable, "-c", (
      "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
      "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(2)"), str(copy / ".lock")],
      stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  trained = []

  def fake_train(cfg, wd):
    trained.append((time.monotonic(), str(wd), cfg.pretext.type, int(cfg.steps)))
    return {"final": {}}

  monkeypatch.setattr(engine, "train", fake_train)
  c = load_config("default", CONTRASTIVE)
  cfg = pipeline.arm_configs(c, 0, tmp_path / "dst")["baseline_matched"]
  start = time.monotonic()
  pipeline.run_shared_control(cfg, tmp_path / "dst", copy, 0, "baseline_matched", poll_s=0.2)
  holder.wait()
  assert f"waiting for {copy}" in capsys.readouterr().out
  (when, where, pretext, steps), = trained
  assert when - start > 1.0 and where == str(copy / "seed_0" / "baseline_matched") and pretext == "mae"
  assert steps == int(c.steps) + int(c.pipeline.tpp_steps)
  assert (tmp_path / "dst" / "seed_0" / "baseline_matched").is_symlink()
  assert not workdir_lib.stop_requested()


def test_an_arm_the_source_ran_before_a_rerun_left_it_out_is_still_shared(runs, tmp_path):
  src, _, _ = runs
  copy = tmp_path / "mae"
  shutil.copytree(src, copy, symlinks=True)
  saved = json.loads((copy / "config.json").read_text())
  saved["pipeline"]["compute_matched"] = False  # e.g. a rerun that added label fractions without this arm
  (copy / "config.json").write_text(json.dumps(saved))
  cfg = pipeline.arm_configs(load_config("default", CONTRASTIVE), 0, tmp_path / "dst")["baseline_matched"]
  shared = pipeline.shared_control_config(cfg, copy, 0, "baseline_matched")
  assert shared.pretext.type == "mae" and int(shared.steps) == int(cfg.steps)
  workdir_lib.check_config(shared, copy / "seed_0" / "baseline_matched")
  shutil.rmtree(copy / "seed_0" / "baseline_matched")  # neither run nor asked for there: refused
  with pytest.raises(config_lib.ConfigError, match="does not run arm 'baseline_matched'"):
    pipeline.shared_control_config(cfg, copy, 0, "baseline_matched")
