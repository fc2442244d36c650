"""The workdir contract through the CLI: kill -9 anywhere resumes to the uninterrupted result, a finished run is not
retrained, nothing non-finite is saved, SIGTERM / SIGINT checkpoint and stop, no relabelling, one live run per
workdir."""
import json
import os
import shutil
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tpp_jax import config as config_lib
from tpp_jax import main
from tpp_jax import workdir as workdir_lib

from conftest import load_config, one_error_line, run_cli

PIPE_ARG = "smoke,steps=6,pipeline.tpp_steps=6,checkpoint_every=2,eval_every=3"
ARMS = ("tpp", "tpp_finetune", "baseline")
RUN_ARG = "demo,smoke,steps=6,checkpoint_every=2,eval_every=3,log_every=1"
VOLATILE = ("wall_time_s", "images_per_sec")  # how long it took
# (the CLI re-executes with huge pages, the in-process reference runs without): the only fields a resume may change


def _summary(run_dir):
  text = (run_dir / "summary.json").read_text().replace(str(run_dir.parent.parent), "WD")
  return {k: v for k, v in json.loads(text).items() if k not in VOLATILE}


def _rows(run_dir):
  return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE}
          for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _steps(folder):
  return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """An uninterrupted RUN_ARG run through the CLI, as the runs it is compared with: the reference of the
  interruption tests (not modified by them)."""
  wd = tmp_path_factory.mktemp("finished") / "run"
  r = run_cli(["--config", f"configs/experiment.py:{RUN_ARG}", "--workdir", str(wd)])
  assert r.returncode == 0, r.stderr[-2000:]
  return wd


def test_pipeline_killed_at_any_point_resumes_to_the_uninterrupted_result(tmp_path, capsys):
  one_device = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}  # the same in every process; compiles faster
  ref, wd = tmp_path / "ref", tmp_path / "killed"
  r = run_cli(["--config", f"configs/default.py:{PIPE_ARG}", "--workdir", str(ref)], env=one_device)
  assert r.returncode == 0, r.stderr[-3000:]
  cli = ["--config", f"configs/default.py:{PIPE_ARG}", "--workdir", str(wd)]
  kill_points = ("tpp:step:5",                    # the pretext arm mid training: steps 5 is lost (checkpoint 4)
                 "tpp_finetune:eval:3",           # between an eval (best kept) and the next checkpoint
                 "baseline:final_checkpoint:6")   # after the last checkpoint, before the final eval and summary
  for fault in kill_points:
    r = run_cli(cli, env=one_device, fault=fault)
    assert r.returncode == -signal.SIGKILL, (fault, r.stderr[-2000:])
  r = run_cli(cli, env=one_device)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "taking over the lock" in r.stderr and "Traceback" not in r.stderr
  assert r.stdout.count("nothing to do") == 2  # tpp and tpp_finetune finished earlier: not trained again
  for arm in ARMS:
    a, b = ref / "seed_0" / arm, wd / "seed_0" / arm
    assert _summary(b) == _summary(a), arm
    assert _rows(b) == _rows(a), arm  # the same losses and metrics, each row once
    assert _steps(b / "checkpoints") == _steps(a / "checkpoints") and _steps(b / "best") == _steps(a / "best"), arm
  assert json.loads((wd / "comparison.json").read_text()) == json.loads((ref / "comparison.json").read_text())
  assert not list(wd.rglob(workdir_lib.LOCK_FILE))

  # a rerun of the finished pipeline trains nothing, exits 0 and leaves every run file as it was
  files = {p: p.read_bytes() for p in (wd / "seed_0").rglob("*") if p.is_file()}
  main.run(load_config("default", PIPE_ARG), str(wd))
  assert capsys.readouterr().out.count("nothing to do") == 3
  assert {p: p.read_bytes() for p in (wd / "seed_0").rglob("*") if p.is_file()} == files
  # fewer steps: refused by the first arm that trained more, before the pipeline writes anything
  files = {p: p.read_bytes() for p in wd.rglob("*") if p.is_file()}
  with pytest.raises(config_lib.ConfigError, match="trained to 6 steps; --config.steps=4 would relabel"):
    main.run(load_config("default", PIPE_ARG + ",steps=4"), str(wd))
  assert {p: p.read_bytes() for p in wd.rglob("*") if p.is_file()} == files


