"""A full disk, a read-only folder or a missing permission (an OSError at any point of a CLI run) is ONE line on stderr,
`error: <what was being written>: <path>: [Errno N] <strerror>; <the fix>`, exit code 2 and no traceback (nor orbax's
logs of its failed save threads); the newest intact checkpoint is kept and rerunning the same command resumes there.

The disk fills up through tests/os_fault_inject.py (every file orbax opens in one step's unfinished folder raises
ENOSPC); a folder nobody may write is below a read-only folder, or, for root (whom permissions do not stop), below a
file.
"""
import errno
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tpp_jax import errors, jsonio, main
from tpp_jax.checkpoints import store
from tpp_jax.workdir import step_folders

from conftest import ROOT, one_error_line, run_cli

ARG = "demo,smoke,steps=6,checkpoint_every=2,progress=False"
FULL_AT = 4  # the second checkpoint save finds the disk full
ENOSPC_LINE_END = "free space on that disk and rerun the same command to resume."


def _unwritable(tmp_path, name: str):
  """(a folder that cannot be created, the errno it fails with)."""
  read_only = tmp_path / "read_only"
  read_only.mkdir()
  read_only.chmod(0o555)
  if not os.access(read_only, os.W_OK):
    return read_only / name, errno.EACCES
  blocker = tmp_path / "a_file"  # root writes anywhere: a path through a file fails for everyone
  blocker.write_text("not a folder\n")
  return blocker / name, errno.ENOTDIR


def _cli(args: list, timeout: int = 300):
  """`python ARGS` in a fresh process (8 fake CPU devices), from the repository root."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _os_error_line(r, path, code: int) -> str:
  """The contract: exit 2, no traceback, stderr is exactly one `error:` line naming `path` and `[Errno code]`."""
  line = one_error_line(r)
  assert [l for l in r.stderr.splitlines() if l.strip()] == [line], r.stderr[-3000:]  # nothing else, orbax's neither
  assert str(path) in line and f"[Errno {code}] {os.strerror(code)}" in line, line
  return line


# -- the message -----------------------------------------------------------------------------------

def test_the_line_names_what_was_written_the_path_the_errno_and_the_fix():
  wd = "/disk/run"
  full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{wd}/metrics.jsonl")
  assert errors.os_error_line(full, main.run_file_role(full.filename, wd), path=wd) == (
      f"writing the run's metrics: {wd}/metrics.jsonl: [Errno 28] No space left on device; {ENOSPC_LINE_END}")
  for temp in (".config.json.k3j_x9.tmp", ".summary.json.a1b2.tmp", "metrics.jsonl.tmp"):  # write_atomic's, trim's
    assert main.run_file_role(f"{wd}/{temp}", wd) == main.RUN_FILES[jsonio.written_name(temp)], temp
  read_only = OSError(errno.EROFS, os.strerror(errno.EROFS), wd)
  assert errors.os_error_line(read_only, main.run_file_role(wd, wd), path=wd) == (
      f"creating the run folder (--workdir): {wd}: [Errno 30] Read-only file system; make it writable or choose "
      "another --workdir.")
  no_name = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a write to an open file names none: the workdir
  assert errors.os_error_line(no_name, main.run_file_role(None, wd), path=wd).startswith(
      f"writing the run (--workdir): {wd}: [Errno 28] ")
  denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/x.npz")  # an input, not the run's
  assert main.run_file_role(denied.filename, wd) is None
  assert errors.output_error_line(denied, "/out", "writing the predictions (OUT)", "OUT") == (
      "reading a file: /data/x.npz: [Errno 13] Permission denied; check its permissions.")
  saved = store.CheckpointWriteError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{wd}/checkpoints/4.tmp/meta")
  saved.what = "saving checkpoint step 4"
  assert errors.os_error_line(saved, main.run_file_role(saved.filename, wd), path=wd).startswith(
      f"saving checkpoint step 4: {wd}/checkpoints/4.tmp/meta: [Errno 28] No space left on device; ")


def test_disk_failures_dressed_as_other_exceptions_are_found():
  """tensorstore (orbax's array writer) reports a failed write as a ValueError, safetensors as a SafetensorError."""
  db = "/disk/run/checkpoints/4.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/"
  ts = errors.as_os_error(ValueError(  # what tensorstore raised on a full tmpfs
      f'RESOURCE_EXHAUSTED: Error writing "params.encoder.blocks_1.mlp.fc1.kernel/0.0" in OCDBT database at local file '
      f'"{db}": Failed writing: "{db}d/0074": Failed to write 124717 bytes to file 18: No space left on device '
      "[os_error_code='28']"))
  assert (ts.errno, ts.filename) == (errno.ENOSPC, f"{db}d/0074")
  st = errors.as_os_error(RuntimeError('Error while serializing: IoError(Os { code: 13, kind: PermissionDenied, '
                                      'message: "Permission denied" })'), "/out/adapter.safetensors")
  assert (st.errno, st.filename) == (errno.EACCES, "/out/adapter.safetensors")
  try:
    try:
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), "/ro/x")
    except OSError as cause:
      raise RuntimeError("commit failed") from cause
  except RuntimeError as e:
    chained = errors.as_os_error(e)
  assert (chained.errno, chained.filename) == (errno.EROFS, "/ro/x")
  assert errors.as_os_error(ValueError("steps=-1 must be positive")) is None
  assert errors.as_os_error(KeyError("params")) is None


