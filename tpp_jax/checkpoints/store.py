"""Orbax checkpoints of a run: periodic (keep-N) + best-by-metric, exact resume, target handover.

Layout in the workdir:
  checkpoints/<step>/{state, meta}   state = {params, opt_state, aux, step}; meta = {data_iter, ...}
  best/<step>/{state, meta}          the best step by the validation metric (params + aux only)
  <step>/tpp_checksums.json          sha256 and size of every file of the step, written once orbax finished it
  damaged_checkpoints/<folder>_<step>  a step that failed its checksums or its restore, moved aside (never deleted)

A store opened on a workdir checks the newest steps first: a damaged one is reported in one line and moved aside, so
the run resumes from the newest intact step and keep-N never deletes an intact step while a damaged one is newer.
A save that fails for the disk (full, read-only, no permission) raises one CheckpointWriteError (an OSError naming the
step and the file) instead of orbax's tracebacks; its unfinished folder is removed, every finished step is kept.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import pathlib
import shutil
import sys
import threading
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp

from tpp_jax.errors import as_os_error
from tpp_jax.tree import flatten, leaf_paths, path_str, unflatten
from tpp_jax.workdir import step_folders

CHECKSUMS = "tpp_checksums.json"
DAMAGED = "damaged_checkpoints"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax writes a step into <step>.orbax-checkpoint-tmp[-<time>], then renames it
SETTLE_TIMEOUT_S = 300  # how long a failed save waits for each of orbax's other save threads
class CheckpointWriteError(OSError):
  """A checkpoint could not be written (disk full, read-only, no permission): `what` names the step, `filename` the
  file; the checkpoints saved before are intact."""

  what = "saving a checkpoint"


def _quiet_closed_loops(hook):
  """sys.unraisablehook `hook` without the 'Event loop is closed' RuntimeError tensorstore reports (a bare traceback
  on stderr) for each array write still in flight when a failing orbax save closed the event loop awaiting it:
  nothing is lost, that step is discarded anyway."""
  if getattr(hook, "quiet_closed_loops", False):
    return hook

  def quiet(unraisable):
    e = unraisable.exc_value
    if unraisable.object is None and isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
      return
    hook(unraisable)
  quiet.quiet_closed_loops = True
  return quiet


def quiet_abandoned_writes():
  """After a failed save: orbax's array writes that never started are coroutines nobody awaits; Python warns of each
  when the interpreter exits ('coroutine ... was never awaited'), after the one error line. That step is discarded
  anyway, so those warnings are dropped (only they)."""
  warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)


class _HeldLogs(logging.Filter):
  """Holds back what is logged on the absl logger (orbax's) while attached."""

  def __init__(self):
    super().__init__()
    self.records = []

  def filter(self, record):
    self.records.append(record)
    return False


def _files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def _sha256(path: pathlib.Path) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def write_checksums(step_dir: pathlib.Path):
  """Record sha256 + size of every file of a finished orbax step (written last: a step without it is unverified)."""
  sums = {str(p.relative_to(step_dir)): {"sha256": _sha256(p), "size": p.stat().st_size} for p in _files(step_dir)}
  tmp = step_dir / (CHECKSUMS + ".tmp")
  tmp.write_text(json.dumps(sums, indent=0))
  tmp.replace(step_dir / CHECKSUMS)


def damage(step_dir: pathlib.Path) -> str | None:
  """Why the checkpoint step `step_dir` is damaged (a file missing, cut or changed since it was saved), or None when
  it matches its checksums (or predates them)."""
  sums_file = step_dir / CHECKSUMS
  if not sums_file.exists():
    return None
  try:
    sums = json.loads(sums_file.read_text())
  except ValueError:
    return f"{sums_file} is unreadable"
  for name, want in sums.items():
    p = step_dir / name
    if not p.is_file():
      return f"{p} is missing"
    if p.stat().st_size != want["size"]:
      return f"{p} has {p.stat().st_size} bytes, {want['size']} when saved"
    if _sha256(p) != want["sha256"]:
      return f"{p} changed since it was saved (sha256 mismatch)"
  return None


def check_intact(step_dir: pathlib.Path):
  """One ValueError naming the damaged file of a checkpoint step a run reads (target_init, init.path, eval)."""
  why = damage(step_dir)
  if why is not None:
    raise ValueError(f"checkpoint {step_dir} is damaged: {why}. Restore it from a backup, or rerun the run that "
                     "wrote it.")


def _is_main() -> bool:
  return jax.process_index() == 0


def quarantine(step_dir: pathlib.Path, why: str) -> pathlib.Path:
  """Move a damaged step out of orbax's folder into WORKDIR/damaged_checkpoints (kept, never deleted)."""
  dest_dir = step_dir.parent.parent / DAMAGED
  dest = dest_dir / f"{step_dir.parent.name}_{step_dir.name}"
  i = 1
  while dest.exists():
    dest, i = dest_dir / f"{step_dir.parent.name}_{step_dir.name}.{i}", i + 1
  if _is_main():
    dest_dir.mkdir(parents=True, exist_ok=True)
    shutil.move(str(step_dir), str(dest))
  print(f"warning: checkpoint {step_dir} is damaged ({why}); moved to {dest}, using the newest intact one.",
        file=sys.stderr)
  return dest


def drop_damaged(folder: pathlib.Path) -> int:
  """Quarantine the damaged steps of `folder`, newest first, up to the first intact one; returns how many moved."""
  moved = 0
  for step in reversed(step_folders(folder)):
    why = damage(folder / str(step))
    if why is None:
      break
    quarantine(folder / str(step), why)
    moved += 1
  return moved


def _none_left(folder: pathlib.Path) -> ValueError:
  return ValueError(f"no intact checkpoint is left in {folder} (the damaged ones are in {folder.parent / DAMAGED}); "
                    "start over with a new --workdir.")


def save_replicated_arrays_whole():
  """On one host, orbax saves each replicated array once, whole.

  orbax's default off GPU ("replica-parallel" saving, made for many hosts) cuts every replicated array into one slice
  per device, each sliced on the device by a small compiled program, and writes the slices. On one host that only
  adds work: a save of the demo fine-tune state (185 arrays, 10.8 MiB, replicated over 8 CPU devices) took
  1.9-2.1 s, 0.85-1.05 s whole (benchmarks/checkpoint_save.py). The files read back the same either way.
  Several hosts keep orbax's default; a jax.Array handler registered by the user is kept.
  """
  current = ocp.type_handlers.get_type_handler(jax.Array)
  if jax.process_count() > 1 or type(current) is not ocp.type_handlers.ArrayHandler:
    return
  if not getattr(current, "_use_replica_parallel", False):
    return
  absl_logger = logging.getLogger("absl")  # orbax warns of every override on stderr: this one is meant
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(
            use_replica_parallel=False, array_metadata_store=getattr(current, "_array_metadata_store", None)),
        override=True)
  finally:
    absl_logger.setLevel(level)


