"""ViT + PEFT zoo: fresh PEFT leaves leave the backbone unchanged; merge() equals unmerged."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpp_jax import partition
from tpp_jax import tree as tree_lib
from tpp_jax.models.peft import PeftConfig, merge, reset_dora_magnitudes
from tpp_jax.models.vit import ViT, ViTConfig

CFG = ViTConfig.from_variant("Mu/8", image_size=32, depth=3)
X = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))


def _base_params():
  return ViT(CFG).init(jax.random.key(1), X)["params"]


def _with_base(peft):
  """Init a PEFT model, then copy the plain backbone's weights into it."""
  model = ViT(CFG, peft)
  params = model.init(jax.random.key(2), X)["params"]
  base = _base_params()
  def fill(p, b):
    return {k: (fill(v, b[k]) if isinstance(v, dict) else b.get(k, v)) if k in b else v for k, v in p.items()}
  return model, reset_dora_magnitudes(fill(params, base), peft)


@pytest.mark.parametrize("kind", ["lora", "dora", "adapter", "adaptformer", "ssf"])
def test_fresh_peft_leaves_backbone_output_unchanged(kind):
  ref = ViT(CFG).apply({"params": _base_params()}, X)["tokens"]
  model, params = _with_base(PeftConfig(type=kind, targets=("q", "k", "v", "o", "fc1", "fc2")))
  out = model.apply({"params": params}, X)["tokens"]
  assert float(jnp.abs(out - ref).max()) <= 1e-5


def _perturb_targets(params, key):
  leaves, tdef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(key, len(leaves))
  new = [v + 0.05 * jax.random.normal(k, v.shape) if partition.TARGET_RE and
         __import__("re").search(partition.TARGET_RE, "encoder/" + tree_lib.path_str(p)) else v
         for (p, v), k in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(tdef, new)


@pytest.mark.parametrize("kind,rslora", [("lora", False), ("lora", True), ("dora", False), ("ssf", False)])
def test_merge_equals_unmerged(kind, rslora):
  peft = PeftConfig(type=kind, rank=4, alpha=8.0, rslora=rslora, targets=("q", "v", "fc1"))
  model, params = _with_base(peft)
  params = _perturb_targets(params, jax.random.key(3))
  out = model.apply({"params": params}, X)["tokens"]
  merged = merge(params, peft)
  flat = tree_lib.leaf_paths(merged)
  assert not any(s in p for p in flat for s in ("lora_", "dora_m", "ssf_")), flat
  ref = ViT(CFG).apply({"params": merged}, X)["tokens"]
  diff = float(jnp.abs(out - ref).max())
  assert diff <= 1e-5, diff
  # the perturbation really changed the output (the test can fail)
  base = ViT(CFG).apply({"params": _base_params()}, X)["tokens"]
  assert float(jnp.abs(out - base).max()) > 1e-3


def test_merge_refuses_unmergeable():
  with pytest.raises(ValueError, match="cannot be merged"):
    merge({}, PeftConfig(type="adapter"))


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_prompts_dropped_from_outputs(deep):
  model = ViT(CFG, PeftConfig(type="vpt", num_prompts=5, deep=deep))
  params = model.init(jax.random.key(2), X)["params"]
  assert params["prompts"].shape == ((CFG.depth if deep else 1), 5, CFG.width)
  out = model.apply({"params": params}, X)
  assert out["tokens"].shape == (2, 1 + CFG.num_patches, CFG.width)
  assert all(b.shape == (2, CFG.num_patches, CFG.width) for b in out["blocks"])
  # visible-token (MAE) input works with prompts too
  keep = jnp.tile(jnp.arange(4)[None], (2, 1))
  assert model.apply({"params": params}, X, keep_ids=keep)["tokens"].shape == (2, 5, CFG.width)


def test_keep_ids_equals_encoding_the_selected_patches_with_their_positions():
  params = _base_params()
  m = ViT(CFG)
  keep = jnp.asarray([[0, 5, 9], [2, 3, 15]])
  out = m.apply({"params": params}, X, keep_ids=keep)["tokens"]
  assert out.shape == (2, 4, CFG.width)
  # different kept patches give different outputs; same kept set in another order is permuted
  perm = m.apply({"params": params}, X, keep_ids=keep[:, ::-1])["tokens"]
  np.testing.assert_allclose(np.asarray(perm[:, 1:]), np.asarray(out[:, 1:][:, ::-1]), atol=1e-5)


def test_bad_image_shape_message():
  with pytest.raises(ValueError, match=r"expects images of shape \(B, 32, 32, 3\)"):
    ViT(CFG).init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))