def test_fewer_steps_on_a_finished_run_is_refused_and_changes_nothing(finished_run):
  wd = finished_run
  files = {p: p.read_bytes() for p in wd.rglob("*") if p.is_file()}
  r = run_cli(["--config", f"configs/experiment.py:{RUN_ARG}", "--config.steps=4", "--workdir", str(wd)])
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines() == [r.stderr.strip()]  # one line
  assert "trained to 6 steps; --config.steps=4 would relabel its files" in r.stderr
  assert {p: p.read_bytes() for p in wd.rglob("*") if p.is_file()} == files
  # the same command again: finished, nothing to do, nothing rewritten
  again = main.run(load_config("experiment", RUN_ARG), str(wd))
  assert again["final"] == json.loads((wd / "summary.json").read_text())["final"]
  assert {p: p.read_bytes() for p in wd.rglob("*") if p.is_file()} == files


def test_divergence_saves_nothing_past_the_last_sane_step_and_the_way_out_in_the_message_works(tmp_path):
  """lr 100 with a 10-step warm-up: sane for a few steps, then the trainable norm passes optim.max_param_norm (1e4)
  before any NaN. The run stops with one line; every kept checkpoint is finite and within the bound; the rerun the
  message names (a lower lr, same workdir) resumes from the last kept step, finishes, and records the change."""
  wd = tmp_path / "run"
  arg = "demo,smoke,steps=10,checkpoint_every=1,log_every=5,optim.warmup_steps=10"
  r = run_cli(["--config", f"configs/experiment.py:{arg}", "--config.optim.lr=100.0", "--workdir", str(wd)])
  line = one_error_line(r)
  assert line.startswith("error: TrainingError: Training diverged at step "), line
  assert "optim.max_param_norm=10000" in line and "rerun the same command with a lower --config.optim.lr" in line, line
  bad = int(line.split("diverged at step ")[1].split(":")[0])
  last = int(line.split("the last checkpoint, step ")[1].split(" ")[0])
  assert 0 < last < bad and workdir_lib.checkpoint_steps(wd)[-1] == last
  for step in workdir_lib.checkpoint_steps(wd):  # every saved leaf is finite and of a sane size
    mngr = ocp.CheckpointManager(wd / "checkpoints")
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    mngr.close()
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(state["params"])]
    assert all(np.isfinite(x).all() for x in leaves), step
    assert max(float(np.abs(x).max()) for x in leaves) <= 1e4, step
  # the way out the message gives: a lower lr in the same workdir resumes from that checkpoint and finishes
  r = run_cli(["--config", f"configs/experiment.py:{arg}", "--config.optim.lr=1e-3", "--workdir", str(wd)])
  assert r.returncode == 0, r.stderr[-2000:]
  assert f"Resumed {wd} at step {last}" in r.stdout and f"optim.lr 100.0 -> 0.001 from step {last} on" in r.stdout
  summary = json.loads((wd / "summary.json").read_text())
  change = {"step": last, "field": "optim.lr", "old": 100.0, "new": 0.001}
  assert summary["steps"] == 10 and summary["config_history"] == [change]
  assert json.loads((wd / "config.json").read_text())["config_history"] == [change]
  # a higher lr than the run's is still refused; the finished run says a lower one changes nothing
  r = run_cli(["--config", f"configs/experiment.py:{arg}", "--config.optim.lr=1e-2", "--workdir", str(wd)])
  assert r.returncode == 2 and "may lower the lr" in r.stderr
  r = run_cli(["--config", f"configs/experiment.py:{arg}", "--config.optim.lr=1e-4", "--workdir", str(wd)])
  assert r.returncode == 0 and "nothing to do" in r.stdout and "optim.lr=0.0001 (it ran with 0.001) changes nothing" \
      in r.stdout, r.stdout[-2000:]
  assert json.loads((wd / "summary.json").read_text()) == summary


