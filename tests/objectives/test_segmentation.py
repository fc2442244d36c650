"""Segmentation on real Kvasir-SEG polyps: the decoder can fit, TPP -> fine-tune reports Dice / IoU,
and the soft Dice loss has the right end points."""
import json

import jax
import jax.numpy as jnp
import numpy as np

from tpp_jax import build as build_lib
from tpp_jax import engine, metrics
from tpp_jax.objectives.segmentation import soft_dice_loss

from conftest import load_config


def _cfg(kvasir_dir, arg=""):
  c = load_config("experiment", "kvasir,smoke,px32" + ("," + arg if arg else ""))
  c.data.path = str(kvasir_dir)
  return c


def test_overfits_a_fixed_batch_of_four_polyps(kvasir_dir, tmp_path):
  steps = 100
  c = _cfg(kvasir_dir, f"stage=finetune,batch_size=4,steps={steps},optim.lr=3e-3,optim.warmup_steps=10,"
                       "peft.rank=16,peft.alpha=16.0,task.seg_decoder_dim=32")
  t = engine.Trainer(c, tmp_path, devices=jax.devices()[:1])
  assert t.objective.default_metric == "dice"
  host = next(t.train_iterator())
  assert host["image"].shape == (4, 32, 32, 3) and host["mask"].shape == (4, 32, 32)
  fg = float(host["mask"].mean())
  assert 0.0 < fg < 0.7, fg  # real polyps: some foreground, mostly background
  host["valid"] = np.ones(4, bool)
  batch = build_lib.global_batch(host, t.mesh)

  def dice(state):
    out = jax.device_get(t.eval_step(state["params"], state["aux"], batch))
    m = metrics.SegMetrics(2)
    m.update_counts(out["counts"])
    return m.compute()

  state = t.state
  start = dice(state)["dice"]
  for _ in range(steps):
    state, mets = t.train_step(state, batch, t.base_rng)
  end = dice(state)
  print(f"\n[kvasir overfit 4 images, {steps} steps] dice {start:.3f} -> {end['dice']:.4f} "
        f"(iou {end['iou']:.4f}, train loss {float(mets['loss']):.4f}, foreground {fg:.2f})")
  assert end["dice"] > 0.9, end
  assert end["iou"] > 0.8, end


def test_tpp_then_finetune_reports_dice_and_iou(kvasir_dir, tmp_path):
  tpp = _cfg(kvasir_dir, "stage=tpp,pretext.type=mae,peft.type=lora,steps=3,eval_splits=()")
  one = jax.devices()[:1]  # engine.train(c, wd) is Trainer(c, wd).run(); one device compiles faster
  s = engine.Trainer(tpp, tmp_path / "tpp", devices=one).run()
  assert s["stage"] == "tpp" and s["params"]["target"] > 0
  ft = _cfg(kvasir_dir, "stage=finetune,peft.type=lora,steps=3")
  ft.target_init = str(tmp_path / "tpp")
  engine.Trainer(ft, tmp_path / "ft", devices=one).run()
  summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
  assert summary["stage"] == "finetune" and summary["target_init"]["step"] == 3
  assert summary["target_init"]["path"] == str(tmp_path / "tpp")
  for split in ("val", "test"):
    m = summary["final"][split]
    assert {"dice", "iou", "loss"} <= set(m), (split, m)
    for k in ("dice", "iou"):
      assert 0.0 <= m[k] <= 1.0, (split, k, m[k])
    assert m["iou"] <= m["dice"] + 1e-9  # IoU = D / (2 - D) <= D
  print(f"\n[kvasir tpp->finetune 3+3 steps] val {summary['final']['val']['dice']:.3f} dice, "
        f"test {summary['final']['test']['dice']:.3f} dice")


def test_soft_dice_loss_end_points():
  rng = np.random.default_rng(0)
  target = jnp.asarray(rng.integers(0, 2, (2, 16, 16)))
  onehot = jax.nn.one_hot(target, 2)
  perfect = soft_dice_loss(1e4 * (2 * onehot - 1), target, 2)
  assert abs(float(perfect)) < 1e-6, float(perfect)
  disjoint = soft_dice_loss(1e4 * (1 - 2 * onehot), target, 2)  # every pixel on the wrong class
  assert float(disjoint) > 0.99, float(disjoint)
  # in between, and more classes: only foreground classes count, the mean over them
  three = jnp.asarray(rng.integers(0, 3, (2, 16, 16)))
  assert abs(float(soft_dice_loss(1e4 * jax.nn.one_hot(three, 3), three, 3))) < 1e-6
  uniform = float(soft_dice_loss(jnp.zeros((2, 16, 16, 2)), target, 2))
  assert 0.2 < uniform < 0.8, uniform
