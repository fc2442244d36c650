"""The contract of a run's workdir: one live process, what a rerun may change, when a run is finished.

  with lock(wd): ...              one live run per workdir: wd/.lock holds the pid and host of its holder; a
                                  second process stops with one line; a lock left by a dead process is taken over
                                  with a warning; a workdir this process created is removed again when the run
                                  fails before writing anything but its config
  check_config(config, wd)        a rerun resumes only the same run: the same config up to RESUMABLE_FIELDS, and
                                  never fewer steps than it already trained (that would relabel its files)
  finished_summary(config, wd)    summary.json of a run that already finished with this config, else None
  trim_metrics(wd, step)          metrics.jsonl without the rows past the step a resume starts from
  stop_signals()                  SIGTERM / SIGINT ask the training loop to checkpoint and stop (stop_requested())
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import socket
import sys
import threading
import time

from tpp_jax import config as config_lib
from tpp_jax.jsonio import read_json
from tpp_jax.tree import flatten

ConfigError = config_lib.ConfigError

# Config fields a rerun may change and still resume the run in its workdir (the rest must be equal):
#   steps           upward only (more training; fewer is refused: see check_config)
#   optim.lr        downward only (the way out of a run that stopped on NaN / Inf)
#   seeds, pipeline.label_fractions, pipeline.compute_matched, pipeline.brackets, pipeline.report
#                   a pipeline's extra arms: each arm checks its own config, so a pipeline may grow (or a rerun may
#                   leave some out: the finished ones stay in the report)
#   pipeline.controls_from   where the shared control arms are (moved folders): each is checked there again
#   the rest        when to log / evaluate / checkpoint, what to keep, how to show progress and feed the data
RESUMABLE_FIELDS = ("steps", "stop_after", "eval_every", "checkpoint_every", "log_every", "progress",
                    "keep_checkpoints", "eval_splits", "eval_batch_size", "optim.lr", "data.cache", "data.prefetch",
                    "seeds", "pipeline.label_fractions", "pipeline.compute_matched", "pipeline.brackets",
                    "pipeline.report",
                    "pipeline.controls_from")
LOCK_FILE = ".lock"


class WorkdirBusy(ConfigError):
  """Another live process runs in this workdir."""


# ------------------------------------------------------------------------------------------------
# One live run per workdir
# ------------------------------------------------------------------------------------------------

_HELD: dict[str, list] = {}  # lock path -> [fd, depth]: a process re-entering its own lock (pipeline -> arm)
_HELD_LOCK = threading.Lock()


def _holder(text: str) -> dict:
  try:
    return json.loads(text) if text.strip() else {}
  except ValueError:
    return {}


def _describe(h: dict) -> str:
  when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["started"])) if "started" in h else "?"
  return f"pid {h.get('pid', '?')} on host {h.get('host', '?')} (since {when})"


def _acquire(path: pathlib.Path) -> int:
  try:
    import fcntl
  except ImportError:  # no flock (Windows): no lock, but everything else works
    return -1
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    holder = _holder(os.pread(fd, 4096, 0).decode(errors="replace"))
    os.close(fd)
    raise WorkdirBusy(f"--workdir {path.parent} is in use by another run: {_describe(holder)}. Wait for it to "
                      f"finish or stop it, or use another --workdir. (If no such process exists, delete {path}.)"
                      ) from None
  old = _holder(os.pread(fd, 4096, 0).decode(errors="replace"))
  if old:  # the lock file outlived its process (kill -9, power loss): its flock died with it
    print(f"warning: {path.parent}: taking over the lock of {_describe(old)}, which is no longer running.",
          file=sys.stderr)
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode(), 0)
  return fd


def _release(path: pathlib.Path, fd: int):
  if fd < 0:
    return
  with contextlib.suppress(OSError):
    path.unlink()
  os.close(fd)  # closing drops the flock


def _only_config(folder: pathlib.Path) -> bool:
  """Whether `folder` holds nothing a run produced (no files besides config.json and the lock)."""
  return all(p.is_dir() or p.name in (LOCK_FILE, "config.json") for p in folder.rglob("*"))


def _make_workdir(wd: pathlib.Path) -> pathlib.Path | None:
  """Create `wd` (and missing parents); returns the topmost folder THIS process created, else None. A folder another
  process created in the same instant is not ours (mkdir without exist_ok tells): we never remove it."""
  if wd.exists():
    return None
  top = next((p for p in [wd, *wd.parents] if p.parent.exists()), wd)
  try:
    top.mkdir()
  except FileExistsError:
    top = None
  wd.mkdir(parents=True, exist_ok=True)
  return top


@contextlib.contextmanager
def lock(workdir, enabled: bool = True):
  """Hold wd/.lock while the block runs (re-entrant in one process); creates the workdir.

  A workdir this call created is removed again when the block fails before anything but config.json was written
  (a bad data file, a config error found late): no half-made run folder is left behind.
  """
  wd = pathlib.Path(workdir).absolute()
  if not enabled:  # not the main process of a multi-host run: process 0 holds the lock
    yield
    return
  first_new = _make_workdir(wd)
  key = str(wd / LOCK_FILE)
  with _HELD_LOCK:
    held = _HELD.get(key)
    if held is not None:
      held[1] += 1
  if held is None:
    fd = _acquire(wd / LOCK_FILE)  # busy: the folder is the other run's, left as it is
    with _HELD_LOCK:
      _HELD[key] = [fd, 1]
  ok = False
  try:
    yield
    ok = True
  finally:
    with _HELD_LOCK:
      entry = _HELD[key]
      entry[1] -= 1
      last = entry[1] == 0
      if last:
        del _HELD[key]
    if last:
      if not ok and first_new is not None and first_new.exists() and _only_config(first_new):
        shutil.rmtree(first_new, ignore_errors=True)  # still under our flock: no other run can be inside
      _release(wd / LOCK_FILE, entry[0])


# ------------------------------------------------------------------------------------------------
# What a rerun may change
# ------------------------------------------------------------------------------------------------

def step_folders(folder) -> list[int]:
  """The steps of the complete checkpoints in a checkpoint folder (orbax's temporary folders excluded)."""
  folder = pathlib.Path(folder)
  return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()) if folder.is_dir() else []


