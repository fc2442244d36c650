"""Pretexts that learn through the target parameters: MAE, DINO (multi-crop), contrastive (NT-Xent).

On a tiny random ViT (frozen backbone) with LoRA or Houlsby adapters, one fixed batch of augmented
views, each pretext trains twice from the same init and rngs:
  target+head: the PEFT (target) params and the pretext head train,
  head only:   the target params stay frozen, only the pretext head trains.
Checks: the loss falls; frozen leaves are bitwise unchanged, target leaves moved (and did not in the
head-only run); the target+head run reaches a lower loss than the head-only one (the drop is not all
the head's). DINO: the loss falls well below log(out_dim). NT-Xent matches a torch implementation.

DINO runs here with teacher_momentum = 1 (the teacher stays the init network, centred and sharpened): with an
EMA teacher the two runs chase different targets and their final losses are not comparable (on this batch a
0.7-momentum teacher gave 0.24 / 3.83 / 0.08 after 30 / 40 / 60 steps, both runs alike); the EMA update and
the teacher's frozen leaves are covered by tests/objectives/test_objectives.py.
Run with -s to see the numbers.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tpp_jax import partition
from tpp_jax import tree as tree_lib
from tpp_jax.config import base_config
from tpp_jax.data import transforms
from tpp_jax.models.peft import PeftConfig
from tpp_jax.models.vit import ViT, ViTConfig
from tpp_jax.objectives.contrastive import ContrastiveObjective, nt_xent
from tpp_jax.objectives.dino import DINOObjective, resize_pos_embed
from tpp_jax.objectives.mae import MAEObjective

SIZE, PATCH, BATCH, STEPS, LR = 32, 8, 16, 40, 1e-2
OBJECTIVES = {"mae": MAEObjective, "dino": DINOObjective, "contrastive": ContrastiveObjective}
PEFTS = {"lora": dict(type="lora", rank=4, alpha=4.0, targets=("q", "v")),
         "adapter": dict(type="adapter", adapter_dim=8)}


def _config(pretext):
  c = base_config()
  c.stage, c.steps = "tpp", STEPS
  c.model.image_size = c.data.image_size = SIZE
  c.data.augment.crop_scale = (0.5, 1.0)
  p = c.pretext
  p.type = pretext
  p.decoder_width, p.decoder_depth, p.decoder_heads, p.decoder_mlp_dim = 32, 1, 2, 64
  p.dino_out_dim, p.dino_hidden_dim, p.dino_bottleneck_dim = 64, 64, 32
  p.teacher_momentum = 1.0  # a fixed teacher: both runs' losses are against the same targets (see the docstring)
  p.local_crops, p.local_crop_size = 2, 16
  c.pretext.update(dict(local_crop_scale=(0.1, 0.4), teacher_temp_warmup=0.04, teacher_temp_warmup_steps=0,
                        contrastive_temp=0.2, proj_hidden_dim=64, proj_dim=32))
  return c


def _encoder(peft):
  cfg = ViTConfig(width=32, depth=2, heads=2, mlp_dim=64, patch=PATCH, image_size=SIZE, channels=3)
  return ViT(cfg, PeftConfig(**PEFTS[peft]))


def _images(n=BATCH, size=48, seed=0):
  """Smooth random RGB images (uint8): a coarse random grid, upsampled, plus a bright square."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (n, 6, 6, 3))
  img = jax.image.resize(jnp.asarray(coarse), (n, size, size, 3), "bilinear")
  img = np.array(img)
  for i in range(n):
    y, x = rng.integers(0, size - 12, 2)
    img[i, y:y + 12, x:x + 12] = 255.0 * rng.uniform(0.5, 1.0)
  return np.clip(img, 0, 255).astype(np.uint8)


def _batch(obj, config, seed=0):
  """One fixed batch built by the objective's own view transform (as the engine builds it)."""
  fn = obj.make_views(transforms.make_transform(config.data, train=True), config.data)
  rng = np.random.default_rng(seed)
  recs = [fn({"image": im}, rng) for im in _images(seed=seed)]
  return {k: jnp.asarray(np.stack([r[k] for r in recs])) for k in recs[0]}


