"""stages.STAGES: each entry agrees with what the engine builds; a new entry is picked up everywhere; the build
step reads no file (export_backbone works with the run's init file gone)."""
import dataclasses
import re
import shutil

import jax
import numpy as np
import pytest

from tpp_jax import build as build_lib
from tpp_jax import engine, partition, pipeline, stages
from tpp_jax import tree as tree_lib
from tpp_jax.checkpoints import load as load_lib
from tpp_jax.checkpoints import store
from tpp_jax.objectives import make_objective

from conftest import load_config

TRAINING = [n for n, s in stages.STAGES.items() if s.trains]
OBJECTIVE_PARAMS = {"mae": "decoder", "dino": "dino_head", "contrastive": "proj_head", "classification": "head",
                    "segmentation": "head"}


def _config(stage, arg=""):
  c = load_config("experiment", "demo,smoke,px32" + (f",{arg}" if arg else ""))
  c.stage = stage  # set after loading: a fake stage is not in config.STAGES
  return c


def _labels_by_top(labels):
  """{top-level key: set of labels}; the encoder's PEFT leaves and fixed sin-cos pos-embs apart."""
  out = {}
  for (path, lab) in jax.tree_util.tree_flatten_with_path(labels)[0]:
    p = tree_lib.path_str(path)
    key = p.split("/")[0]
    if key == "encoder" and re.search(stages.TARGET_RE, p):
      key = "encoder:peft"
    if p.endswith("/pos_embed") and lab == "frozen":
      key = "pos_embed"
    out.setdefault(key, set()).add(lab)
  return out


def test_table_lists_every_stage_once():
  assert set(stages.STAGES) == {"pretrain", "tpp", "finetune", "linear", "full", "eval", "pipeline"}
  assert all(name == s.name for name, s in stages.STAGES.items())
  assert tuple(partition.STAGES_TRAIN) == tuple(TRAINING)
  for name in ("eval", "pipeline"):
    with pytest.raises(ValueError, match="not a training stage"):
      stages.training(name)
    with pytest.raises(ValueError, match="No partition"):
      partition.default_rules(name)


@pytest.mark.parametrize("stage", TRAINING)
@pytest.mark.parametrize("pretext", ["mae", "dino", "contrastive"])
def test_every_training_stage_builds_what_the_table_says(stage, pretext):
  """build_lib.build (abstract; nothing read or compiled): objective, PEFT leaves, labels, decoder loading."""
  entry = stages.STAGES[stage]
  c = _config(stage, f"peft.type=lora,pretext.type={pretext}")
  built = build_lib.build(c, devices=jax.devices()[:1])
  kind = c.pretext.type if entry.objective == "pretext" else c.task.type
  assert entry.objective_kind(c) == kind and set(built.params) == {"encoder", OBJECTIVE_PARAMS[kind]}
  assert built.objective.needs_labels == entry.needs_labels
  assert load_lib.wants_decoder(c) == (entry.loads_decoder and pretext == "mae")
  assert built.encoder.peft.type == ("lora" if entry.peft else "none")
  by_top = _labels_by_top(built.labels)
  assert ("encoder:peft" in by_top) == entry.peft
  if entry.peft:
    assert by_top["encoder:peft"] == {"target"}
  assert by_top["encoder"] == {entry.encoder}
  assert by_top[OBJECTIVE_PARAMS[kind]] == {entry.heads_label}
  # the thin wrapper and the engine agree
  rules = partition.default_rules(stage, entry.peft_type(c), fixed_pos_emb=c.model.pos_emb == "sincos",
                                  train_extra=tuple(c.train_extra))
  assert partition.label_tree(built.params, rules) == built.labels
  trainable = {lab for labs in by_top.values() for lab in labs} - {"frozen"}
  assert built.counts["trainable"] > 0 and trainable
  # the random init has exactly the abstract state's structure, shapes and dtypes
  if pretext == "mae":
    params, aux = built.init_fn(jax.random.key(0))
    got = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), (params, aux))
    want = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), (built.params, built.aux))
    assert got == want