def checkpoint_steps(workdir) -> list[int]:
  """The steps of the complete periodic checkpoints in wd/checkpoints."""
  return step_folders(pathlib.Path(workdir) / "checkpoints")


def trained_steps(workdir) -> int:
  """How far the run in `workdir` trained: its summary's steps, else its newest checkpoint (0 if none)."""
  wd = pathlib.Path(workdir)
  done = read_json(wd / "summary.json").get("steps", 0) if (wd / "summary.json").exists() else 0
  return max([int(done or 0), *checkpoint_steps(wd)])


def moved_path(old, new, workdir) -> bool:
  """Whether two absolute paths are the same place inside a folder that moved: they end alike in at least two parts
  (e.g. `seed_0/tpp`, a pipeline arm's target_init) and the new one lies in an ancestor of `workdir`. So a pipeline
  copied or moved (`cp -a`, `mv`) resumes where it is now."""
  if not (isinstance(old, str) and isinstance(new, str) and old.startswith("/") and new.startswith("/")):
    return False
  a, b = pathlib.PurePath(old).parts, pathlib.PurePath(new).parts
  n = 0
  while n < min(len(a), len(b)) - 1 and a[-1 - n] == b[-1 - n]:
    n += 1
  if n < 2 or a == b:
    return False
  root = pathlib.Path(*b[:len(b) - n])
  return pathlib.Path(workdir).absolute().is_relative_to(root)


def check_config(config, workdir):
  """Refuse to mix a different run into a workdir that holds one (nothing saved is overwritten or relabelled)."""
  wd = pathlib.Path(workdir)
  cfg_file = wd / "config.json"
  if not cfg_file.exists():
    return
  old = flatten(config_lib.with_defaults(read_json(cfg_file)), sep=".")  # a field added since: its default
  new = flatten(json.loads(config_lib.to_json(config)), sep=".")
  if new.get("pretext.head") == "auto" and old.get("pretext.head") in ("train", "frozen"):
    new["pretext.head"] = old["pretext.head"]  # the run recorded what 'auto' resolved to
  differs = lambda k: old.get(k) != new.get(k) and not moved_path(old.get(k), new.get(k), wd)
  diff = sorted(k for k in set(old) | set(new) if k not in RESUMABLE_FIELDS and differs(k))
  if diff:
    raise ConfigError(f"--workdir {wd} already holds a run with a different config (fields {diff}). Use a new "
                      f"--workdir, or the same config to resume it (fields that may change: {list(RESUMABLE_FIELDS)}).")
  old_lr, new_lr = old.get("optim.lr"), new.get("optim.lr")
  if old_lr is not None and new_lr is not None and float(new_lr) > float(old_lr):
    raise ConfigError(f"--workdir {wd} holds a run with optim.lr={old_lr}; a rerun may lower the lr (e.g. after a "
                      f"NaN) but not raise it (--config.optim.lr={new_lr}). Use a new --workdir.")
  done = trained_steps(wd)
  if int(config.steps) < done:
    raise ConfigError(f"--workdir {wd} holds a run trained to {done} steps; --config.steps={int(config.steps)} would "
                      f"relabel its files. Use a new --workdir for a {int(config.steps)}-step run, or steps >= {done} "
                      "to continue this one.")


