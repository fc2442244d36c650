"""The engine: sharded == 1-device, exact resume in a new process, target handover, contract files."""
import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tpp_jax import build as build_lib
from tpp_jax import config as config_lib
from tpp_jax import engine, main
from tpp_jax import tree as tree_lib
from tpp_jax import workdir as workdir_lib

from conftest import load_config, run_cli


def _cfg(pneumonia_npz, arg=""):
  c = load_config("experiment", "pneumonia,smoke,px32" + ("," + arg if arg else ""))
  c.data.path = str(pneumonia_npz)
  return c


def test_sharded_step_equals_single_device_step(pneumonia_npz, tmp_path):
  c = _cfg(pneumonia_npz)
  t8 = engine.Trainer(c, tmp_path / "a")
  t1 = engine.Trainer(c, tmp_path / "b", devices=jax.devices()[:1])
  assert t8.mesh.devices.size == 8 and t1.mesh.devices.size == 1
  it = t8.train_iterator()
  s8, s1 = t8.state, t1.state
  for _ in range(3):
    batch = next(it)
    s8, m8 = t8.train_step(s8, build_lib.global_batch(batch, t8.mesh), t8.base_rng)
    s1, m1 = t1.train_step(s1, build_lib.global_batch(batch, t1.mesh), t1.base_rng)
    assert abs(float(m8["loss"]) - float(m1["loss"])) <= 1e-5
  diffs = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                 s8["params"], s1["params"])
  assert max(jax.tree_util.tree_leaves(diffs)) <= 1e-5
  # the batch really is split over 8 devices
  gb = build_lib.global_batch(next(it), t8.mesh)
  assert len(gb["image"].sharding.device_set) == 8


def _final_params(workdir):
  mngr = ocp.CheckpointManager(workdir / "checkpoints")
  step = mngr.latest_step()
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return step, jax.tree_util.tree_map(np.asarray, restored["state"]["params"])


