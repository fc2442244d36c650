"""Pretext objectives really train what the partition says: every PEFT type x {MAE, DINO} on real images.

Each case builds the engine's Trainer for stage `tpp`, takes ONE fixed batch of chest X-rays, runs
STEPS train steps on it and checks that
  (a) the pretext loss on that batch, with a fixed rng and train=False, went down by a margin (and
      putting the target params back to init under the trained head does not lower it),
  (b) every leaf labelled 'frozen' is bitwise unchanged (and the DINO teacher's copy of it too),
  (c) every 'target' (and pretext-head) leaf changed, with weight decay off, so a leaf only moves when
      a gradient reaches it.
Plus: MAE's encoder sees only the K = N * (1 - mask_ratio) visible patches, and stage `pretrain`
(everything trainable except the fixed sin-cos position embeddings) lowers the MAE loss.
Run with -s to see the losses before / after.
"""
import jax
import numpy as np
import pytest

from tpp_jax import build as build_lib
from tpp_jax import engine
from tpp_jax import tree as tree_lib
from tpp_jax.objectives.mae import MAEObjective

from conftest import load_config

PEFTS = ("lora", "dora", "adapter", "adaptformer", "vpt", "ssf", "bitfit")
PRETEXTS = ("mae", "dino")
STEPS = 30
MIN_DROP = 0.10  # the fixed-batch loss must fall by at least 10 %
EVAL_KEY = jax.random.key(1234)  # MAE masking noise of the token-count check


def _config(pneumonia_npz, arg):
  c = load_config("experiment", "pneumonia,smoke,px32," + arg)
  c.data.path = str(pneumonia_npz)
  c.steps = STEPS
  c.optim.warmup_steps = 5
  c.optim.weight_decay = 0.0  # a leaf that moves got a gradient
  return c