def test_extending_a_finished_run_is_recorded_as_an_extension(finished_run, tmp_path):
  wd = tmp_path / "run"
  shutil.copytree(finished_run, wd)
  r = run_cli(["--config", f"configs/experiment.py:{RUN_ARG}", "--config.steps=8", "--workdir", str(wd)])
  assert r.returncode == 0, r.stderr[-2000:]
  assert "extending the run from 6 to 8 steps; steps 1-6 ran with the 6-step schedule" in r.stdout, r.stdout[-2000:]
  summary = json.loads((wd / "summary.json").read_text())
  assert summary["steps"] == 8 and summary["config_history"] == [{"step": 6, "field": "steps", "old": 6, "new": 8}]
  before, rows = _rows(finished_run), _rows(wd)
  assert rows[:len(before)] == before and {r["step"] for r in rows[len(before):]} == {7, 8}  # the 6 steps kept


@pytest.mark.parametrize("sig", ["TERM", "INT"])
def test_sigterm_and_sigint_checkpoint_stop_and_resume_exactly(tmp_path, finished_run, sig):
  ref = finished_run
  wd = tmp_path / "run"
  cli = ["--config", f"configs/experiment.py:{RUN_ARG}", "--workdir", str(wd)]
  r = run_cli(cli, fault=f"run:step:5:{sig}")
  signum = getattr(signal, "SIG" + sig)
  assert r.returncode == 128 + signum, r.stderr[-2000:]
  assert r.stderr.strip() == (f"stopped: SIG{sig}: stopped at step 5 of 6 after saving checkpoint step 5 in "
                              f"{wd / 'checkpoints'}; rerun the same command to resume.")
  assert 5 in workdir_lib.checkpoint_steps(wd) and not (wd / workdir_lib.LOCK_FILE).exists()
  r = run_cli(cli)
  assert r.returncode == 0 and f"Resumed {wd} at step 5" in r.stdout, r.stderr[-2000:]
  assert _summary(wd) == _summary(ref)
  assert _rows(wd) == _rows(ref)


def test_one_live_run_per_workdir_and_a_stale_lock_is_taken_over(tmp_path, capsys):
  wd = tmp_path / "run"
  cli = ["--config", "configs/experiment.py:demo,smoke,steps=2", "--workdir", str(wd)]
  with workdir_lib.lock(wd):
    r = run_cli(cli)
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert f"is in use by another run: pid {os.getpid()} on host" in r.stderr
  assert not (wd / "metrics.jsonl").exists()  # the second process wrote nothing
  (wd / workdir_lib.LOCK_FILE).write_text(json.dumps({"pid": 2 ** 22 + 1, "host": "gone", "started": 0}))
  main.run(load_config("experiment", "demo,smoke,steps=2"), str(wd))
  assert "taking over the lock of pid 4194305 on host gone" in capsys.readouterr().err
  assert (wd / "summary.json").exists() and not (wd / workdir_lib.LOCK_FILE).exists()


def test_a_run_that_fails_before_training_leaves_no_workdir(tmp_path):
  wd = tmp_path / "new" / "run"
  c = load_config("experiment", "demo,smoke,steps=2")
  c.data.path = str(tmp_path / "missing.npz")
  with pytest.raises(FileNotFoundError):
    main.run(c, str(wd))
  assert not (tmp_path / "new").exists()


def test_check_config_lists_what_may_change(tmp_path):
  c = load_config("experiment", "demo,smoke,steps=4")
  (tmp_path / "config.json").write_text(config_lib.to_json(c))
  for field, value in (("steps", 8), ("eval_every", 7), ("log_every", 3), ("checkpoint_every", 5)):
    d = load_config("experiment", f"demo,smoke,steps=4,{field}={value}")
    workdir_lib.check_config(d, tmp_path)
  d = load_config("experiment", "demo,smoke,steps=4,optim.lr=1e-5")
  workdir_lib.check_config(d, tmp_path)  # a lower lr: allowed
  with pytest.raises(config_lib.ConfigError, match=r"fields \['optim.weight_decay'\]"):
    workdir_lib.check_config(load_config("experiment", "demo,smoke,steps=4,optim.weight_decay=0.3"), tmp_path)