def test_resume_in_a_new_process_is_exact(pneumonia_npz, tmp_path):
  common = ["--config", "configs/experiment.py:pneumonia,smoke,px32", f"--config.data.path={pneumonia_npz}",
            "--config.log_every=1", "--config.checkpoint_every=2", "--config.eval_splits=()"]
  full, half = tmp_path / "full", tmp_path / "half"
  r = run_cli(common + ["--workdir", str(full), "--config.steps=8"])
  assert r.returncode == 0, r.stderr[-3000:]
  r = run_cli(common + ["--workdir", str(half), "--config.steps=8", "--config.stop_after=4"])
  assert r.returncode == 0, r.stderr[-3000:]
  r = run_cli(common + ["--workdir", str(half), "--config.steps=8"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Resumed" in r.stdout
  sf, pf = _final_params(full)
  sh, ph = _final_params(half)
  assert sf == sh == 8
  for a, b in zip(jax.tree_util.tree_leaves(pf), jax.tree_util.tree_leaves(ph)):
    assert np.array_equal(a, b)
  # the same batches in the same order: identical per-step training losses
  def losses(wd):
    rows = [json.loads(l) for l in open(wd / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}
  assert losses(full) == losses(half) and len(losses(full)) == 8


def test_target_init_loads_exactly_the_target_leaves(pneumonia_npz, tmp_path):
  tpp = _cfg(pneumonia_npz, "stage=tpp")
  tpp_sum = engine.train(tpp, tmp_path / "tpp")
  assert tpp_sum["params"]["target"] > 0
  _, tpp_params = _final_params(tmp_path / "tpp")

  ft = _cfg(pneumonia_npz, "steps=1")
  ft.target_init = str(tmp_path / "tpp")
  fresh = engine.Trainer(_cfg(pneumonia_npz, "steps=1"), tmp_path / "fresh")
  t = engine.Trainer(ft, tmp_path / "ft")
  params = jax.device_get(t.state["params"])
  fresh_params = jax.device_get(fresh.state["params"])
  n = 0
  for (path, leaf), lab, fr in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                   jax.tree_util.tree_leaves(t.labels), jax.tree_util.tree_leaves(fresh_params)):
    name = tree_lib.path_str(path)
    if lab == "target":
      src = tpp_params
      for k in name.split("/"):
        src = src[k]
      assert np.array_equal(np.asarray(leaf), src), name  # bitwise the TPP run's
      n += 1
    else:
      assert np.array_equal(np.asarray(leaf), np.asarray(fr)), name  # head + backbone as a fresh run
  assert n > 0 and t.target_init["step"] == tpp.steps
  # the TPP run really moved its target params away from init (LoRA B starts at zero)
  assert any(np.abs(v["lora_b"]).max() > 0 for k, v in tpp_params["encoder"]["blocks_0"]["attn"].items()
             if "lora_b" in v)


def test_target_init_with_mismatched_peft_is_one_clear_error(pneumonia_npz, tmp_path):
  engine.train(_cfg(pneumonia_npz, "stage=tpp,steps=2"), tmp_path / "tpp")
  ft = _cfg(pneumonia_npz, "peft.rank=4")
  ft.target_init = str(tmp_path / "tpp")
  with pytest.raises(engine.ConfigError, match=r"peft config differs .*rank"):
    engine.Trainer(ft, tmp_path / "ft")


def test_finetune_writes_the_contract_files(pneumonia_npz, tmp_path):
  c = _cfg(pneumonia_npz, "steps=10,eval_every=5,data.max_eval_examples=128")
  engine.train(c, tmp_path / "run")
  for f in ("config.json", "metrics.jsonl", "summary.json"):
    assert (tmp_path / "run" / f).exists(), f
  assert (tmp_path / "run" / "checkpoints" / "10").exists() and (tmp_path / "run" / "best").exists()
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert summary["stage"] == "finetune" and summary["config"]["peft"]["type"] == "lora"
  assert set(summary["params"]) >= {"total", "trainable", "target"}
  for split in ("val", "test"):
    m = summary["final"][split]
    assert set(m) >= {"accuracy", "balanced_accuracy", "macro_f1", "auc"}
    assert 0.0 <= m["auc"] <= 1.0 and 0.0 <= m["accuracy"] <= 1.0
  assert summary["images_per_sec"] > 0
  rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  assert {"step", "stage", "split", "loss"} <= set(rows[0])
  assert any(r["split"] == "val" and r["step"] == 5 for r in rows)
  # rerunning the finished run resumes at the end and changes nothing saved
  before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
  engine.train(c, tmp_path / "run")
  assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before


def test_a_different_config_never_overwrites_a_run(pneumonia_npz, tmp_path):
  engine.train(_cfg(pneumonia_npz, "steps=2"), tmp_path / "run")
  with pytest.raises(engine.ConfigError, match="different config"):
    engine.train(_cfg(pneumonia_npz, "steps=2,optim.weight_decay=0.5"), tmp_path / "run")


def test_a_run_saved_before_a_new_config_field_still_resumes(tmp_path):
  """config.json of an older version lacks fields added since (e.g. data.workers, init.adapter): they are defaults."""
  c = load_config("experiment", "demo,smoke,steps=2")
  workdir_lib.check_config(c, tmp_path)  # empty workdir: nothing to compare
  saved = json.loads(config_lib.to_json(c))
  del saved["data"]["workers"], saved["init"]["adapter"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  workdir_lib.check_config(c, tmp_path)  # the same run: resumes
  with c.unlocked():
    c.data.workers = "2"
  with pytest.raises(engine.ConfigError, match=r"fields \['data.workers'\]"):
    workdir_lib.check_config(c, tmp_path)


def test_nan_loss_stops_with_a_clear_error(pneumonia_npz, tmp_path):
  c = _cfg(pneumonia_npz, "steps=4,log_every=1,optim.lr=1e30,optim.clip_norm=0.0,checkpoint_every=0")
  with pytest.raises(engine.TrainingError, match=r"diverged at step \d+: .* a lower --config.optim.lr"):
    engine.train(c, tmp_path / "run")


def test_fsdp_sharded_params_give_the_same_step(pneumonia_npz, tmp_path):
  c = _cfg(pneumonia_npz, "stage=full")
  t_rep = engine.Trainer(c, tmp_path / "a")
  c2 = _cfg(pneumonia_npz, "stage=full,fsdp=True")
  t_fsdp = engine.Trainer(c2, tmp_path / "b")
  sharded = [x for x in jax.tree_util.tree_leaves(t_fsdp.state["params"]) if len(x.sharding.device_set) == 8
             and not x.sharding.is_fully_replicated]
  assert sharded, "fsdp=True sharded no parameter"
  batch = next(t_rep.train_iterator())
  s1, m1 = t_rep.train_step(t_rep.state, build_lib.global_batch(batch, t_rep.mesh), t_rep.base_rng)
  s2, m2 = t_fsdp.train_step(t_fsdp.state, build_lib.global_batch(batch, t_fsdp.mesh), t_fsdp.base_rng)
  assert abs(float(m1["loss"]) - float(m2["loss"])) <= 1e-5
  for a, b in zip(jax.tree_util.tree_leaves(s1["params"]), jax.tree_util.tree_leaves(s2["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_rerun_after_losing_checkpoints_newer_than_best_resumes_to_the_same_result(tmp_path):
  """Killed after a best checkpoint was kept but before the next periodic one: every rerun used to end in
  orbax's StepAlreadyExistsError at the best step. Now it resumes and ends as the uninterrupted run did."""
  from tpp_jax import main
  arg = "demo,smoke,steps=8,eval_every=2,checkpoint_every=4,keep_checkpoints=1"
  wd = tmp_path / "run"
  main.run(load_config("experiment", arg), str(wd))
  first = json.loads((wd / "summary.json").read_text())
  best_step = first["best"]["step"]
  assert sorted(p.name for p in (wd / "best").iterdir()) == [str(best_step)] and best_step > 0
  import shutil
  shutil.rmtree(wd / "checkpoints" / "8")  # as if killed before the last periodic checkpoint landed
  (wd / "summary.json").unlink()
  main.run(load_config("experiment", arg), str(wd))
  again = json.loads((wd / "summary.json").read_text())
  assert again["final"] == first["final"] and again["best"] == first["best"]
  assert sorted(p.name for p in (wd / "best").iterdir()) == [str(best_step)]


def test_epochs_set_steps_from_the_train_split_through_the_common_parser(tmp_path):
  """`:epochs=N` is an ordinary key=value of the config argument; the engine turns it into steps from the data."""
  c = load_config("house_backbone", "epochs=3")
  assert c.epochs == 3
  arg = "demo,smoke,epochs=2,data.max_train_examples=40,batch_size=16,eval_every=0,checkpoint_every=0"
  summary = main.run(load_config("experiment", arg), str(tmp_path / "run"))
  assert summary["steps"] == 5 == -(-2 * 40 // 16)  # ceil(epochs x train examples / batch size)
  assert json.loads((tmp_path / "run" / "config.json").read_text())["steps"] == 5
  again = main.run(load_config("experiment", arg), str(tmp_path / "run"))  # the rerun resolves the same steps
  assert again["final"] == summary["final"]



def test_bf16_model_stores_frozen_weights_in_bf16_with_the_same_numbers(tmp_path):
  """model.dtype=bfloat16: frozen matrices are stored (and checkpointed) in bf16, trainable leaves, norms and the
  optimizer state in fp32, and every logged number equals the run that stores them fp32 (the forward casts them
  to bf16 either way); the rerun resumes from the bf16 checkpoint. Through the CLI."""
  rows = {}
  for fd in ("auto", "float32"):
    wd = tmp_path / fd
    arg = f"demo,smoke,steps=4,checkpoint_every=2,log_every=1,model.dtype=bfloat16,model.frozen_dtype={fd}"
    r = run_cli(["--config", f"configs/experiment.py:{arg}", "--workdir", str(wd)],
                env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    assert r.returncode == 0, r.stderr[-2000:]
    rows[fd] = [{k: v for k, v in json.loads(line).items() if k != "images_per_sec"}
                for line in (wd / "metrics.jsonl").read_text().splitlines()]
  assert rows["auto"] == rows["float32"] and len(rows["auto"]) >= 4
  mngr = ocp.CheckpointManager(tmp_path / "auto" / "checkpoints")
  state = mngr.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  mngr.close()
  params = tree_lib.flatten(state["params"])
  kernel = "encoder/blocks_0/attn/q/kernel"
  assert str(params[kernel].dtype) == "bfloat16" and str(params["encoder/patch_embed/kernel"].dtype) == "bfloat16"
  assert all(str(v.dtype) == "float32" for k, v in params.items() if "lora_" in k or k.startswith("head/"))
  assert str(params["encoder/blocks_0/norm1/scale"].dtype) == "float32"
  assert all(str(v.dtype) == "float32" for v in jax.tree_util.tree_leaves(state["opt_state"]) if v.ndim)
  arg = "demo,smoke,steps=6,checkpoint_every=2,log_every=1,model.dtype=bfloat16"
  r = run_cli(["--config", f"configs/experiment.py:{arg}", "--workdir", str(tmp_path / "auto")],
              env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
  assert r.returncode == 0 and f"Resumed {tmp_path / 'auto'} at step 4" in r.stdout, r.stderr[-2000:]


def test_patience_stops_at_convergence_keeps_the_best_and_resumes_to_the_same_stop(tmp_path):
  """patience=P: the run stops at the first evaluation that is the P-th in a row without a new best val metric
  (recomputed here from metrics.jsonl), keeps the best, reports converged_at; a run stopped earlier (stop_after)
  and resumed stops at the same step with the same rows."""
  arg = ("demo,smoke,px32,stage=full,steps=40,eval_every=2,checkpoint_every=2,log_every=2,patience=2,"
         "optim.lr=3e-3,optim.warmup_steps=2,eval_splits=('val',)")
  wd, resumed = tmp_path / "run", tmp_path / "resumed"
  summary = main.run(load_config("experiment", arg), str(wd))
  rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
  val = [(r["step"], r["auc"]) for r in rows if r.get("split") == "val"]
  best_step, best, stop = None, None, None
  for step, auc in val:  # the rule, written out: stop once 2 evaluations in a row brought no new best
    if best is None or auc > best:
      best_step, best = step, auc
    elif (step - best_step) // 2 >= 2:
      stop = step
      break
  assert stop is not None and stop < 40, val  # it converged before the cap
  assert summary["converged_at"] == stop and summary["steps"] == 40
  assert summary["best"]["step"] == best_step and summary["best"]["value"] == best
  assert max(r["step"] for r in rows) == stop  # nothing trained past the stop
  assert main.run(load_config("experiment", arg), str(wd))["converged_at"] == stop  # finished: nothing to do
  main.run(load_config("experiment", arg + f",stop_after={stop - 2}"), str(resumed))
  again = main.run(load_config("experiment", arg), str(resumed))
  assert again["converged_at"] == stop and again["final"] == summary["final"]
  drop = lambda r: {k: v for k, v in r.items() if k not in ("wall_time_s", "images_per_sec")}
  assert [drop(json.loads(x)) for x in (resumed / "metrics.jsonl").read_text().splitlines()] == [drop(r) for r in rows]