class CheckpointStore:
  """Periodic and best checkpoints of one workdir, checksummed; damaged steps are moved aside, never restored."""

  def __init__(self, workdir: str | pathlib.Path, keep: int = 2, best_mode: str = "max"):
    save_replicated_arrays_whole()
    self.dir = pathlib.Path(workdir).absolute()
    self.keep, self.best_mode = keep, best_mode
    if drop_damaged(self.dir / "checkpoints") and not step_folders(self.dir / "checkpoints"):
      raise _none_left(self.dir / "checkpoints")
    drop_damaged(self.dir / "best")
    self._open()

  def _open(self, which=("latest", "best")):
    if "latest" in which:
      self.latest = ocp.CheckpointManager(
          self.dir / "checkpoints", options=ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True))
    if "best" in which:
      self.best = ocp.CheckpointManager(
          self.dir / "best", options=ocp.CheckpointManagerOptions(
              max_to_keep=1, create=True, best_fn=lambda m: m["value"], best_mode=self.best_mode))

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def save(self, step: int, state: dict, meta: dict, force: bool = False):
    if step in self.latest.all_steps():  # already saved (e.g. a periodic save at the same step)
      return
    with self._writing(self.latest, step, f"saving checkpoint step {step}"):
      self.latest.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)), force=force)
      self._seal(self.latest, step)

  @contextlib.contextmanager
  def _writing(self, mngr, step: int, what: str):
    """One save, waited for: a disk failure (in this thread or orbax's save threads, which log it with a traceback
    each) surfaces as one CheckpointWriteError and nothing of orbax's logs; the step's unfinished files are removed.
    Any other failure raises as it is, with orbax's logs."""
    folder = pathlib.Path(mngr.directory)
    held, absl_logger = _HeldLogs(), logging.getLogger("absl")
    absl_logger.addFilter(held)
    before = set(threading.enumerate())
    unraisable_hook = sys.unraisablehook
    sys.unraisablehook = _quiet_closed_loops(unraisable_hook)  # kept after a failure: late writes report there too
    try:
      yield
      sys.unraisablehook = unraisable_hook
    except Exception as e:
      err = as_os_error(e, folder / str(step))
      if err is None:
        raise
      self._settle(mngr, before)  # every thread the save started has ended: none can log after this
      quiet_abandoned_writes()
      held.records.clear()
      self._drop_unfinished(folder, step)
      failed = CheckpointWriteError(err.errno, err.strerror, err.filename)
      failed.what = what
      raise failed from e
    finally:
      absl_logger.removeFilter(held)
      for record in held.records:  # a save that worked (or failed otherwise): orbax's logs as they were
        absl_logger.handle(record)

  def _settle(self, mngr, before: set):
    """After a failed save: wait for the save's other threads (the first failure reaches this thread while they
    still write into the step's folder; left running they would log their own failures, and fail again when the
    interpreter exits), then put a fresh manager in place of the failed one. `before`: the threads alive before the
    save; every other one is the save's (orbax's own classes and the plain threads it starts: async_save, the
    metadata store's worker)."""
    with contextlib.suppress(Exception):  # the failure is already in hand; closing reports it again
      mngr.close()
    for thread in threading.enumerate():
      if thread is not threading.current_thread() and thread not in before and not thread.daemon:
        threading.Thread.join(thread, SETTLE_TIMEOUT_S)  # orbax's join would raise the thread's failure again
      elif thread is not threading.current_thread() and type(thread).__module__.startswith("orbax."):
        threading.Thread.join(thread, SETTLE_TIMEOUT_S)
    with contextlib.suppress(Exception):  # a folder that cannot be opened again fails the next save, as it should
      self._open(("latest",) if mngr is self.latest else ("best",))

  def _drop_unfinished(self, folder: pathlib.Path, step: int):
    """Remove what a failed save of `step` left: orbax's temporary folder (never a finished step) and a half-written
    checksum file (the step stays valid without it: orbax had finished it)."""
    if not _is_main():
      return
    for tmp in folder.glob(f"{step}{TMP_SUFFIX}*"):
      shutil.rmtree(tmp, ignore_errors=True)
    with contextlib.suppress(OSError):
      (folder / str(step) / (CHECKSUMS + ".tmp")).unlink(missing_ok=True)

  def _seal(self, mngr, step: int):
    """Wait for orbax to finish the step, then write its checksums (what restore verifies)."""
    mngr.wait_until_finished()
    if _is_main():
      write_checksums(pathlib.Path(mngr.directory) / str(step))

  def best_meta(self) -> dict | None:
    """{'step', 'metric', 'value'} of the kept best checkpoint, or None."""
    step = self.best.latest_step()
    if step is None:
      return None
    return dict(self.best.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

  def save_best(self, step: int, state: dict, value: float, meta: dict):
    if step in self.best.all_steps():  # a resumed run re-reaching a kept step: resume is exact, so it is the same
      return
    with self._writing(self.best, step, f"saving the best checkpoint (step {step})"):
      self.best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave(meta)),
                     metrics={"value": float(value)}, force=True)
      self._seal(self.best, step)

  def restore_best(self, template: dict) -> tuple[dict, dict]:
    """Restore ({'params', 'aux'}, meta) of the kept best step into the structure/shardings of `template`
    ({'params', 'aux'}, e.g. the live state's); its checksums are verified first (check_intact)."""
    step = self.best.latest_step()
    if step is None:
      raise FileNotFoundError(f"{self.dir / 'best'} holds no best checkpoint.")
    self.best.wait_until_finished()
    check_intact(self.dir / "best" / str(step))
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    r = self.best.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                        meta=ocp.args.JsonRestore()))
    return r["state"], dict(r["meta"])

  def restore(self, template: dict) -> tuple[dict, dict]:
    """Restore (state, meta) of the newest intact step into the structure/shardings of `template`.

    A step that fails to restore (damaged without checksums, e.g. saved by an older version) is moved aside like a
    step that fails its checksums, and the next older one is tried.
    """
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    while (step := self.latest.latest_step()) is not None:
      try:
        r = self.latest.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                              meta=ocp.args.JsonRestore()))
        return r["state"], r["meta"]
      except Exception as e:  # noqa: BLE001 - orbax / tensorstore raise many kinds for a cut or missing file
        self.close()
        quarantine(self.dir / "checkpoints" / str(step), f"restore failed: {type(e).__name__}: {str(e)[:200]}")
        self._open()
    raise _none_left(self.dir / "checkpoints")

  def wait(self):
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self):
    self.wait()
    self.latest.close()
    self.best.close()


