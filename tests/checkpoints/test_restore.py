"""checkpoints.restore.load_run: a finished run restores from its folder alone (no backbone file, TPP run
or training data), equals the trainer's final params, and the eval stage runs on it."""
import json
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tpp_jax import build as build_lib
from tpp_jax import engine, evaluate, main
from tpp_jax.checkpoints import restore, store

from conftest import load_config


def _final_state(workdir):
  mngr = ocp.CheckpointManager(workdir / "checkpoints")
  step = mngr.latest_step()
  r = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  mngr.close()
  return step, jax.tree_util.tree_map(np.asarray, r["state"])


def _assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    assert x.dtype == y.dtype and np.array_equal(x, y)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A tiny backbone file -> DINO `tpp` run -> `finetune` (bn_linear head: BatchNorm aux) from both."""
  root = tmp_path_factory.mktemp("restore")
  base = "demo,smoke,px32,steps=4,checkpoint_every=0"
  c = load_config("experiment", base + ",stage=pretrain")
  enc = build_lib.build_encoder(c)
  params = enc.init(jax.random.key(3), np.zeros((1, 32, 32, 3), np.float32))["params"]
  backbone = root / "backbone.safetensors"
  store.save_flat(backbone, {"encoder": params})
  tpp = load_config("experiment", base + ",stage=tpp,pretext.type=dino,eval_splits=()")
  tpp.init.path = str(backbone)
  main.run(tpp, str(root / "tpp"))
  ft = load_config("experiment", base + ",task.head=bn_linear,eval_splits=('val',)")
  ft.init.path, ft.target_init = str(backbone), str(root / "tpp")
  summary = main.run(ft, str(root / "ft"))
  assert "tpp_jax weights" in summary["init"] and summary["target_init"]["step"] == 4
  # the upstream files go away: the runs must restore from their own folders
  moved = root / "moved"
  moved.mkdir()
  shutil.move(str(backbone), moved / "backbone.safetensors")
  shutil.move(str(root / "tpp"), moved / "tpp")
  return {"root": root, "tpp": moved / "tpp", "ft": root / "ft", "summary": summary}


def test_load_run_without_backbone_or_tpp_run_equals_final_params(runs):
  step, state = _final_state(runs["ft"])
  for which in ("best", "latest"):
    r = restore.load_run(runs["ft"], which)
    assert r.checkpoint == which and r.step == step == 4 and r.run_dir == runs["ft"]
    assert r.config.stage == "finetune" and r.config.task.head == "bn_linear"
    assert type(r.encoder).__name__ == "ViT" and r.objective.num_classes == 2
    _assert_trees_equal(r.params, state["params"])
    assert "batch_stats" in r.aux
    _assert_trees_equal(r.aux, state["aux"])


def test_best_falls_back_to_latest_and_dino_aux_restores(runs):
  r = restore.load_run(runs["tpp"], "best")  # eval_splits=() kept no best
  assert r.checkpoint == "latest" and r.step == 4
  _, state = _final_state(runs["tpp"])
  _assert_trees_equal(r.params, state["params"])
  _assert_trees_equal(r.aux, state["aux"])  # DINO teacher + center
  assert set(r.aux) >= {"teacher", "center"}


def test_eval_stage_runs_without_upstream_files(runs):
  e = load_config("experiment", "stage=eval,eval_splits=('val',),eval_checkpoint=best")
  ev = evaluate.run(e, runs["ft"])
  final = runs["summary"]["final"]["val"]
  assert ev["checkpoint"] == "best" and ev["step"] == 4
  for k in ("accuracy", "auc", "loss"):
    assert ev["results"]["val"][k] == pytest.approx(final[k], abs=1e-6)
  assert json.loads((runs["ft"] / "eval.json").read_text())["results"] == ev["results"]


def test_clear_errors(runs, tmp_path):
  with pytest.raises(FileNotFoundError, match="not a run folder"):
    restore.load_run(tmp_path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    restore.load_run(tmp_path / "nope")
  pipe = tmp_path / "pipe"
  (pipe / "seed_0" / "baseline").mkdir(parents=True)
  (pipe / "config.json").write_text(json.dumps({"stage": "pipeline"}))
  shutil.copy(runs["ft"] / "config.json", pipe / "seed_0" / "baseline" / "config.json")
  with pytest.raises(engine.ConfigError, match="pipeline folder.*seed_0/baseline"):
    restore.load_run(pipe)
  with pytest.raises(FileNotFoundError, match="holds no checkpoint.*Rerun"):
    restore.load_run(pipe / "seed_0" / "baseline")
  with pytest.raises(engine.ConfigError, match="must be one of"):
    restore.load_run(runs["ft"], "final")