def test_variant_errors():
  with pytest.raises(ValueError, match="NAME/PATCH"):
    ViTConfig.from_variant("Huge/16")
  with pytest.raises(ValueError, match="not one of"):
    PeftConfig(type="lorax")


def test_drop_path_and_bf16_run():
  cfg = ViTConfig.from_variant("Mu/8", image_size=32, depth=2, drop_path=0.2, dtype="bfloat16")
  m = ViT(cfg, PeftConfig(type="lora"))
  p = m.init(jax.random.key(0), X)["params"]
  out = m.apply({"params": p}, X, train=True, rngs={"dropout": jax.random.key(1)})
  assert out["tokens"].dtype == jnp.bfloat16 and bool(jnp.isfinite(out["tokens"].astype(jnp.float32)).all())
  assert jax.tree_util.tree_leaves(p)[0].dtype == jnp.float32  # params stay fp32


def test_remat_keeps_parameters_outputs_and_gradients():
  """model.remat recomputes block activations in the backward pass: same tree, loss and gradients."""
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  got = []
  for remat in (False, True):
    enc = ViT(ViTConfig.from_variant("Mu/8", depth=2, image_size=32, remat=remat, drop_path=0.1),
              PeftConfig(type="lora"))
    params = enc.init(jax.random.key(1), x)["params"]

    def loss(p, enc=enc):
      out = enc.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(3)})["tokens"]
      return jnp.square(out - 0.5).mean()
    got.append((tree_lib.flatten(params), *jax.value_and_grad(loss)(params)))
  (p0, l0, g0), (p1, l1, g1) = got
  assert {k: v.shape for k, v in p0.items()} == {k: v.shape for k, v in p1.items()}
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for k, v in tree_lib.flatten(g0).items():
    np.testing.assert_allclose(tree_lib.flatten(g1)[k], v, rtol=1e-4, atol=1e-4, err_msg=k)


def test_attention_auto_on_cpu_equals_xla_and_bad_choice_is_named():
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  outs = []
  for impl in ("auto", "xla"):  # auto on CPU: XLA's attention
    enc = ViT(ViTConfig.from_variant("Mu/8", depth=1, image_size=32, attention=impl))
    outs.append(enc.apply(enc.init(jax.random.key(1), x), x)["tokens"])
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="model.attention='flash'"):
    ViTConfig.from_variant("Mu/8", attention="flash")


def test_mae_decoder_computes_in_the_encoders_dtype_and_returns_float32():
  """A bf16 encoder gets a bf16 decoder (its matmuls and attention, as torch autocast runs HF's), pixel predictions in
  fp32 for the loss, within bf16 rounding of the fp32 decoder with the same parameters."""
  from tpp_jax.models.mae import MAEDecoder, MAEDecoderConfig
  dec_cfg = MAEDecoderConfig(width=32, depth=1, heads=2, mlp_dim=64)
  enc32 = ViTConfig.from_variant("Mu/8", depth=1, image_size=32)
  tokens = jax.random.normal(jax.random.key(0), (2, 5, enc32.width))
  restore = jnp.tile(jnp.arange(16)[None], (2, 1))
  params = MAEDecoder(dec_cfg, enc32).init(jax.random.key(1), tokens, restore)
  outs = {}
  for dtype in ("float32", "bfloat16"):
    dec = MAEDecoder(dec_cfg, dataclasses.replace(enc32, dtype=dtype))
    outs[dtype] = dec.apply(params, tokens, restore)
    dots = [e for e in jax.make_jaxpr(lambda p: dec.apply(p, tokens, restore))(params).jaxpr.eqns
            if e.primitive.name == "dot_general"]
    assert dots and {str(e.invars[0].aval.dtype) for e in dots} == {dtype}
  assert outs["bfloat16"].dtype == jnp.float32
  np.testing.assert_allclose(outs["bfloat16"], outs["float32"], rtol=0.05, atol=0.05)
