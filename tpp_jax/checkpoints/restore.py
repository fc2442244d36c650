"""Restore a finished run from its folder alone: config.json + orbax checkpoint.

  run = load_run("RUN", checkpoint="best")   # -> LoadedRun(config, encoder, objective, params, aux, step, ...)

The parameter tree is built abstractly by the Trainer's own build code (build.build_model + build.abstract_state:
jax.eval_shape over the model/objective init, with a dummy batch shaped from the config), so neither the training
data, nor the backbone file (`init.path`), nor the TPP run (`target_init`) has to exist any more: the checkpoint
holds every parameter.
"""
from __future__ import annotations

import dataclasses
import pathlib

import jax
import ml_collections as mlc
import numpy as np
import orbax.checkpoint as ocp

from tpp_jax import build as build_lib
from tpp_jax import config as config_lib
from tpp_jax.checkpoints import store as store_lib
from tpp_jax.jsonio import read_json
from tpp_jax.models.vit import ViT

CHECKPOINTS = ("best", "latest")


@dataclasses.dataclass
class LoadedRun:
  config: mlc.ConfigDict   # the run's resolved config (RUN/config.json)
  encoder: ViT             # build.build_encoder(config)
  objective: object        # objectives.make_objective(config, encoder)
  params: dict             # the full param tree restored from the checkpoint (numpy arrays)
  aux: dict                # non-gradient state (BatchNorm stats, DINO teacher); {} if none
  step: int
  checkpoint: str          # 'best' or 'latest': what was actually restored
  run_dir: pathlib.Path


def read_run_config(run_dir) -> mlc.ConfigDict:
  """RUN/config.json as a ConfigDict; one clear error for a folder that is not a (single) run."""
  run_dir = pathlib.Path(run_dir).expanduser().absolute()
  if not run_dir.is_dir():
    raise FileNotFoundError(f"{run_dir} does not exist; give the --workdir of a finished run.")
  cfg_file = run_dir / "config.json"
  if not cfg_file.exists():
    arms = _arm_folders(run_dir)
    hint = f" Runs inside it: {', '.join(arms)}." if arms else ""
    raise FileNotFoundError(f"{run_dir} has no config.json, so it is not a run folder; give the --workdir of a "
                            f"finished run.{hint}")
  cfg = mlc.ConfigDict(config_lib.with_defaults(read_json(cfg_file)))
  if cfg.get("stage") == "pipeline":
    arms = _arm_folders(run_dir) or [str(run_dir / "seed_0" / "baseline")]
    raise config_lib.ConfigError(f"{run_dir} is a pipeline folder, not one run; give one of its arm folders: "
                                 f"{', '.join(arms)}.")
  return cfg


def _arm_folders(folder: pathlib.Path) -> list[str]:
  """Run folders (with config.json) one or two levels below `folder`, e.g. RUN/seed_0/baseline."""
  found = [p.parent for pat in ("*/config.json", "*/*/config.json") for p in sorted(folder.glob(pat))]
  found = [p for p in found if read_json(p / "config.json").get("stage") != "pipeline"]
  return [str(p) for p in found[:6]] + (["..."] if len(found) > 6 else [])


def _restore(folder: pathlib.Path, abstract: dict) -> tuple[dict, int] | None:
  """Partial restore of {'params', 'aux'} (as numpy) from the newest step in `folder`; None if it has none."""
  if not folder.is_dir():
    return None
  mngr = ocp.CheckpointManager(folder)
  try:
    step = mngr.latest_step()
    if step is None:
      return None
    store_lib.check_intact(folder / str(step))
    item = {k: v for k, v in abstract.items() if jax.tree_util.tree_leaves(v)}  # orbax skips empty subtrees
    restore_args = jax.tree_util.tree_map(lambda x: ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype), item)
    try:
      r = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=True)))
    except (ValueError, KeyError) as e:
      raise ValueError(f"Checkpoint {folder / str(step)} does not fit the model of its config.json ({e}); was "
                       "config.json edited after training?") from None
  finally:
    mngr.close()
  got = dict(r["state"])
  store_lib._check_same_structure(item, got, folder / str(step))
  return {"params": got["params"], "aux": got.get("aux", {})}, int(step)


def load_run(run_dir, checkpoint: str = "best") -> LoadedRun:
  """Model, objective and restored params/aux of a finished run; 'best' falls back to 'latest' if none."""
  if checkpoint not in CHECKPOINTS:
    raise config_lib.ConfigError(f"checkpoint={checkpoint!r} must be one of {list(CHECKPOINTS)}.")
  run_dir = pathlib.Path(run_dir).expanduser().absolute()
  config = config_lib.validate(read_run_config(run_dir))
  encoder, objective = build_lib.build_model(config)  # the Trainer's build code; no weight file is read
  params, aux = build_lib.abstract_state(config, encoder, objective)
  abstract = {"params": params, "aux": aux}
  order = ["best", "latest"] if checkpoint == "best" else ["latest"]
  for which in order:
    got = _restore(run_dir / ("best" if which == "best" else "checkpoints"), abstract)
    if got is not None:
      state, step = got
      aux = state["aux"] if jax.tree_util.tree_leaves(aux) else {}
      return LoadedRun(config=config, encoder=encoder, objective=objective, params=state["params"],
                       aux=aux, step=step, checkpoint=which, run_dir=run_dir)
  looked = " and ".join(str(run_dir / ("best" if w == "best" else "checkpoints")) for w in order)
  raise FileNotFoundError(f"{run_dir} holds no checkpoint (looked in {looked}); the run did not finish or save "
                          "one. Rerun its training command with the same --workdir to resume and finish it.")