@functools.lru_cache(maxsize=None)
def _setup(pretext, peft):
  """(objective, fixed batch, params, aux, labels); cached: jax arrays are immutable."""
  config = _config(pretext)
  encoder = _encoder(peft)
  obj = OBJECTIVES[pretext](config, encoder)
  batch = _batch(obj, config)
  r_enc, r_obj = jax.random.split(jax.random.key(0))
  enc = jax.jit(encoder.init)(r_enc, batch["image"][:2])["params"]
  extra, aux = jax.jit(obj.init)(r_obj, enc, batch)
  params = {"encoder": enc, **extra}
  if "teacher" in aux:
    aux = {**aux, "teacher": jax.tree_util.tree_map(jnp.array, params)}
  labels = partition.label_tree(params, partition.default_rules("tpp", PEFTS[peft]["type"]))
  return obj, batch, params, aux, labels


def _stepper(obj, batch, labels):
  """One jitted step(params, opt_state, aux, i, rng, grad_mask) -> (params, opt_state, aux, loss at the input params).

  Adam on the non-frozen leaves (optax.set_to_zero on the frozen ones: the engine's partition). grad_mask (one
  0/1 scalar per leaf) zeroes the target gradients of the head-only run without a second compilation: Adam then
  adds exactly -0.0 to those leaves, which leaves them bitwise unchanged (checked below). With a fixed rng and
  no dropout the returned loss is the eval probe.
  """
  tx = partition.make_optimizer(labels, optax.adam(LR))

  @jax.jit
  def step(params, opt_state, aux, i, rng, mask):
    (loss, (_, aux)), g = jax.value_and_grad(obj.loss, has_aux=True)(params, aux, batch, rng, True)
    g = jax.tree_util.tree_map(lambda x, m: x * m, g, mask)
    upd, opt_state = tx.update(g, opt_state, params)
    params = optax.apply_updates(params, upd)
    return params, opt_state, obj.after_step(params, aux, i), loss
  return tx, step


def _fit(stepper, params, aux, labels, train_target=True, steps=STEPS):
  """(loss before, loss after, params, aux) of `steps` steps of `stepper` on its fixed batch."""
  tx, step = stepper
  mask = jax.tree_util.tree_map(lambda lab: jnp.float32(0.0 if lab == "target" and not train_target else 1.0), labels)
  probe_rng, base = jax.random.key(7), jax.random.key(1)
  opt_state = tx.init(params)
  zero = jnp.int32(0)
  before = float(step(params, opt_state, aux, zero, probe_rng, mask)[3])
  for i in range(steps):
    params, opt_state, aux, _ = step(params, opt_state, aux, jnp.int32(i), jax.random.fold_in(base, i), mask)
  after = float(step(params, opt_state, aux, zero, probe_rng, mask)[3])
  return before, after, params, aux


def _leaves(tree, labels):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [(tree_lib.path_str(p), lab, np.asarray(x)) for (p, x), lab in zip(flat, jax.tree_util.tree_leaves(labels))]


# LoRA for every pretext, Houlsby adapters for one more (each case is one ~10 s compilation on 2 shared cores)
@pytest.mark.parametrize("pretext,peft", [("mae", "lora"), ("dino", "lora"), ("contrastive", "lora"),
                                          ("contrastive", "adapter")])
def test_loss_falls_through_the_target_params(pretext, peft):
  obj, batch, p0, a0, labels = _setup(pretext, peft)
  stepper = _stepper(obj, batch, labels)
  before, full, p_full, a_full = _fit(stepper, p0, a0, labels)
  before2, head, p_head, _ = _fit(stepper, p0, a0, labels, train_target=False)
  assert before2 == before
  extra = f"  (log(out_dim) = {math.log(obj.head.out_dim):.3f})" if pretext == "dino" else ""
  print(f"\n[{pretext:11s} {peft:7s}] loss {before:.4f} -> target+head {full:.4f} (drop {before - full:.4f}), "
        f"head only {head:.4f} (drop {before - head:.4f}){extra}")
  assert full < 0.8 * before, (before, full)
  assert full < head, (full, head)  # the target params add to what the head alone reaches

  old, new, new_head = _leaves(p0, labels), _leaves(p_full, labels), _leaves(p_head, labels)
  assert {lab for _, lab, _ in old} == {"frozen", "target", "head"}
  for (path, lab, a), (_, _, b), (_, _, h) in zip(old, new, new_head):
    if lab == "frozen":
      assert np.array_equal(a, b) and np.array_equal(a, h), f"frozen leaf {path} changed"
    elif lab == "target":
      assert not np.array_equal(a, b), f"target leaf {path} did not move"
      assert np.array_equal(a, h), f"target leaf {path} moved in the head-only run"
    else:
      assert not np.array_equal(a, b) and not np.array_equal(a, h), f"head leaf {path} did not move"
  if pretext == "dino":
    assert full < 0.7 * math.log(obj.head.out_dim), full  # well below the uniform-prediction loss
    for (path, lab, t), (_, _, a) in zip(_leaves(a_full["teacher"], labels), old):
      if lab == "frozen":
        assert np.array_equal(t, a), f"teacher's frozen leaf {path} drifted"