def test_bitfit_and_train_extra_follow_the_table():
  c = _config("finetune", "peft.type=bitfit")
  with c.unlocked():
    c.train_extra = (r"^encoder/norm/",)
  built = build_lib.build(c, devices=jax.devices()[:1])
  flat = {tree_lib.path_str(p): lab for p, lab in jax.tree_util.tree_flatten_with_path(built.labels)[0]}
  assert flat["encoder/blocks_0/attn/q/bias"] == "target" and flat["encoder/norm/scale"] == "target"
  assert flat["encoder/blocks_0/attn/q/kernel"] == "frozen"
  lin = build_lib.build(_config("linear", "peft.type=bitfit"), devices=jax.devices()[:1])
  assert set(jax.tree_util.tree_leaves(lin.labels)) == {"frozen", "head"}


def test_a_new_stage_entry_is_picked_up(monkeypatch):
  """One entry: a pretext-head-only stage (no PEFT, decoder trained, backbone frozen)."""
  monkeypatch.setitem(stages.STAGES, "probe_mae", stages.Stage(
      "probe_mae", "MAE decoder on a frozen backbone", objective="pretext", heads=stages.PRETEXT_HEADS,
      loads_decoder=True))
  rules = partition.default_rules("probe_mae", "lora")
  assert rules == [(stages.PRETEXT_HEADS, "head"), (r"^encoder/", "frozen")]
  c = _config("probe_mae", "peft.type=lora,pretext.type=mae")
  enc = build_lib.build_encoder(c)
  assert enc.peft.type == "none"
  assert type(make_objective(c, enc)).__name__ == "MAEObjective"
  assert load_lib.wants_decoder(c)
  built = build_lib.build(c, devices=jax.devices()[:1])
  by_top = _labels_by_top(built.labels)
  assert {k: v for k, v in by_top.items() if k != "pos_embed"} == {"encoder": {"frozen"}, "decoder": {"head"}}
  # and a task variant of it
  monkeypatch.setitem(stages.STAGES, "probe_task", stages.Stage("probe_task", "", objective="task", heads_label="head"))
  c = _config("probe_task", "task.type=segmentation")
  assert type(make_objective(c, build_lib.build_encoder(c))).__name__ == "SegmentationObjective"


def test_pipeline_arms_come_from_the_table(tmp_path, monkeypatch):
  c = _config("pipeline", "peft.type=lora")
  arms = pipeline.arm_configs(c, 3, tmp_path)
  default_arms = [a.name for a in stages.STAGES["pipeline"].arms if not a.only_if]
  assert list(arms) == default_arms == ["tpp", "tpp_finetune", "baseline"]
  assert [a.stage for a in arms.values()] == ["tpp", "finetune", "finetune"]
  assert arms["tpp_finetune"].target_init == str(tmp_path / "seed_3" / "tpp") and not arms["baseline"].target_init
  assert arms["tpp"].steps == c.pipeline.tpp_steps and arms["baseline"].steps == c.steps
  extra = stages.STAGES["pipeline"].arms + (stages.Arm("linear", "linear"),)
  monkeypatch.setitem(stages.STAGES, "pipeline", dataclasses.replace(stages.STAGES["pipeline"], arms=extra))
  arms = pipeline.arm_configs(c, 3, tmp_path)
  assert list(arms)[-1] == "linear" and arms["linear"].stage == "linear" and arms["linear"].seed == 3


def test_target_init_is_refused_where_the_table_says(monkeypatch):
  c = _config("finetune", "peft.type=lora")
  with c.unlocked():
    c.init.adapter = "/nowhere"
  c.stage = "linear"
  with pytest.raises(engine.ConfigError, match=r"init.adapter is only used by stage 'finetune'"):
    load_lib.load_target_init(c, {}, {}, {})