def load_subtree(workdir: str | pathlib.Path, subtree: dict, prefer_best: bool = False) -> tuple[dict, int]:
  """Partial restore of `subtree` (nested dict under state/params) from a run's checkpoint.

  Returns (restored subtree, step). Only the leaves named in `subtree` are read.
  """
  workdir = pathlib.Path(workdir).absolute()
  folder = workdir / ("best" if prefer_best and (workdir / "best").exists() else "checkpoints")
  if not folder.exists():
    raise FileNotFoundError(f"No checkpoints in {workdir} (looked for {folder}); target_init must be the "
                            "--workdir of a finished `tpp` run.")
  mngr = ocp.CheckpointManager(folder)
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"{folder} holds no complete checkpoint; rerun or finish the `tpp` stage there.")
  check_intact(folder / str(step))
  item = {"params": jax.tree_util.tree_map(lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), subtree)}
  try:
    r = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
  except (ValueError, KeyError) as e:
    raise ValueError(f"Checkpoint {folder}/{step} does not hold the requested parameters "
                     f"({leaf_paths(subtree)[:5]}...): {e}. Does its peft config match this run's?") from None
  got = r["state"]["params"]
  _check_same_structure(subtree, got, folder / str(step))
  mngr.close()
  return got, step


def _check_same_structure(want, got, where):
  w, g = set(leaf_paths(want)), set(leaf_paths(got))
  if w != g:
    raise ValueError(f"{where}: missing {sorted(w - g)[:10]}, unexpected {sorted(g - w)[:10]}.")
  for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree_util.tree_leaves(got)):
    if np.shape(a) != np.shape(b):
      raise ValueError(f"{where}: {path_str(p)} has shape {np.shape(b)} "
                       f"in the checkpoint but {np.shape(a)} in this model; the peft config (rank, targets, "
                       "num_prompts, ...) must match the TPP run's.")