def test_a_run_saved_before_a_behaviour_changing_field_is_not_resumed_with_its_new_default(tmp_path):
  """pretext.dino_batch_norm came with default True; a DINO workdir saved before it ran without: a rerun with today's
  default must refuse (not mix two DINOs in one run), and one with dino_batch_norm=False resumes it."""
  c = load_config("experiment", "demo,smoke,steps=4,pretext.type=dino")
  saved = json.loads(config_lib.to_json(c))
  del saved["pretext"]["dino_batch_norm"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  with pytest.raises(config_lib.ConfigError, match=r"fields \['pretext.dino_batch_norm'\]"):
    workdir_lib.check_config(c, tmp_path)
  old = load_config("experiment", "demo,smoke,steps=4,pretext.type=dino,pretext.dino_batch_norm=False")
  workdir_lib.check_config(old, tmp_path)
  workdir_lib.check_config(c, tmp_path.parent / "fresh")  # a new workdir: no question
  mae = load_config("experiment", "demo,smoke,steps=4")  # an MAE run saved before the field: resumes as it was
  saved = json.loads(config_lib.to_json(mae))
  del saved["pretext"]["dino_batch_norm"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  workdir_lib.check_config(mae, tmp_path)


def test_cli_old_dino_workdir_refuses_the_new_default_and_resumes_as_it_ran(tmp_path):
  """Through python -m tpp_jax.main: a DINO run saved before pretext.dino_batch_norm existed (the field removed from
  its config.json) is refused by a rerun with today's default, with one error naming the field; with the old value
  it resumes and trains on to the new step count."""
  wd = tmp_path / "dino"
  arg = "demo,smoke,stage=tpp,pretext.type=dino,steps=2,checkpoint_every=1,eval_every=0"
  r = run_cli(["--config", f"configs/experiment.py:{arg}", "--workdir", str(wd)])
  assert r.returncode == 0, r.stderr[-2000:]
  saved = json.loads((wd / "config.json").read_text())
  assert saved["pretext"]["dino_batch_norm"] is True
  del saved["pretext"]["dino_batch_norm"]
  (wd / "config.json").write_text(json.dumps(saved))
  before = sorted(p.name for p in wd.rglob("*"))
  r = run_cli(["--config", f"configs/experiment.py:{arg.replace('steps=2', 'steps=3')}", "--workdir", str(wd)])
  msg = one_error_line(r)
  assert "pretext.dino_batch_norm" in msg, msg
  assert sorted(p.name for p in wd.rglob("*")) == before  # nothing written
  r = run_cli(["--config", f"configs/experiment.py:{arg.replace('steps=2', 'steps=3')},pretext.dino_batch_norm=False",
               "--workdir", str(wd)])
  assert r.returncode == 0, r.stderr[-2000:]
  assert json.loads((wd / "summary.json").read_text())["steps"] == 3


def test_trim_metrics_drops_rows_past_the_resume_step_and_a_cut_line(tmp_path):
  rows = [{"step": s, "split": "train"} for s in (1, 2, 3, 4)]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "spl')
  workdir_lib.trim_metrics(tmp_path, 2)
  assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_folder_another_process_created_in_the_same_instant_is_never_removed(tmp_path, monkeypatch):
  """Two runs start on the same new folder at once: the one whose mkdir finds the folder already made (the other
  run's) does not own it, so its failure (busy, a bad config) never removes it."""
  import pathlib
  top, wd = tmp_path / "new", tmp_path / "new" / "run"
  real_mkdir = pathlib.Path.mkdir

  def other_process_wins(self, *args, **kwargs):  # between our exists() check and our mkdir, the other run's mkdir
    if self == top and not self.exists():
      real_mkdir(self)
      (self / "theirs.txt").write_text("the other run's file")
    return real_mkdir(self, *args, **kwargs)

  monkeypatch.setattr(pathlib.Path, "mkdir", other_process_wins)
  with pytest.raises(RuntimeError, match="late config error"):
    with workdir_lib.lock(wd):
      raise RuntimeError("late config error")
  assert (top / "theirs.txt").exists() and wd.is_dir()
  monkeypatch.undo()
  with pytest.raises(RuntimeError):  # a folder this process made is removed again on such a failure
    with workdir_lib.lock(tmp_path / "ours" / "run"):
      raise RuntimeError("late config error")
  assert not (tmp_path / "ours").exists()