# -- python -m tpp_jax.main ------------------------------------------------------------------------

def test_an_unwritable_workdir_is_one_line(tmp_path):
  wd, code = _unwritable(tmp_path, "run")
  r = run_cli(["--config", f"configs/experiment.py:{ARG}", "--workdir", str(wd)], timeout=300)
  line = _os_error_line(r, wd, code)
  assert line.startswith(f"error: creating the run folder (--workdir): {wd}: "), line
  assert line.endswith("choose another --workdir."), line


def test_a_full_disk_in_a_store_save_is_one_oserror_without_orbax_logs(tmp_path, caplog, monkeypatch):
  """In process: the failure orbax's save threads hit surfaces as one CheckpointWriteError; orbax logs nothing; the
  store saves again once there is space."""
  import jax.numpy as jnp
  from etils.epath import gpath
  from os_fault_inject import full_disk_open

  def state(step):
    return {"step": jnp.asarray(step, jnp.int32), "params": {"w": jnp.full((8,), float(step))}}
  s = store.CheckpointStore(tmp_path / "run", keep=2)
  s.save(2, state(2), {"data_iter": {"at": 2}})
  monkeypatch.setattr(gpath._GPath, "open", full_disk_open(4, gpath._GPath.open))
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="absl"), pytest.raises(store.CheckpointWriteError) as e:
    s.save(4, state(4), {"data_iter": {"at": 4}})
  assert e.value.errno == errno.ENOSPC and e.value.what == "saving checkpoint step 4", e.value
  assert f"{tmp_path / 'run' / 'checkpoints' / '4'}{store.TMP_SUFFIX}" in e.value.filename, e.value.filename
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text[-3000:]
  folder = tmp_path / "run" / "checkpoints"
  assert sorted(p.name for p in folder.iterdir()) == ["2"]  # the unfinished step is gone, step 2 untouched
  assert store.damage(folder / "2") is None
  restored, meta = s.restore(state(0))
  assert int(restored["step"]) == 2 and float(restored["params"]["w"][0]) == 2.0 and meta["data_iter"] == {"at": 2}
  monkeypatch.undo()  # space again: the same store saves the step
  s.save(4, state(4), {"data_iter": {"at": 4}})
  assert step_folders(folder) == [2, 4] and store.damage(folder / "4") is None
  s.close()