def test_dino_multicrop_views_and_pair_average():
  obj, batch, params, aux, _ = _setup("dino", "lora")
  assert batch["image"].shape == batch["image2"].shape == (BATCH, SIZE, SIZE, 3)
  assert batch["local"].shape == (BATCH, 2, 16, 16, 3)
  assert obj.local_encoder.cfg.grid == 2
  # an independent recomputation: teacher on the 2 globals, student on all 4 views, pairs j != i
  out, local_out = jax.jit(obj._out, static_argnums=2), jax.jit(obj._local_out, static_argnums=2)
  s_g = np.asarray(out(params, jnp.concatenate([batch["image"], batch["image2"]]), False))
  t_g = np.asarray(out(aux["teacher"], jnp.concatenate([batch["image"], batch["image2"]]), False))
  loc = batch["local"]
  s_l = np.asarray(local_out(params, loc.reshape((-1,) + loc.shape[2:]), False)).reshape(BATCH, 2, -1)
  students = [s_g[:BATCH], s_g[BATCH:], s_l[:, 0], s_l[:, 1]]
  center = t_g.mean(0)

  def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
  terms = []
  for i, t in enumerate((t_g[:BATCH], t_g[BATCH:])):
    for j, s in enumerate(students):
      if j != i:
        terms.append(-(softmax((t - center) / obj.teacher_temp) * np.log(softmax(s / obj.student_temp))).sum(-1).mean())
  assert len(terms) == 6
  got = float(jax.jit(lambda p, a: obj.loss(p, a, batch, jax.random.key(0), False)[0])(params, aux))
  np.testing.assert_allclose(got, np.mean(terms), rtol=1e-5)


def test_dino_local_encoder_uses_resized_pos_embed():
  obj, batch, params, _, _ = _setup("dino", "lora")
  pos = params["encoder"]["pos_embed"]
  small = resize_pos_embed(pos, 2)
  assert small.shape == (1, 5, pos.shape[-1])
  np.testing.assert_array_equal(small[:, 0], pos[:, 0])  # the cls slot is kept
  assert resize_pos_embed(pos, 4) is pos  # the model's own grid: unchanged
  # a constant grid stays constant under the resize
  const = jnp.concatenate([pos[:, :1], jnp.ones((1, 16, pos.shape[-1]))], axis=1)
  np.testing.assert_allclose(resize_pos_embed(const, 2)[:, 1:], 1.0, rtol=1e-5)
  # gradients reach the (trainable in pretrain) position embedding through the local crops
  g = jax.jit(jax.grad(lambda p: obj._local_out(p, batch["local"][:, 0], False).sum()))(params)
  assert float(jnp.abs(g["encoder"]["pos_embed"]).sum()) > 0


def test_dino_teacher_temperature_warmup():
  c = _config("dino")
  c.pretext.teacher_temp, c.pretext.teacher_temp_warmup, c.pretext.teacher_temp_warmup_steps = 0.07, 0.04, 10
  obj = DINOObjective(c, _encoder("lora"))
  temps = [float(obj.teacher_temperature(s)) for s in (0, 5, 10, 100)]
  np.testing.assert_allclose(temps, [0.04, 0.055, 0.07, 0.07], rtol=1e-6)
  c.pretext.teacher_temp_warmup_steps = 0
  assert float(DINOObjective(c, _encoder("lora")).teacher_temperature(0)) == pytest.approx(0.07)


