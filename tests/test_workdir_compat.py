"""A workdir written before the lean-core change (tests/fixtures/run_before_lean_core: stopped at step 2 of 4)
resumes to the end and evaluates through today's CLI."""
import json
import shutil

from tpp_jax.configs.presets import DEMO_DATA

from conftest import ROOT, run_cli

ARG = "demo,smoke,steps=4,checkpoint_every=2,stop_after=2,eval_every=2"


def test_old_workdir_resumes_and_evaluates(tmp_path):
  wd = tmp_path / "run_before_lean_core"
  shutil.copytree(ROOT / "tests" / "fixtures" / "run_before_lean_core", wd, ignore=shutil.ignore_patterns("README.md"))
  cfg = json.loads((wd / "config.json").read_text())
  cfg["data"]["path"] = str(DEMO_DATA)  # written on another machine: the same data, where this checkout has it
  (wd / "config.json").write_text(json.dumps(cfg, indent=2))
  old_rows = (wd / "metrics.jsonl").read_text().splitlines()

  r = run_cli(["--config", f"configs/experiment.py:{ARG}", "--config.stop_after=0", "--workdir", str(wd)])
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"Resumed {wd} at step 2" in r.stdout, r.stdout[-2000:]
  summary = json.loads((wd / "summary.json").read_text())
  assert summary["steps"] == 4 and set(summary["final"]) == {"val", "test"}
  rows = (wd / "metrics.jsonl").read_text().splitlines()
  assert rows[:len(old_rows)] == old_rows and max(json.loads(x)["step"] for x in rows) == 4  # the old rows kept

  ev = run_cli(["--config", "configs/experiment.py:stage=eval", "--workdir", str(wd)])
  assert ev.returncode == 0, ev.stderr[-3000:]
  got = json.loads((wd / "eval.json").read_text())
  assert json.dumps(got).count("auc") >= 2, got  # val and test metrics of the resumed run's checkpoint