def test_export_backbone_without_the_runs_init_file(tmp_path):
  """A `pretrain` run from a backbone file exports after that file is gone (build step + its own checkpoint)."""
  from tpp_jax import export_backbone

  from conftest import house_smoke_config
  c = house_smoke_config()
  enc = build_lib.build_encoder(c)
  params = enc.init(jax.random.key(5), np.zeros((1, 64, 64, 3), np.float32))["params"]
  backbone = tmp_path / "backbone.safetensors"
  store.save_flat(backbone, {"encoder": params})
  c.init.path = str(backbone)
  engine.train(c, tmp_path / "pre")
  shutil.move(str(backbone), tmp_path / "moved.safetensors")
  summary = export_backbone.export(tmp_path / "pre", tmp_path / "out", "tiny")
  assert np.isfinite(summary["heldout"]["mae_loss"]) and summary["step"] == c.steps
  loaded = store.load_flat(tmp_path / "out" / "tiny.safetensors")
  enc_ck, dec_ck = store.load_backbone_tpp(tmp_path / "pre")
  for a, b in zip(jax.tree_util.tree_leaves(loaded["encoder"]), jax.tree_util.tree_leaves(enc_ck)):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-4)
  assert (tmp_path / "out" / "reconstructions.png").exists() and not backbone.exists()


def test_pretext_head_frozen_trains_only_the_target_params_and_auto_follows_the_checkpoint(tmp_path):
  """The paper's TPP: with pretext.head=frozen (or auto on a backbone that brings its MAE decoder) the decoder
  loaded from init.path never changes, the LoRA parameters do; the run records what auto resolved to, resumes
  under auto, and frozen with nothing to keep is one error."""
  from tpp_jax import main

  from conftest import run_cli
  wd = tmp_path / "tpp"
  arg = ("demo,house,stage=tpp,steps=2,batch_size=16,eval_batch_size=32,eval_every=0,checkpoint_every=0,"
         "progress=False,data.max_train_examples=64,data.max_eval_examples=32,pretext.head=auto")
  r = run_cli(["--config", f"configs/experiment.py:{arg}", "--workdir", str(wd)])
  assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
  assert "; pretext head frozen" in r.stdout and "(+ MAE decoder)" in r.stdout, r.stdout[-2000:]
  import json
  assert json.loads((wd / "config.json").read_text())["pretext"]["head"] == "frozen"
  c = load_config("experiment", arg)
  encoder = build_lib.build_encoder(c)
  _, loaded_decoder, _ = load_lib.load_backbone(c, encoder)
  load_lib.forget_loaded()
  from tpp_jax.checkpoints import restore
  params = restore.load_run(wd, "latest").params
  trained, loaded = tree_lib.flatten(params["decoder"]), tree_lib.flatten(loaded_decoder)
  assert trained.keys() == loaded.keys()
  for k, v in loaded.items():  # bitwise the house backbone's decoder after 2 steps
    np.testing.assert_array_equal(np.asarray(trained[k]), np.asarray(v), err_msg=k)
  lora = [np.asarray(v) for k, v in tree_lib.flatten(params["encoder"]).items() if k.endswith("lora_b")]
  assert lora and any(np.abs(x).max() > 0 for x in lora)  # lora_b starts at zero: it trained
  assert main.run(c, str(wd))["steps"] == 2  # auto again: the same run, nothing to do
  # frozen with nothing to keep: one error naming the fix
  for bad, why in (("init.path=''", "init.path is empty"), ("pretext.type=dino", "pretext.type='dino' has no head"),
                   ("init.load_decoder=False", "init.load_decoder=False")):
    cfg = load_config("experiment", f"demo,house,stage=tpp,pretext.head=frozen,{bad}")
    with pytest.raises(load_lib.ConfigError, match=rf"pretext.head=frozen .* but {re.escape(why)}.*Use pretext.head="):
      load_lib.resolve_pretext_head(cfg, build_lib.build_encoder(cfg))
  # train (the default) and auto without a decoder to keep: the head trains
  for extra in ("pretext.head=train", "pretext.head=auto,init.load_decoder=False"):
    cfg = load_config("experiment", f"demo,house,stage=tpp,{extra}")
    resolved = load_lib.resolve_pretext_head(cfg, build_lib.build_encoder(cfg))
    labels = build_lib.build(resolved, devices=jax.devices()[:1]).labels
    decoder = tree_lib.flatten(labels["decoder"])
    assert {lab for k, lab in decoder.items() if k != "pos_embed"} == {"head"}, extra  # (sin-cos stays fixed)
  load_lib.forget_loaded()