def test_dino_without_locals_is_the_two_view_loss():
  c = _config("dino")
  c.pretext.local_crops = 0
  obj = DINOObjective(c, _encoder("lora"))
  fn = obj.make_views(transforms.make_transform(c.data, train=True), c.data)
  out = fn({"image": _images(1)[0]}, np.random.default_rng(0))
  assert set(out) == {"image", "image2"}


def _torch_nt_xent(z1, z2, temperature):
  """NT-Xent as SimCLR implementations write it in torch (cross-entropy over the 2B x 2B similarities)."""
  import torch
  import torch.nn.functional as F
  z = F.normalize(torch.cat([torch.as_tensor(z1), torch.as_tensor(z2)]).double(), dim=1)
  n = z.shape[0]
  sim = z @ z.T / temperature
  sim = sim.masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
  target = torch.cat([torch.arange(n // 2, n), torch.arange(0, n // 2)])
  return F.cross_entropy(sim, target, reduction="none").numpy()


def test_nt_xent_matches_torch():
  pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(8, 16)).astype(np.float32), rng.normal(size=(8, 16)).astype(np.float32)
  for t in (0.1, 0.2, 0.5):
    got = np.asarray(nt_xent(jnp.asarray(z1), jnp.asarray(z2), t))
    np.testing.assert_allclose(got, _torch_nt_xent(z1, z2, t), atol=1e-5)
    # symmetric: swapping the views swaps the anchors
    swapped = np.asarray(nt_xent(jnp.asarray(z2), jnp.asarray(z1), t))
    np.testing.assert_allclose(swapped, np.concatenate([got[8:], got[:8]]), atol=1e-6)
  # padded rows (valid = 0) are no negatives: the loss of the valid rows is that of the valid subset
  valid = np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)
  got = np.asarray(nt_xent(jnp.asarray(z1), jnp.asarray(z2), 0.2, jnp.asarray(valid)))
  ref = _torch_nt_xent(z1[:5], z2[:5], 0.2)
  np.testing.assert_allclose(np.concatenate([got[:5], got[8:13]]), ref, atol=1e-5)


def test_contrastive_eval_outputs_ignore_padding():
  obj, batch, params, aux, _ = _setup("contrastive", "lora")
  images = batch["image"][:6]
  ev = jax.jit(obj.eval_outputs)
  out = ev(params, aux, {"image": images, "valid": jnp.array([1, 1, 1, 1, 0, 0])})
  ref = ev(params, aux, {"image": images[:4], "valid": jnp.ones(4)})
  assert float(out["count"]) == 4.0
  np.testing.assert_allclose(float(out["loss_sum"]), float(ref["loss_sum"]), rtol=1e-5)


def test_dino_batch_norm_gives_the_teacher_something_to_sharpen():
  """Nearly identical features (a frozen backbone's, cos-sim ~0.99): through the plain head the centred teacher is
  uniform (entropy ~ log K); batch-standardised first it is not. Padded rows (weights 0) do not move the statistics."""
  from tpp_jax.models.heads import DINOHead
  key = jax.random.key(0)
  common = jax.random.normal(key, (1, 32)) * 10.0
  feats = common + 0.1 * jax.random.normal(jax.random.fold_in(key, 1), (64, 32))
  cos = feats @ feats.T / jnp.outer(jnp.linalg.norm(feats, axis=1), jnp.linalg.norm(feats, axis=1))
  assert float(cos.min()) > 0.98

  def teacher_entropy(head):
    params = head.init(jax.random.fold_in(key, 2), feats)
    out = head.apply(params, feats)
    p = jax.nn.softmax((out - out.mean(0)) / 0.04, axis=-1)
    return float(-(p * jnp.log(p + 1e-12)).sum(-1).mean()), head, params

  log_k = math.log(256)
  plain, _, _ = teacher_entropy(DINOHead(256, 64, 16, batch_norm=False))
  standardised, head, params = teacher_entropy(DINOHead(256, 64, 16, batch_norm=True))
  assert plain > 0.98 * log_k and standardised < 0.8 * log_k, (plain, standardised, log_k)
  padded = jnp.concatenate([feats, jnp.zeros((8, 32))])
  weights = jnp.concatenate([jnp.ones(64), jnp.zeros(8)])
  np.testing.assert_allclose(head.apply(params, padded, weights)[:64], head.apply(params, feats), rtol=1e-3, atol=2e-4)