def _copy(tree):
  return jax.tree_util.tree_map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def _leaves(tree, labels):
  """[(path, label, leaf)] in a fixed order."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [(tree_lib.path_str(p), lab, leaf) for (p, leaf), lab in zip(flat, jax.tree_util.tree_leaves(labels))]


def _loss_probe(trainer, batch):
  """loss(params, aux) on `batch` with step 0's rng, read from the already compiled train step.

  Shares the train step's compilation instead of compiling a second program per case (the update it
  computes is dropped). Dropout / drop-path are 0 in these configs, so this equals
  objective.loss(params, aux, batch, fold_in(base_rng, 0), train=False): the pretrain test checks it.
  """
  opt0 = _copy(trainer.state["opt_state"])

  def loss(params, aux):
    state = {"step": np.zeros((), np.int32), "params": params, "opt_state": opt0, "aux": aux}
    state = jax.device_put(_copy(state), trainer.state_sharding)  # a copy: the step donates its input
    return float(trainer.train_step(state, batch, trainer.base_rng)[1]["loss"])
  return loss


def _fit_fixed_batch(trainer, batch=None, steps=STEPS):
  """(loss before, loss after, params before, final state, loss fn) of `steps` train steps on one batch."""
  if batch is None:
    batch = build_lib.global_batch(next(trainer.train_iterator()), trainer.mesh)
  loss = _loss_probe(trainer, batch)
  p0, a0 = _copy(trainer.state["params"]), _copy(trainer.state["aux"])
  before = loss(p0, a0)
  state = trainer.state
  for _ in range(steps):
    state, mets = trainer.train_step(state, batch, trainer.base_rng)
  assert np.isfinite(float(mets["loss"]))
  after = loss(_copy(state["params"]), _copy(state["aux"]))
  return before, after, p0, state, loss


@pytest.mark.parametrize("pretext", PRETEXTS)
@pytest.mark.parametrize("peft", PEFTS)
def test_tpp_trains_exactly_the_target_params(pneumonia_npz, tmp_path, pretext, peft):
  c = _config(pneumonia_npz, f"stage=tpp,pretext.type={pretext},peft.type={peft}")
  trainer = engine.Trainer(c, tmp_path, devices=jax.devices()[:1])
  before, after, p0, state, loss = _fit_fixed_batch(trainer)
  p1 = _copy(state["params"])
  # the share of the drop owed to the target params: put them back to init under the trained head
  reset = jax.tree_util.tree_map(lambda a, b, lab: a if lab == "target" else b, p0, p1, trainer.labels)
  without_targets = loss(reset, _copy(state["aux"]))
  print(f"\n[tpp {pretext:4s} {peft:11s}] fixed-batch loss {before:.4f} -> {after:.4f} "
        f"({100 * (before - after) / before:+.1f}%); with the target params reset: {without_targets:.6f} "
        f"(targets' share {100 * (without_targets - after) / (before - after):.2f}% of the drop)")
  assert after < before * (1 - MIN_DROP), (before, after)
  # the target updates helped (or, where their share is ~0 at this scale, did not hurt)
  assert without_targets >= after - 1e-6 * before, (without_targets, after)

  old, new = _leaves(p0, trainer.labels), _leaves(p1, trainer.labels)
  labels = {lab for _, lab, _ in old}
  assert labels == {"frozen", "target", "head"}, labels
  for (path, lab, a), (_, _, b) in zip(old, new):
    if lab == "frozen":
      assert np.array_equal(a, b), f"frozen leaf {path} changed"
    else:
      assert not np.array_equal(a, b), f"{lab} leaf {path} did not change in {STEPS} steps"
  if peft == "bitfit":  # BitFit trains the backbone biases and nothing else of the encoder
    assert {p for p, lab, _ in old if lab == "target"} == {p for p, _, _ in old if p.startswith("encoder/")
                                                           and p.endswith("/bias")}
  if pretext == "dino":  # the teacher shares the frozen backbone bitwise; its target params follow the EMA
    teacher = _leaves(_copy(state["aux"]["teacher"]), trainer.labels)
    for (path, lab, t), (_, _, a), (_, _, b) in zip(teacher, old, new):
      if lab == "frozen":
        assert np.array_equal(t, a), f"teacher's frozen leaf {path} drifted"
      elif lab == "target":
        assert not np.array_equal(t, a), f"teacher leaf {path} did not follow the student"


def test_mae_encoder_sees_only_the_visible_patches(pneumonia_npz, tmp_path):
  c = _config(pneumonia_npz, "stage=tpp,pretext.type=mae,peft.type=lora,pretext.mask_ratio=0.75")
  trainer = engine.Trainer(c, tmp_path, devices=jax.devices()[:1])
  obj = trainer.objective
  assert isinstance(obj, MAEObjective)
  seen = []
  encode = obj.encode

  def spy(*args, **kwargs):
    out = encode(*args, **kwargs)
    seen.append((out["tokens"].shape, [b.shape for b in out["blocks"]]))
    return out
  obj.encode = spy
  batch = build_lib.global_batch(next(trainer.train_iterator()), trainer.mesh)
  jax.eval_shape(lambda p, a, b: obj.loss(p, a, b, EVAL_KEY, True)[0], trainer.state["params"],
                 trainer.state["aux"], batch)
  n = trainer.encoder.cfg.num_patches
  k = int(n * (1 - 0.75))
  b, d = c.batch_size, trainer.encoder.cfg.width
  assert (n, k) == (16, 4)
  assert len(seen) == 1
  tokens, blocks = seen[0]
  assert tokens == (b, 1 + k, d)  # cls + the K visible patches, nothing of the masked ones
  assert blocks == [(b, k, d)] * trainer.encoder.cfg.depth  # every block attends over K (+ cls) tokens only


def test_pretrain_stage_trains_everything_but_the_sincos_pos_embed(pneumonia_npz, tmp_path):
  c = _config(pneumonia_npz, "stage=pretrain,pretext.type=mae")
  assert c.model.pos_emb == "sincos"
  trainer = engine.Trainer(c, tmp_path, devices=jax.devices()[:1])
  batch = build_lib.global_batch(next(trainer.train_iterator()), trainer.mesh)
  obj, rng0 = trainer.objective, jax.random.fold_in(trainer.base_rng, 0)
  reference = float(jax.jit(lambda p, a, b: obj.loss(p, a, b, rng0, False)[0])(
      trainer.state["params"], trainer.state["aux"], batch))
  before, after, p0, state, _ = _fit_fixed_batch(trainer, batch)
  assert abs(before - reference) <= 1e-6 * reference, (before, reference)  # the probe is the eval loss
  print(f"\n[pretrain mae] fixed-batch loss {before:.4f} -> {after:.4f} ({100 * (before - after) / before:+.1f}% drop)")
  assert after < before * (1 - MIN_DROP), (before, after)
  old, new = _leaves(p0, trainer.labels), _leaves(_copy(state["params"]), trainer.labels)
  frozen = {p for p, lab, _ in old if lab == "frozen"}
  assert frozen == {"encoder/pos_embed", "decoder/pos_embed"}, frozen
  assert not any(p.startswith("encoder/") and ("lora" in p or "ssf" in p) for p, _, _ in old)  # no PEFT leaves
  for (path, lab, a), (_, _, b) in zip(old, new):
    if lab == "frozen":
      assert np.array_equal(a, b), path
    else:
      assert lab == "backbone", (path, lab)
      assert not np.array_equal(a, b), f"{path} did not change"
