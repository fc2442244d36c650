"""Partition rules, optax.multi_transform freezing, parameter counts."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tpp_jax import partition
from tpp_jax import tree as tree_lib
from tpp_jax.models.heads import ClassifierHead
from tpp_jax.models.peft import PeftConfig
from tpp_jax.models.vit import ViT, ViTConfig


def _model(kind, image_size=64, variant="Mu/8"):
  cfg = ViTConfig.from_variant(variant, image_size=image_size, channels=1, depth=2)
  return ViT(cfg, PeftConfig(type=kind, targets=("q", "v")))


@pytest.mark.parametrize("kind", ["lora", "dora", "adapter", "adaptformer", "vpt", "ssf", "bitfit"])
def test_five_steps_on_real_batch_train_only_target_and_head(kind, pneumonia_npz):
  d = np.load(pneumonia_npz)
  idx = np.r_[0:8, -8:0]  # both classes
  x = d["train_images"][idx].astype(np.float32)[..., None] / 255.0
  x = jax.image.resize(jnp.asarray(x), (16, 64, 64, 1), "bilinear")
  y = jnp.asarray(d["train_labels"][idx, 0].astype(np.int32))
  assert len(set(np.asarray(y).tolist())) == 2
  enc, head = _model(kind), ClassifierHead(2)
  p_enc = enc.init(jax.random.key(0), x)["params"]
  params = {"encoder": p_enc, "head": head.init(jax.random.key(1), jnp.zeros((1, 64)))["params"]}
  labels = partition.label_tree(params, partition.default_rules("finetune", kind))
  tx = partition.make_optimizer(labels, optax.adam(1e-2))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      logits = head.apply({"params": p["head"]}, enc.apply({"params": p["encoder"]}, x)["pooled"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    g = jax.grad(loss_fn)(params)
    u, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, u), opt_state

  new = params
  for _ in range(5):
    new, opt_state = step(new, opt_state)
  n_target = 0
  for (path, a), b, lab in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree_util.tree_leaves(new),
                               jax.tree_util.tree_leaves(labels)):
    name = tree_lib.path_str(path)
    if lab == "frozen":
      assert np.array_equal(np.asarray(a), np.asarray(b)), f"frozen leaf {name} changed"
    else:
      n_target += lab == "target"
      assert not np.array_equal(np.asarray(a), np.asarray(b)), f"{lab} leaf {name} did not change"
  assert n_target > 0
  # optimizer state: adam moments only for trainable leaves
  n_trainable = sum(1 for l in jax.tree_util.tree_leaves(labels) if l != "frozen")
  state_arrays = [l for l in jax.tree_util.tree_leaves(opt_state) if np.ndim(l) > 0]
  assert len(state_arrays) == 2 * n_trainable, (len(state_arrays), n_trainable)
  frozen_sizes = sum(np.size(a) for a, l in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(labels))
                     if l == "frozen")
  trainable_sizes = sum(np.size(a) for a, l in zip(jax.tree_util.tree_leaves(params),
                                                   jax.tree_util.tree_leaves(labels)) if l != "frozen")
  assert sum(np.size(a) for a in state_arrays) == 2 * trainable_sizes
  assert frozen_sizes > trainable_sizes


def test_bitfit_labels_biases_only():
  enc = _model("bitfit")
  params = {"encoder": enc.init(jax.random.key(0), jnp.zeros((1, 64, 64, 1)))["params"]}
  labels = partition.label_tree(params, partition.default_rules("finetune", "bitfit"))
  for path, lab in zip(tree_lib.leaf_paths(params), jax.tree_util.tree_leaves(labels)):
    assert (lab == "target") == path.endswith("/bias"), path


def test_unmatched_leaf_is_an_error_naming_it():
  params = {"encoder": {"a": jnp.zeros(2)}, "mystery": {"w": jnp.zeros(2)}}
  with pytest.raises(ValueError, match="mystery/w"):
    partition.label_tree(params, [(r"^encoder/", "frozen")])


def test_pretrain_keeps_sincos_fixed_and_trains_the_rest():
  rules = partition.default_rules("pretrain", fixed_pos_emb=True)
  params = {"encoder": {"pos_embed": 0, "cls": 0}, "decoder": {"pos_embed": 0, "pred": 0}}
  labels = partition.label_tree(params, rules)
  assert labels == {"encoder": {"pos_embed": "frozen", "cls": "backbone"},
                    "decoder": {"pos_embed": "frozen", "pred": "backbone"}}


def test_vit_b16_parameter_table():
  """ViT-B/16: LoRA r=8 on q,v = 12 * 2 * (768*8 + 8*768) = 294,912 of ~86 M (peft's number)."""
  rows = {}
  for kind in ["lora", "dora", "adapter", "adaptformer", "vpt", "ssf", "bitfit", "none"]:
    cfg = ViTConfig.from_variant("B/16")
    enc = ViT(cfg, PeftConfig(type=kind, rank=8, targets=("q", "v"), adapter_dim=8, num_prompts=10))
    shapes = jax.eval_shape(enc.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"]
    params = {"encoder": shapes}
    labels = partition.label_tree(params, partition.default_rules("finetune", kind))
    rows[kind] = partition.param_counts(params, labels)
    print(f"{kind:12s} {partition.format_counts(rows[kind])}")
  assert rows["none"]["total"] == 85_798_656  # ViT-B/16 encoder without head (timm: 85.8 M)
  assert rows["lora"]["target"] == 294_912
  assert rows["dora"]["target"] == 294_912 + 12 * 2 * 768
  assert rows["vpt"]["target"] == 10 * 768
  # q,k,v,o + fc1 + fc2 + norm1/norm2 biases per block, + patch-embed and final-norm biases
  assert rows["bitfit"]["target"] == 12 * (4 * 768 + 3072 + 768 + 2 * 768) + 768 + 768


_UPDATE_HLO = """
import hashlib, jax, jax.numpy as jnp, optax
from tpp_jax import partition
params = {"backbone": {"w": jnp.ones((4, 4))}, "lora": {"a": jnp.ones((4, 2))}, "head": {"w": jnp.ones((4, 3))}}
labels = {"backbone": {"w": "frozen"}, "lora": {"a": "target"}, "head": {"w": "head"}}
tx = partition.make_optimizer(labels, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)))
hlo = jax.jit(tx.update).lower(params, tx.init(params), params).as_text(debug_info=False)
print(hashlib.sha256(hlo.encode()).hexdigest())
"""


def test_the_optimizer_step_is_the_same_program_in_every_process():
  """make_optimizer's groups are traced in a fixed order, not a set's: the string hash seed changes from process to
  process, and with the groups in set order two CLI runs of one command compiled two different train steps (the same
  ops in another order)."""
  import os
  import subprocess
  import sys
  hashes = set()
  for seed in range(6):
    env = {**os.environ, "PYTHONHASHSEED": str(seed), "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", _UPDATE_HLO], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    hashes.add(r.stdout.strip().splitlines()[-1])
  assert len(hashes) == 1, hashes
