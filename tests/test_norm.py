"""tpp_jax/models/norm.py: the written-out LayerNorm backward equals PyTorch's LayerNorm, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tpp_jax.models.norm import layer_norm
from tpp_jax.models.peft import Norm, PeftConfig


def _torch_layer_norm_grads(x, scale, bias, dy, eps):
  tx, ts, tb = (torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in (x, scale, bias))
  y = torch.nn.functional.layer_norm(tx, (x.shape[-1],), ts, tb, eps)
  y.backward(torch.tensor(np.asarray(dy, np.float64)))
  return y.detach().numpy(), tx.grad.numpy(), ts.grad.numpy(), tb.grad.numpy()


@pytest.mark.parametrize("shape", [(4, 65, 192), (7, 48)])
def test_layer_norm_values_and_gradients_match_torch(shape):
  rng = np.random.default_rng(0)
  x = (rng.standard_normal(shape) * 3 + 1.5).astype(np.float32)  # off-centre, as residual streams are
  scale = rng.standard_normal(shape[-1]).astype(np.float32)
  bias = rng.standard_normal(shape[-1]).astype(np.float32)
  dy = rng.standard_normal(shape).astype(np.float32)
  eps = 1e-6
  y, vjp = jax.vjp(lambda *a: layer_norm(*a, eps), jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
  dx, dscale, dbias = vjp(jnp.asarray(dy))
  ty, tdx, tds, tdb = _torch_layer_norm_grads(x, scale, bias, dy, eps)
  np.testing.assert_allclose(y, ty, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, tdx, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dscale, tds, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(dbias, tdb, rtol=1e-4, atol=1e-3)


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


def test_layer_norm_second_order_gradient_matches_autodiff_of_the_formula():
  """A gradient of a gradient (e.g. a gradient penalty) goes through the written-out backward."""
  x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 8)), jnp.float32)
  s, b = jnp.linspace(0.5, 1.5, 8), jnp.linspace(-1, 1, 8)

  def formula(x):
    m = x.mean(-1, keepdims=True)
    return (x - m) * jax.lax.rsqrt(jnp.square(x - m).mean(-1, keepdims=True) + 1e-6) * s + b

  def penalty(f):
    return lambda x: jnp.sum(jnp.square(jax.grad(lambda x: jnp.sum(jnp.sin(f(x))))(x)))

  np.testing.assert_allclose(jax.grad(penalty(lambda x: layer_norm(x, s, b, 1e-6)))(x), jax.grad(penalty(formula))(x),
                             rtol=1e-4, atol=1e-5)
