"""Orbax checkpoints of a run: periodic (keep-N) + best-by-metric, exact resume, target handover.

Layout in the workdir:
  checkpoints/<step>/{state, meta}   state = {params, opt_state, aux, step}; meta = {data_iter, ...}
  best/<step>/{state, meta}          the best step by the validation metric (params + aux only)
"""
from __future__ import annotations

import pathlib
from typing import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointStore:
  """Periodic and best checkpoints of one workdir."""

  def __init__(self, workdir: str | pathlib.Path, keep: int = 2, best_mode: str = "max"):
    self.dir = pathlib.Path(workdir).absolute()
    self.latest = ocp.CheckpointManager(
        self.dir / "checkpoints", options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
    self.best = ocp.CheckpointManager(
        self.dir / "best", options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, best_fn=lambda m: m["value"], best_mode=best_mode))

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def save(self, step: int, state: dict, meta: dict, force: bool = False):
    if step in self.latest.all_steps():  # already saved (e.g. a periodic save at the same step)
      return
    self.latest.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave(meta)), force=force)

  def best_meta(self) -> dict | None:
    """{'step', 'metric', 'value'} of the kept best checkpoint, or None."""
    step = self.best.latest_step()
    if step is None:
      return None
    return dict(self.best.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

  def save_best(self, step: int, state: dict, value: float, meta: dict):
    if step in self.best.all_steps():  # a resumed run re-reaching a kept step: resume is exact, so it is the same
      return
    self.best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 meta=ocp.args.JsonSave(meta)),
                   metrics={"value": float(value)}, force=True)

  def restore(self, template: dict, step: int | None = None) -> tuple[dict, dict]:
    """Restore (state, meta) into the structure/shardings of `template`."""
    step = self.latest.latest_step() if step is None else step
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
    r = self.latest.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                          meta=ocp.args.JsonRestore()))
    return r["state"], r["meta"]

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
  item = {"params": jax.tree_util.tree_map(lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), subtree)}
  try:
    r = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
  except (ValueError, KeyError) as e:
    raise ValueError(f"Checkpoint {folder}/{step} does not hold the requested parameters "
                     f"({_leaf_names(subtree)[:5]}...): {e}. Does its peft config match this run's?") from None
  got = r["state"]["params"]
  _check_same_structure(subtree, got, folder / str(step))
  mngr.close()
  return got, step


def _leaf_names(tree) -> list[str]:
  return ["/".join(str(getattr(k, "key", k)) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _check_same_structure(want, got, where):
  w, g = set(_leaf_names(want)), set(_leaf_names(got))
  if w != g:
    raise ValueError(f"{where}: missing {sorted(w - g)[:10]}, unexpected {sorted(g - w)[:10]}.")
  for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree_util.tree_leaves(got)):
    if np.shape(a) != np.shape(b):
      raise ValueError(f"{where}: {'/'.join(str(getattr(k, 'key', k)) for k in p)} has shape {np.shape(b)} "
                       f"in the checkpoint but {np.shape(a)} in this model; the peft config (rank, targets, "
                       "num_prompts, ...) must match the TPP run's.")


# ------------------------------------------------------------------------------------------------
# tpp_jax's own flat weight files (the shipped house backbone) and pretrain workdirs as init.
# ------------------------------------------------------------------------------------------------

def flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
  """Nested dict -> {'a/b/c': leaf} (leaves as they are); the inverse of `unflatten`."""
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten(v, key + "/"))
    else:
      out[key] = v
  return out


def unflatten(flat: dict[str, np.ndarray]) -> dict:
  tree: dict = {}
  for k, v in flat.items():
    node = tree
    *parents, leaf = k.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


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
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    tree = jax.tree_util.tree_map(np.asarray, dict(restored["state"]["params"]))
    mngr.close()
  enc = tree.get("encoder")
  if enc is None:
    raise ValueError(f"{path} holds no 'encoder' weights.")
  return enc, tree.get("decoder")
