"""tpp_jax/models/peft.py Norm: LayerNorm (+ SSF) equal to PyTorch's and flax's, values and gradients, and forward-mode
differentiation (jax.jvp / jax.jacfwd) through the whole ViT with every PEFT type."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tpp_jax.models.peft import PEFT_TYPES, Norm, PeftConfig
from tpp_jax.models.vit import ViT, ViTConfig


def test_norm_matches_flax_layer_norm():
  """Same function as flax's nn.LayerNorm with the two-pass variance (what torch computes)."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 65, 24)) * 3 + 1.5, jnp.float32)
  params = Norm(1e-6).init(jax.random.key(0), x)["params"]
  params = {"scale": params["scale"] + 0.3, "bias": params["bias"] - 0.2}
  ours = Norm(1e-6).apply({"params": params}, x)
  ref = nn.LayerNorm(epsilon=1e-6, use_fast_variance=False).apply({"params": params}, x)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_norm_module_gradients_match_torch_with_ssf_and_under_jit():
  """The flax Norm (LayerNorm + SSF's scale / shift after it) differentiated through jit, as a train step does."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 9, 16)).astype(np.float32) * 2
  dy = rng.standard_normal((2, 9, 16)).astype(np.float32)
  norm = Norm(1e-6, PeftConfig(type="ssf"))
  params = norm.init(jax.random.key(0), x)["params"]
  params = jax.tree_util.tree_map(lambda p: p + jnp.asarray(rng.standard_normal(p.shape), jnp.float32) * 0.1, params)

  @jax.jit
  def grads(params, x):
    y, vjp = jax.vjp(lambda p, x: norm.apply({"params": p}, x), params, x)
    return y, vjp(jnp.asarray(dy))

  y, (dp, dx) = grads(params, jnp.asarray(x))
  tx = torch.tensor(x.astype(np.float64), requires_grad=True)
  t = {k: torch.tensor(np.asarray(v, np.float64), requires_grad=True) for k, v in params.items()}
  ty = torch.nn.functional.layer_norm(tx, (16,), t["scale"], t["bias"], 1e-6) * t["ssf_scale"] + t["ssf_shift"]
  ty.backward(torch.tensor(dy.astype(np.float64)))
  np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-4, atol=1e-4)
  for k in ("scale", "bias", "ssf_scale", "ssf_shift"):
    np.testing.assert_allclose(dp[k], t[k].grad.numpy(), rtol=1e-4, atol=1e-4, err_msg=k)


@pytest.mark.parametrize("kind", PEFT_TYPES)
def test_forward_mode_through_the_vit_with_every_peft_type(kind):
  """jax.jvp through the ViT equals a central finite difference, and jax.jacfwd runs (forward mode everywhere)."""
  cfg = ViTConfig.from_variant("Mu/8", image_size=16, depth=2)
  peft = PeftConfig(type=kind, targets=("q", "v", "fc1"), num_prompts=2)
  model = ViT(cfg, peft)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  params = model.init(jax.random.key(1), x)["params"]
  f = lambda x: model.apply({"params": params}, x)["tokens"]
  dx = jax.random.normal(jax.random.key(2), x.shape)
  _, tangent = jax.jvp(f, (x,), (dx,))
  f64 = lambda x: np.asarray(f(x), np.float64)
  h = 1e-2
  finite = (f64(x + h * dx) - f64(x - h * dx)) / (2 * h)
  np.testing.assert_allclose(tangent, finite, rtol=2e-2, atol=2e-2)
  jac = jax.jacfwd(lambda x: f(x).sum(-1))(x[:1])
  assert jac.shape == f(x[:1]).shape[:-1] + x[:1].shape and bool(jnp.isfinite(jac).all())