# ------------------------------------------------------------------------------------------------
# tpp_jax's own flat weight files (the shipped house backbone) and pretrain workdirs as init.
# ------------------------------------------------------------------------------------------------

def save_flat(path, tree: dict, dtype=np.float16, metadata: dict | None = None):
  """Save a nested param dict as safetensors with '/'-joined names (fp16 by default: half the size)."""
  from safetensors.numpy import save_file
  flat = {k: np.ascontiguousarray(np.asarray(v).astype(dtype)) for k, v in flatten(tree).items()}
  save_file(flat, str(path), metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_flat(path) -> dict:
  """Inverse of save_flat; leaves cast to float32."""
  from safetensors.numpy import load_file
  return unflatten({k: v.astype(np.float32) for k, v in load_file(str(path)).items()})


def load_backbone_tpp(path) -> tuple[dict, dict | None]:
  """(encoder, decoder or None) from a tpp_jax safetensors file or a `pretrain` workdir."""
  path = pathlib.Path(path)
  if path.is_file():
    tree = load_flat(path)
  else:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
      raise FileNotFoundError(f"init.path={str(path)!r} is a folder without config.json; it must be a tpp_jax "
                              "`pretrain` workdir (or give a checkpoint file).")
    folder = path / "checkpoints"
    mngr = ocp.CheckpointManager(folder)
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f"{folder} holds no complete checkpoint.")
    check_intact(folder / str(step))
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    tree = jax.tree_util.tree_map(np.asarray, dict(restored["state"]["params"]))
    mngr.close()
  enc = tree.get("encoder")
  if enc is None:
    raise ValueError(f"{path} holds no 'encoder' weights.")
  return enc, tree.get("decoder")