@pytest.fixture(scope="module")
def full_disk_run(tmp_path_factory):
  """A run whose disk is full at its second checkpoint (step 4), what it left, then the same command rerun."""
  wd = tmp_path_factory.mktemp("full_disk") / "run"
  args = ["--config", f"configs/experiment.py:{ARG}", "--workdir", str(wd)]
  failed = _cli([str(ROOT / "tests" / "os_fault_inject.py"), str(FULL_AT), *args])
  left = {"entries": sorted(p.name for p in (wd / "checkpoints").iterdir()) if (wd / "checkpoints").is_dir() else [],
          "damage": store.damage(wd / "checkpoints" / "2"),
          "sealed": (wd / "checkpoints" / "2" / store.CHECKSUMS).is_file(),
          "summary": (wd / "summary.json").exists()}
  rerun = run_cli(args, timeout=300)
  return wd, failed, left, rerun


def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_keeps_the_last_step(full_disk_run):
  wd, failed, left, _ = full_disk_run
  line = _os_error_line(failed, wd / "checkpoints" / f"{FULL_AT}{store.TMP_SUFFIX}", errno.ENOSPC)
  assert line.startswith(f"error: saving checkpoint step {FULL_AT}: "), line
  assert line.endswith(ENOSPC_LINE_END), line
  assert left["entries"] == ["2"], left  # step 2 kept, nothing of the failed step 4 left behind
  assert left["damage"] is None and left["sealed"] and not left["summary"], left


def test_rerunning_after_a_full_disk_resumes_from_the_kept_step(full_disk_run):
  wd, _, _, rerun = full_disk_run
  assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
  assert f"Resumed {wd} at step 2." in rerun.stdout, rerun.stdout[-2000:]
  assert json.loads((wd / "summary.json").read_text())["steps"] == 6
  assert step_folders(wd / "checkpoints") == [4, 6]


# -- python -m tpp_jax.predict / export / export_backbone / report --------------------------------

def test_predict_and_export_into_an_unwritable_out_are_one_line(full_disk_run, tmp_path):
  wd, _, _, rerun = full_disk_run
  assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
  images = tmp_path / "images"
  images.mkdir()
  rng = np.random.default_rng(0)
  for i in range(2):
    Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8)).save(images / f"{i}.png")
  out, code = _unwritable(tmp_path, "out")
  r = _cli(["-m", "tpp_jax.predict", str(wd), str(images), str(out), "--no-progress"])
  line = _os_error_line(r, out, code)
  assert line.startswith(f"error: writing the predictions (OUT): {out}: "), line
  assert line.endswith("choose another OUT."), line
  r = _cli(["-m", "tpp_jax.export", str(wd), str(out), "--format", "adapter"])
  line = _os_error_line(r, out, code)
  assert line.startswith(f"error: writing the export (OUT): {out}: "), line


def test_report_and_export_backbone_on_a_full_disk_are_one_line(tmp_path, monkeypatch, capsys):
  """In process (their writes are plain files / safetensors): the entry points' error handling."""
  from tpp_jax import export_backbone
  from tpp_jax.report import cli as report_cli
  target = tmp_path / "runs" / "report.md"

  def full(*_):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
  monkeypatch.setattr(report_cli, "write_report", full)
  with pytest.raises(SystemExit) as e:
    report_cli.main([str(tmp_path / "runs")])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.splitlines() == [
      f"error: writing the report: {target}: [Errno 28] No space left on device; free space on that disk and rerun "
      "the same command."], err

  out_dir = tmp_path / "backbone"

  def full_safetensors(*_):  # what safetensors raises (a SafetensorError) when the disk is full: no path in it
    raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on '
                       'device" })')
  monkeypatch.setattr(export_backbone, "export", full_safetensors)
  monkeypatch.setattr(sys, "argv", ["export_backbone", str(tmp_path / "pretrain"), str(out_dir)])
  with pytest.raises(SystemExit) as e:
    export_backbone.main()
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.splitlines() == [
      f"error: writing the backbone (OUT_DIR): {out_dir}: [Errno 28] No space left on device; free space on that "
      "disk and rerun the same command."], err
