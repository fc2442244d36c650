"""Stage `eval`: metrics of a saved run, on whole splits, from its latest (or best) checkpoint.

  python -m tpp_jax.main --config configs/experiment.py:stage=eval --workdir RUN_DIR
The run's own config.json defines the model and data; the given config only supplies
`eval_splits` and `eval_checkpoint` ('latest' or 'best'). Writes RUN_DIR/eval.json.
"""
from __future__ import annotations

import json
import pathlib

import jax
import ml_collections as mlc
import orbax.checkpoint as ocp

from tpp_jax import engine
from tpp_jax.checkpoints import store as store_lib


def run(config, workdir) -> dict:
  wd = pathlib.Path(workdir).absolute()
  cfg_file = wd / "config.json"
  if not cfg_file.exists():
    raise FileNotFoundError(f"--workdir {wd} has no config.json; stage 'eval' needs the folder of a finished run.")
  run_cfg = mlc.ConfigDict(store_lib.read_json(cfg_file))
  if run_cfg.stage == "pipeline":
    raise engine.ConfigError(f"{wd} is a pipeline folder; evaluate one of its runs (e.g. {wd}/seed_0/baseline).")
  with run_cfg.unlocked():
    run_cfg.eval_splits = tuple(config.eval_splits)
  trainer = engine.Trainer(run_cfg, wd)
  which = config.get("eval_checkpoint", "latest")
  folder = wd / ("best" if which == "best" else "checkpoints")
  mngr = ocp.CheckpointManager(folder)
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"{folder} holds no checkpoint to evaluate.")
  want = {"params": trainer.state["params"], "aux": trainer.state["aux"]}
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, want)
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True)))
  mngr.close()
  params, aux = restored["state"]["params"], restored["state"].get("aux", trainer.state["aux"])
  results = {split: trainer.evaluate(split, params=params, aux=aux) for split in run_cfg.eval_splits
             if split in trainer.sources}
  out = {"workdir": str(wd), "checkpoint": which, "step": int(step), "results": results}
  (wd / "eval.json").write_text(json.dumps(out, indent=2))
  print(json.dumps(out, indent=2))
  return out