def config_history(config, workdir) -> tuple[list[dict], list[dict]]:
  """(the run's whole config_history, this rerun's new entries): every resumable field whose value differs from the
  saved config.json's, as {step (trained steps so far), field, old, new}; after check_config."""
  cfg_file = pathlib.Path(workdir) / "config.json"
  if not cfg_file.exists():
    return [], []
  saved = read_json(cfg_file)
  earlier = list(saved.get(config_lib.HISTORY_KEY, []))
  old = flatten(config_lib.with_defaults(saved), sep=".")
  new = flatten(json.loads(config_lib.to_json(config)), sep=".")
  step = trained_steps(workdir)
  added = [{"step": step, "field": k, "old": old.get(k), "new": new.get(k)}
           for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
  return earlier + added, added


def describe_change(change: dict, workdir) -> str | None:
  """One line for a change of a field that shapes the steps already trained (steps, optim.lr: the change applies
  from the resume step on, and is recorded in config_history); None for the others."""
  field, step, old, new = change["field"], change["step"], change["old"], change["new"]
  if field == "steps":
    return (f"{workdir}: extending the run from {old} to {new} steps; steps 1-{step} ran with the {old}-step "
            "schedule (recorded in config_history of config.json and summary.json).")
  if field == "optim.lr":
    return (f"{workdir}: optim.lr {old} -> {new} from step {step} on; steps 1-{step} ran with {old} (recorded in "
            "config_history of config.json and summary.json).")
  return None


def finished_summary(config, workdir) -> dict | None:
  """summary.json of a run in `workdir` that trained all config.steps (after check_config), else None."""
  path = pathlib.Path(workdir) / "summary.json"
  if not path.exists():
    return None
  summary = read_json(path)
  return summary if summary.get("steps") == int(config.steps) and "final" in summary else None


def trim_metrics(workdir, step: int):
  """Drop metrics.jsonl rows logged after `step` (the checkpoint a resume starts from): the resumed run logs them
  again, so an interrupted + resumed run has the same rows as an uninterrupted one."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return
  lines = path.read_text().splitlines(keepends=True)
  keep = []
  for line in lines:
    try:
      if int(json.loads(line)["step"]) > step:
        continue
    except (ValueError, KeyError, TypeError):  # a line cut by a kill mid-write
      continue
    keep.append(line if line.endswith("\n") else line + "\n")
  if keep != lines:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# SIGTERM / SIGINT: checkpoint, then stop
# ------------------------------------------------------------------------------------------------

_STOP: list[int] = []  # the signal numbers received while stop_signals() is active
_DEPTH = [0]


def stop_requested() -> int | None:
  """The signal (SIGTERM / SIGINT) that asked the run to stop, or None."""
  return _STOP[0] if _STOP else None


@contextlib.contextmanager
def stop_signals():
  """While active, SIGTERM and SIGINT only set stop_requested(): the training loop finishes its step, saves a
  checkpoint and stops. A second signal acts as usual (kills / KeyboardInterrupt). Main thread only; nested uses
  (a pipeline and its arms) share the outermost handlers."""
  if threading.current_thread() is not threading.main_thread() or _DEPTH[0]:
    _DEPTH[0] += 1
    try:
      yield
    finally:
      _DEPTH[0] -= 1
    return
  previous = {}

  def handler(signum, frame):
    _STOP.append(signum)
    signal.signal(signum, previous[signum])  # a second signal acts at once

  _STOP.clear()
  for s in (signal.SIGTERM, signal.SIGINT):
    previous[s] = signal.getsignal(s)
    signal.signal(s, handler)
  _DEPTH[0] += 1
  try:
    yield
  finally:
    _DEPTH[0] -= 1
    for s, h in previous.items():
      signal.signal(s, h)
    _STOP.clear()
